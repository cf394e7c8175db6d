#include "qemu_driver/supervisor_protocol.h"

#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <cstring>

#include <nlohmann/json.hpp>

#include "base/small_file.h"

namespace ndq::supervisor {
namespace {

using nlohmann::json;

bool GetInt64(const json& obj, const char* key, int64_t* out, std::string* error) {
  const auto it = obj.find(key);
  if (it == obj.end() || !it->is_number_integer()) {
    *error = std::string("exit record: \"") + key + "\" missing or not an integer";
    return false;
  }
  if (it->is_number_unsigned() && it->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    *error = std::string("exit record: \"") + key + "\" out of range";
    return false;
  }
  *out = it->get<int64_t>();
  return true;
}

bool GetInt(const json& obj, const char* key, int* out, std::string* error) {
  int64_t v = 0;
  if (!GetInt64(obj, key, &v, error)) return false;
  if (v < INT_MIN || v > INT_MAX) {
    *error = std::string("exit record: \"") + key + "\" out of range";
    return false;
  }
  *out = static_cast<int>(v);
  return true;
}

bool GetString(const json& obj, const char* key, std::string* out, std::string* error) {
  const auto it = obj.find(key);
  if (it == obj.end() || !it->is_string()) {
    *error = std::string("exit record: \"") + key + "\" missing or not a string";
    return false;
  }
  *out = it->get<std::string>();
  return true;
}

}  // namespace

std::optional<ExitRecord> ParseExitRecord(std::string_view text, std::string* error) {
  error->clear();
  const json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    *error = "exit record is not valid JSON";
    return std::nullopt;
  }
  if (!doc.is_object()) {
    *error = "exit record is not a JSON object";
    return std::nullopt;
  }
  ExitRecord r;
  const auto core = doc.find("core_dumped");
  if (core == doc.end() || !core->is_boolean()) {
    *error = "exit record: \"core_dumped\" missing or not a boolean";
    return std::nullopt;
  }
  r.core_dumped = core->get<bool>();
  if (!GetInt(doc, "exit_code", &r.exit_code, error) || !GetInt(doc, "signal", &r.signal, error) ||
      !GetInt64(doc, "started_at", &r.started_at_ms, error) || !GetInt64(doc, "exited_at", &r.exited_at_ms, error) ||
      !GetString(doc, "stderr_tail", &r.stderr_tail, error) || !GetString(doc, "error", &r.error, error)) {
    return std::nullopt;
  }
  if (doc.contains("stdout_tail") && !GetString(doc, "stdout_tail", &r.stdout_tail, error)) return std::nullopt;
  return r;
}

std::optional<ExitRecord> ReadExitRecord(const std::string& state_dir, std::string* error) {
  const std::string path = state_dir + "/" + kExitFile;
  const std::optional<std::string> text = ReadSmallFile(path, error);
  if (!text) return std::nullopt;
  std::optional<ExitRecord> record = ParseExitRecord(*text, error);
  if (!record) *error = path + ": " + *error;
  return record;
}

std::optional<pid_t> ReadQemuPid(const std::string& state_dir, std::string* error) {
  const std::string path = state_dir + "/" + kPidFile;
  const std::optional<std::string> text = ReadSmallFile(path, error);
  if (!text) return std::nullopt;
  // Exactly "<digits>\n": the file is only ever renamed into place complete.
  int64_t pid = 0;
  bool ok = text->size() >= 2 && text->size() <= 12 && text->back() == '\n';
  for (size_t i = 0; ok && i + 1 < text->size(); ++i) {
    const char c = (*text)[i];
    ok = c >= '0' && c <= '9';
    pid = pid * 10 + (c - '0');
  }
  if (!ok || pid <= 0 || pid > INT_MAX) {
    *error = path + ": not a pid";
    return std::nullopt;
  }
  return static_cast<pid_t>(pid);
}

std::optional<std::string> UserIds(const std::string& user) {
  passwd entry{};
  passwd* found = nullptr;
  char buf[4096];
  if (::getpwnam_r(user.c_str(), &entry, buf, sizeof buf, &found) != 0 || found == nullptr) return std::nullopt;
  gid_t groups[kMaxUserGroups];
  int count = kMaxUserGroups;
  if (::getgrouplist(user.c_str(), entry.pw_gid, groups, &count) < 0) return std::nullopt;
  std::string ids = std::to_string(entry.pw_uid) + ":" + std::to_string(entry.pw_gid) + ":";
  for (int i = 0; i < count; ++i) ids += (i == 0 ? "" : ",") + std::to_string(groups[i]);
  return ids;
}

std::vector<std::string> SupervisorArgv(const std::string& supervisor_path, const std::string& state_dir,
                                        const std::string& stdout_path, const std::string& stderr_path,
                                        const std::string& user, const std::vector<std::string>& qemu_argv,
                                        const Placement& placement) {
  std::vector<std::string> argv = {supervisor_path, kArgStateDir, state_dir};
  if (placement.pooled) {
    argv.push_back(kArgPooled);
  } else {
    argv.insert(argv.end(), {kArgStdout, stdout_path, kArgStderr, stderr_path});
  }
  if (!user.empty()) {
    argv.push_back(kArgUser);
    argv.push_back(user);
    if (std::optional<std::string> ids = UserIds(user)) {
      argv.push_back(kArgUserIds);
      argv.push_back(*ids);
    }
  }
  for (const std::string& procs : placement.cgroup_procs) {
    argv.push_back(kArgCgroup);
    argv.push_back(procs);
  }
  if (!placement.netns.empty()) {
    argv.push_back(kArgNetns);
    argv.push_back(placement.netns);
  }
  if (placement.passed_fds > 0) {
    argv.push_back(kArgPassFds);
    argv.push_back(std::to_string(placement.passed_fds));
  }
  if (!placement.swtpm_path.empty()) {
    argv.insert(argv.end(), {kArgSwtpm, placement.swtpm_path, kArgSwtpmState, placement.swtpm_state_dir,
                             kArgSwtpmSocket, placement.swtpm_socket});
  }
  argv.push_back(kArgEndOfOptions);
  argv.insert(argv.end(), qemu_argv.begin(), qemu_argv.end());
  return argv;
}

}  // namespace ndq::supervisor
