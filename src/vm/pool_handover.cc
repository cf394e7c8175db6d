#include "vm/pool_handover.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cerrno>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "base/error_kind.h"
#include "base/small_file.h"
#include "base/timeouts.h"
#include "nomadplugin/hclog.h"
#include "qemu_driver/supervisor_protocol.h"

namespace ndq {
namespace {

namespace log = nomadplugin::hclog;
using json = nlohmann::json;

constexpr char kTaskOverlayNode[] = "task-overlay";


absl::Status Qmp(QmpClient& qmp, const std::string& command, const json& arguments, int fd = -1) {
  absl::StatusOr<json> out = fd >= 0 ? qmp.ExecuteWithFd(command, arguments, fd, timeouts::kQmpCommand)
                                     : qmp.Execute(command, arguments, timeouts::kQmpCommand);
  if (!out.ok()) return absl::Status(out.status().code(), absl::StrCat(command, ": ", out.status().message()));
  return absl::OkStatus();
}

// The task's overlay becomes the boot disk's top: the guest has not run
// since the template's state was loaded (the warm-up wrote only under it,
// to the slot's own overlay), and every write from now on goes to the task dir.
absl::Status AttachOverlay(QmpClient& qmp, int overlay_fd) {
  absl::StatusOr<json> added = qmp.ExecuteWithFd("add-fd", json::object(), overlay_fd, timeouts::kQmpCommand);
  if (!added.ok()) return absl::Status(added.status().code(), absl::StrCat("add-fd: ", added.status().message()));
  const int set = added->value("fdset-id", -1);
  const json node = {{"driver", "qcow2"},
                     {"node-name", kTaskOverlayNode},
                     {"file", {{"driver", "file"}, {"filename", absl::StrCat("/dev/fdset/", set)}}},
                     {"backing", nullptr}};
  if (absl::Status status = Qmp(qmp, "blockdev-add", node); !status.ok()) return status;
  return Qmp(qmp, "blockdev-snapshot", {{"node", kPoolBootNode}, {"overlay", kTaskOverlayNode}});
}

absl::Status AddForwards(QmpClient& qmp, const std::vector<PortForward>& forwards) {
  for (const PortForward& forward : forwards) {
    if (absl::Status added = AddHostForward(qmp, forward); !added.ok()) return added;
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> Hmp(QmpClient& qmp, const std::string& command) {
  absl::StatusOr<json> out = qmp.Execute("human-monitor-command", {{"command-line", command}}, timeouts::kQmpCommand);
  if (!out.ok()) return out.status();
  return out->is_string() ? out->get<std::string>() : std::string();
}

absl::Status JoinCgroup(pid_t qemu, const std::vector<std::string>& procs_files) {
  const std::string pid = std::to_string(qemu);
  for (const std::string& procs : procs_files) {
    const int fd = ::open(procs.c_str(), O_WRONLY | O_CLOEXEC);
    const bool ok = fd >= 0 && ::write(fd, pid.data(), pid.size()) == static_cast<ssize_t>(pid.size());
    const int err = errno;
    if (fd >= 0) ::close(fd);
    if (!ok) return ErrnoError("cannot move the pooled QEMU into " + procs, err);
  }
  return absl::OkStatus();
}

absl::Status HandOutput(const PooledVm& vm, const std::string& state_dir, const TaskParts& parts) {
  const std::string out = parts.stdout_path.empty() ? "/dev/null" : parts.stdout_path;
  const std::string err = parts.stderr_path.empty() ? "/dev/null" : parts.stderr_path;
  if (out.find('\n') != std::string::npos || err.find('\n') != std::string::npos) {
    return absl::InvalidArgumentError("the task's log paths hold a newline");
  }
  if (absl::Status written =
          WriteSmallFileAtomically(absl::StrCat(state_dir, "/", supervisor::kHandoverFile), out + "\n" + err + "\n");
      !written.ok()) {
    return written;
  }
  if (::kill(vm.supervisor_pid, SIGUSR1) != 0) return ErrnoNow("cannot signal the pooled VM's supervisor");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::string> HostForwardRule(const PortForward& forward) {
  in_addr ignored;
  if ((forward.protocol != "tcp" && forward.protocol != "udp") ||
      (!forward.host_ip.empty() && ::inet_pton(AF_INET, forward.host_ip.c_str(), &ignored) != 1) ||
      forward.host_port <= 0 || forward.host_port > 65535 || forward.guest_port <= 0 || forward.guest_port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("port_map \"", forward.label, "\": a forward a pooled VM cannot take"));
  }
  return absl::StrCat(forward.protocol, ":", forward.host_ip, ":", forward.host_port, "-:", forward.guest_port);
}

absl::Status AddHostForward(QmpClient& qmp, const PortForward& forward) {
  absl::StatusOr<std::string> rule = HostForwardRule(forward);
  if (!rule.ok()) return rule.status();
  absl::StatusOr<std::string> out = Hmp(qmp, "hostfwd_add user.0 " + *rule);
  if (!out.ok()) return out.status();
  // hostfwd_add answers "" when it worked, its error text otherwise.
  if (!out->empty()) {
    return absl::UnavailableError(absl::StrCat("port_map \"", forward.label, "\": QEMU could not forward ",
                                               forward.host_ip.empty() ? "*" : forward.host_ip, ":", forward.host_port,
                                               ": ", *out));
  }
  return absl::OkStatus();
}

absl::Status RemoveHostForward(QmpClient& qmp, const PortForward& forward) {
  if (absl::StatusOr<std::string> rule = HostForwardRule(forward); !rule.ok()) return rule.status();
  // hostfwd_remove takes the host side only: [tcp|udp]:[address]:port. It
  // answers "host forwarding rule for <rule> removed", or "... not found" (or
  // a usage error): a warm-up's forward left in place would reach the task's VM.
  absl::StatusOr<std::string> out =
      Hmp(qmp, absl::StrCat("hostfwd_remove user.0 ", forward.protocol, ":", forward.host_ip, ":", forward.host_port));
  if (!out.ok()) return out.status();
  if (!absl::StrContains(*out, " removed")) {
    return absl::UnavailableError(absl::StrCat("QEMU could not remove its forward of ", forward.host_ip, ":",
                                               forward.host_port, ": ", *out));
  }
  return absl::OkStatus();
}

absl::Status MoveSlotInto(PooledVm& vm, const std::string& state_dir) {
  // prepare host made the task's state dir and its run/, both still empty. A
  // directory renames onto an empty one in one step, so a failed move leaves
  // the task's state dir in place for the rollback to remove.
  ::rmdir((state_dir + "/" + supervisor::kRunDir).c_str());
  if (::rename(vm.dir.c_str(), state_dir.c_str()) != 0) return ErrnoNow("cannot move the pooled VM to " + state_dir);
  vm.dir = state_dir;
  return absl::OkStatus();
}

absl::Status AttachTaskParts(QmpClient& qmp, const PooledVm& vm, const std::string& state_dir, const TaskParts& parts) {
  const absl::Time started = absl::Now();
  json phases = json::array();  // [phase, ms since the start], at debug level
  auto mark = [&](const char* phase) { phases.push_back({phase, absl::ToDoubleMilliseconds(absl::Now() - started)}); };
  absl::Status status = AttachOverlay(qmp, parts.overlay_fd);
  mark("overlay attached");
  if (status.ok()) status = AddForwards(qmp, parts.forwards);
  mark("forwards added");
  if (status.ok()) status = JoinCgroup(vm.qemu_pid, parts.cgroup_procs);
  mark("cgroup joined");
  if (status.ok()) status = HandOutput(vm, state_dir, parts);
  mark("output handed over");
  if (status.ok()) status = Qmp(qmp, "cont", nullptr);
  mark("resumed");
  log::Debug("pooled VM handover phases", {{"ms_since_start", phases}});
  return status;
}

}  // namespace ndq
