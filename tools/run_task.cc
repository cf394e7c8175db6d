#include "run_task.h"

#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>

#include <curl/curl.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace ndq::ctl {
namespace {

namespace driverpb = hashicorp::nomad::plugins::drivers::proto;

std::atomic<bool> interrupted{false};

void Step(const std::string& text) {
  std::printf("==> %s\n", text.c_str());
  std::fflush(stdout);
}

int FreeLoopbackPort() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

size_t AppendBody(char* data, size_t size, size_t n, void* out) {
  static_cast<std::string*>(out)->append(data, size * n);
  return size * n;
}

// GET url; the body on HTTP 200.
absl::StatusOr<std::string> HttpGet(const std::string& url) {
  CURL* curl = curl_easy_init();
  std::string body;
  curl_easy_setopt(curl, CURLOPT_URL, url.c_str());
  curl_easy_setopt(curl, CURLOPT_TIMEOUT, 5L);
  curl_easy_setopt(curl, CURLOPT_WRITEFUNCTION, AppendBody);
  curl_easy_setopt(curl, CURLOPT_WRITEDATA, &body);
  const CURLcode rc = curl_easy_perform(curl);
  long code = 0;
  curl_easy_getinfo(curl, CURLINFO_RESPONSE_CODE, &code);
  curl_easy_cleanup(curl);
  if (rc != CURLE_OK) return absl::UnavailableError(curl_easy_strerror(rc));
  if (code != 200) return absl::UnavailableError(absl::StrCat("HTTP ", code));
  return body;
}

std::string RandomHex(int digits) {
  std::random_device rd;
  std::string out;
  for (int i = 0; i < digits; ++i) out += "0123456789abcdef"[rd() % 16];
  return out;
}

grpc::Status StopTask(nomadplugin::DriverClient& client, const std::string& id, double timeout_s) {
  auto context = client.NewContext(absl::Seconds(timeout_s + 30));
  driverpb::StopTaskRequest request;
  request.set_task_id(id);
  request.mutable_timeout()->set_seconds(static_cast<int64_t>(timeout_s));
  request.mutable_timeout()->set_nanos(static_cast<int32_t>((timeout_s - static_cast<int64_t>(timeout_s)) * 1e9));
  driverpb::StopTaskResponse response;
  return client.driver().StopTask(context.get(), request, &response);
}

}  // namespace

absl::StatusOr<driverpb::TaskConfig> TaskFromFile(const nlohmann::json& file, const std::string& alloc_dir) {
  if (!file.is_object()) return absl::InvalidArgumentError("task file must be a JSON object");
  const std::string name = file.value("name", "vm");
  driverpb::TaskConfig task;
  const std::string alloc_id = absl::StrCat(RandomHex(8), "-", RandomHex(4), "-", RandomHex(4), "-", RandomHex(4),
                                            "-", RandomHex(12));
  task.set_id(absl::StrCat(alloc_id, "/", name, "/", RandomHex(8)));
  task.set_name(name);
  task.set_alloc_id(alloc_id);
  task.set_alloc_dir(alloc_dir);
  task.set_job_name(file.value("job", "qemu-driverctl"));
  task.set_task_group_name(name);
  task.set_stdout_path(absl::StrCat(alloc_dir, "/alloc/logs/", name, ".stdout.0"));
  task.set_stderr_path(absl::StrCat(alloc_dir, "/alloc/logs/", name, ".stderr.0"));
  std::error_code error;
  std::filesystem::create_directories(absl::StrCat(alloc_dir, "/alloc/logs"), error);
  std::filesystem::create_directories(absl::StrCat(alloc_dir, "/", name, "/local"), error);
  if (error) return absl::InternalError(absl::StrCat("cannot create ", alloc_dir, ": ", error.message()));

  auto* resources = task.mutable_resources();
  resources->mutable_allocated_resources()->mutable_memory()->set_memory_mb(file.value("memory_mb", 256));
  if (file.contains("cpuset")) resources->mutable_linux_resources()->set_cpuset_cpus(file["cpuset"].get<std::string>());
  if (file.contains("ports")) {
    auto* network = resources->mutable_allocated_resources()->add_networks();
    network->set_ip("127.0.0.1");
    for (const auto& [label, value] : file["ports"].items()) {
      auto* port = network->add_dynamic_ports();
      port->set_label(label);
      port->set_value(value.get<int>() == 0 ? FreeLoopbackPort() : value.get<int>());
    }
  }
  const std::vector<uint8_t> msgpack = nlohmann::json::to_msgpack(file.value("config", nlohmann::json::object()));
  task.set_msgpack_driver_config(std::string(msgpack.begin(), msgpack.end()));
  return task;
}

int RunTask(nomadplugin::DriverClient& client, const RunOptions& options) {
  std::ifstream in(options.task_file);
  const nlohmann::json file = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (file.is_discarded()) {
    std::fprintf(stderr, "qemu-driverctl: %s is not valid JSON\n", options.task_file.c_str());
    return 1;
  }
  std::string alloc_dir = options.alloc_dir;
  if (alloc_dir.empty()) {
    std::string templ = (std::filesystem::temp_directory_path() / "qemu-driverctl-XXXXXX").string();
    alloc_dir = ::mkdtemp(templ.data());
  }
  absl::StatusOr<driverpb::TaskConfig> task = TaskFromFile(file, alloc_dir);
  if (!task.ok()) {
    std::fprintf(stderr, "qemu-driverctl: %s\n", std::string(task.status().message()).c_str());
    return 1;
  }
  const std::string id = task->id();

  Step(absl::StrCat("StartTask ", id, " (alloc dir ", alloc_dir, ")"));
  const absl::Time start = absl::Now();
  driverpb::StartTaskRequest start_request;
  *start_request.mutable_task() = *task;
  driverpb::StartTaskResponse started;
  grpc::Status status = client.driver().StartTask(client.NewContext().get(), start_request, &started);
  if (!status.ok()) {
    std::fprintf(stderr, "qemu-driverctl: StartTask failed: %s\n", status.error_message().c_str());
    return 1;
  }
  driverpb::InspectTaskRequest inspect_request;
  inspect_request.set_task_id(id);
  driverpb::InspectTaskResponse inspected;
  client.driver().InspectTask(client.NewContext().get(), inspect_request, &inspected);
  Step(absl::StrFormat("VM running after %.0f ms: qemu pid %s, serial console in %s",
                       absl::ToDoubleMilliseconds(absl::Now() - start),
                       inspected.driver().attributes().count("qemu_pid") ? inspected.driver().attributes().at("qemu_pid")
                                                                         : "?",
                       task->stdout_path()));
  for (const auto& port : task->resources().allocated_resources().networks(0).dynamic_ports()) {
    Step(absl::StrCat("port ", port.label(), " -> 127.0.0.1:", port.value()));
  }

  if (!options.check_http.empty()) {
    int host_port = 0;
    for (const auto& port : task->resources().allocated_resources().networks(0).dynamic_ports()) {
      if (port.label() == options.check_http) host_port = port.value();
    }
    if (host_port == 0) {
      std::fprintf(stderr, "qemu-driverctl: no port labelled %s\n", options.check_http.c_str());
    } else {
      const std::string url = absl::StrCat("http://127.0.0.1:", host_port, "/");
      Step(absl::StrCat("waiting for the guest to serve ", url));
      const absl::Time deadline = absl::Now() + absl::Seconds(180);
      absl::StatusOr<std::string> body = absl::UnavailableError("not tried");
      while (absl::Now() < deadline && !(body = HttpGet(url)).ok()) absl::SleepFor(absl::Milliseconds(250));
      if (body.ok()) {
        Step(absl::StrCat("GET ", url, " -> ", *body));
      } else {
        std::fprintf(stderr, "qemu-driverctl: no answer from %s: %s\n", url.c_str(),
                     std::string(body.status().message()).c_str());
      }
    }
  } else {
    Step("running; press Ctrl-C to stop the VM");
    ::signal(SIGINT, [](int) { interrupted = true; });
    driverpb::WaitTaskRequest wait_request;
    wait_request.set_task_id(id);
    while (!interrupted) {
      driverpb::WaitTaskResponse waited;
      auto context = client.NewContext(absl::Milliseconds(500));
      if (client.driver().WaitTask(context.get(), wait_request, &waited).ok()) break;
    }
  }

  Step(absl::StrCat("StopTask (graceful shutdown, kill timeout ", options.kill_timeout_s, " s)"));
  const absl::Time stop = absl::Now();
  status = StopTask(client, id, options.kill_timeout_s);
  if (!status.ok()) std::fprintf(stderr, "qemu-driverctl: StopTask: %s\n", status.error_message().c_str());
  driverpb::WaitTaskRequest wait_request;
  wait_request.set_task_id(id);
  driverpb::WaitTaskResponse waited;
  status = client.driver().WaitTask(client.NewContext(absl::Seconds(30)).get(), wait_request, &waited);
  Step(absl::StrFormat("VM exited after %.0f ms: exit code %d, signal %d%s",
                       absl::ToDoubleMilliseconds(absl::Now() - stop), waited.result().exit_code(),
                       waited.result().signal(), waited.err().empty() ? "" : " (" + waited.err() + ")"));
  driverpb::DestroyTaskRequest destroy;
  destroy.set_task_id(id);
  destroy.set_force(true);
  driverpb::DestroyTaskResponse destroyed;
  client.driver().DestroyTask(client.NewContext().get(), destroy, &destroyed);
  Step("DestroyTask: state cleaned up");
  return status.ok() && waited.result().exit_code() == 0 ? 0 : 1;
}

}  // namespace ndq::ctl
