// The console you can see, end to end: the real plugin, supervisor, QEMU
// (TCG) and the test guest. console = true puts the guest's ttyS1 shell and
// QEMU's VNC server on unix sockets in the task dir; SIGUSR2 writes a PNG of
// the screen into the alloc's log dir; boot_timeout fails a guest that never
// answers, with the screenshot and the serial console's last lines.
#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <set>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "../support/event_recorder.h"
#include "../support/guest_task.h"
#include "../support/plugin_harness.h"
#include "../support/temp_dir.h"
#include "../support/test_guest.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

namespace fs = std::filesystem;
using ::ndq::testing::AddTaskPort;
using ::ndq::testing::EventRecorder;
using ::ndq::testing::FakeAlloc;
using ::ndq::testing::FreePort;
using ::ndq::testing::Guest;
using ::ndq::testing::Listing;
using ::ndq::testing::kGuestBootTimeout;
using ::ndq::testing::PluginHarness;
using ::ndq::testing::ProcessesMentioning;
using ::ndq::testing::ReadFile;
using ::ndq::testing::RecordedEvent;
using ::ndq::testing::TempDir;
using ::ndq::testing::TestGuestDir;
using ::ndq::testing::WaitForFileToContain;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;
using json = nlohmann::json;

bool IsSocket(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}

// Types `command` into the serial console socket and reads until `expected`
// appears (the terminal echoes the command too, so `expected` must not be
// in it); returns everything read.
std::string TypeIntoSerial(const std::string& socket_path, const std::string& command, const std::string& expected,
                           absl::Duration timeout) {
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::strncpy(addr.sun_path, socket_path.c_str(), sizeof addr.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return "connect failed: " + std::string(std::strerror(errno));
  }
  std::string seen;
  const absl::Time deadline = absl::Now() + timeout;
  absl::Time next_send = absl::Now();
  while (absl::Now() < deadline && seen.find(expected) == std::string::npos) {
    // Sent again every few seconds: a shell that is restarting may miss it.
    if (absl::Now() >= next_send) {
      const std::string line = command + "\n";
      if (::send(fd, line.data(), line.size(), MSG_NOSIGNAL) < 0) break;
      next_send = absl::Now() + absl::Seconds(3);
    }
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 200) == 1) {
      char buf[4096];
      const ssize_t n = ::recv(fd, buf, sizeof buf, 0);
      if (n <= 0) break;
      seen.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return seen;
}

uint32_t BigEndian32(const std::string& s, size_t at) {
  return (uint32_t{static_cast<unsigned char>(s[at])} << 24) | (uint32_t{static_cast<unsigned char>(s[at + 1])} << 16) |
         (uint32_t{static_cast<unsigned char>(s[at + 2])} << 8) | uint32_t{static_cast<unsigned char>(s[at + 3])};
}

// A PNG's signature and IHDR size; "" when it is one, else what is wrong.
std::string CheckPng(const std::string& png, uint32_t* width, uint32_t* height) {
  if (png.size() < 33 || png.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0) return "no PNG signature";
  if (png.compare(12, 4, "IHDR") != 0) return "first chunk is not IHDR";
  *width = BigEndian32(png, 16);
  *height = BigEndian32(png, 20);
  return "";
}

// Inflates the PNG's image data (python3's zlib) and counts bright bytes,
// i.e. text on the screen: ≈4500 at GUEST-READY (SeaBIOS, SYSLINUX and the
// guest's line), 711 for the blank 640x480 screen before boot (QEMU -S).
int BrightBytes(const std::string& path) {
  const std::string script =
      "import sys,zlib,struct\n"
      "d=open(sys.argv[1],'rb').read(); i=8; idat=b''\n"
      "while i < len(d):\n"
      "  n,t=struct.unpack('>I4s',d[i:i+8]); idat+=d[i+8:i+8+n] if t==b'IDAT' else b''; i+=12+n\n"
      "print(sum(1 for b in zlib.decompress(idat) if b>128))\n";
  auto out = RunCommand({"/usr/bin/python3", "-c", script, path}, absl::Seconds(30));
  if (!out.ok() || out->exit_code != 0) return -1;
  int count = -1;
  return absl::SimpleAtoi(absl::StripAsciiWhitespace(out->output), &count) ? count : -1;
}

std::string Annotation(EventRecorder& events, const std::string& task_id, const std::string& needle,
                       const std::string& key) {
  for (const RecordedEvent& e : events.Events()) {
    if (e.task_id == task_id && e.message.find(needle) != std::string::npos && e.annotations.count(key)) {
      return e.annotations.at(key);
    }
  }
  return "";
}

class VmConsoleTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(TestGuestDir().ok()) << TestGuestDir().status();
    state_dir_ = state_.path() + "/s";
    harness_ = std::make_unique<PluginHarness>(state_dir_, json{{"image_paths", {*TestGuestDir()}}});
  }
  void TearDown() override {
    ::ndq::testing::KillVmsUnder(state_dir_);
    harness_.reset();
  }

  std::string Start(FakeAlloc& alloc, const json& config, driverpb::TaskHandle* handle, int port) {
    driverpb::TaskConfig task = alloc.Task(config);
    AddTaskPort(&task, "http", port);
    const grpc::Status status = harness_->Start(task, handle);
    return status.ok() ? "" : status.error_message();
  }

  TempDir state_;
  std::string state_dir_;
  std::unique_ptr<PluginHarness> harness_;
};

json BaseConfig(const std::string& image) {
  return {{"accelerator", "tcg"}, {"image_path", Guest(image)}, {"port_map", {{{"http", 80}}}}};
}

// For a VM that boots: its own overlay, never the shared image (which QEMU
// locks for writing, so two tests booting it at once would collide).
json BootConfig(FakeAlloc& alloc, const std::string& image) {
  json config = BaseConfig(image);
  alloc.AddOverlay(Guest(image));
  config["image_path"] = "local/disk.qcow2";
  return config;
}

// console = true: both sockets in the task dir; a command typed into ttyS1
// runs; the task log (ttyS0) still gets the boot messages; the boot watch
// sees port "http" answer; SIGUSR2 writes the screen as a PNG into the log
// dir, named in an event; the sockets are gone after the stop.
TEST_F(VmConsoleTest, ConsoleSocketsScreenshotAndReadyPort) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("web");
  json config = BootConfig(alloc, "guest.qcow2");
  config["console"] = true;
  config["boot_timeout"] = "90s";
  config["boot_ready_port"] = "http";
  driverpb::TaskHandle handle;
  ASSERT_EQ(Start(alloc, config, &handle, FreePort()), "");
  const std::string id = handle.config().id();
  const std::string serial = alloc.task_dir() + "/console/serial.sock";
  const std::string vnc = alloc.task_dir() + "/console/vnc.sock";
  EXPECT_TRUE(IsSocket(serial));
  EXPECT_TRUE(IsSocket(vnc));
  EXPECT_TRUE(events.WaitFor(id, "Console: serial (ttyS1) on " + serial, absl::Seconds(5)));
  const absl::Time started = absl::Now();
  ASSERT_TRUE(WaitForFileToContain(alloc.stdout_path(), "GUEST-READY", kGuestBootTimeout))
      << "the task log keeps the serial console (ttyS0):\n" << ReadFile(alloc.stdout_path());
  std::cerr << "GUEST-READY in the task log " << absl::Now() - started << " after StartTask returned\n";
  EXPECT_TRUE(events.WaitFor(id, "Guest ready: port \"http\" answered", absl::Seconds(30)));
  for (const std::string& message : events.Messages(id)) {
    if (message.rfind("Guest ready", 0) == 0) std::cerr << message << "\n";
  }

  const std::string typed = TypeIntoSerial(serial, "echo ndq-$((1000+234))-marker", "ndq-1234-marker", absl::Seconds(20));
  EXPECT_THAT(typed, HasSubstr("ndq-1234-marker")) << typed;
  EXPECT_THAT(ReadFile(alloc.stdout_path()), Not(HasSubstr("ndq-1234-marker"))) << "ttyS1 is not the task log";

  ASSERT_TRUE(harness_->Signal(id, "SIGUSR2").ok());
  ASSERT_TRUE(events.WaitFor(id, "Screenshot of the VM's display: ", absl::Seconds(10)));
  const std::string shot = Annotation(events, id, "Screenshot of the VM's display", "screenshot");
  EXPECT_EQ(fs::path(shot).parent_path(), fs::path(alloc.alloc_dir() + "/alloc/logs"));
  EXPECT_THAT(fs::path(shot).filename().string(), ::testing::StartsWith("web.screenshot."));
  const std::string png = ReadFile(shot);
  uint32_t width = 0, height = 0;
  EXPECT_EQ(CheckPng(png, &width, &height), "");
  EXPECT_EQ(width, 720u) << "text mode";
  EXPECT_EQ(height, 400u);
  EXPECT_GT(BrightBytes(shot), 3000) << "the screen shows the guest's text";
  if (const char* keep = std::getenv("NDQ_KEEP_SCREENSHOT"); keep != nullptr) fs::copy_file(shot, keep);

  // A link planted in place of alloc/logs (a guest with a share of alloc/
  // could) is not followed: no screenshot, nothing written elsewhere.
  TempDir elsewhere;
  const std::string logs = alloc.alloc_dir() + "/alloc/logs";
  fs::rename(logs, logs + ".real");
  fs::create_directory_symlink(elsewhere.path(), logs);
  const grpc::Status refused = harness_->Signal(id, "SIGUSR2");
  fs::remove(logs);
  fs::rename(logs + ".real", logs);
  EXPECT_FALSE(refused.ok());
  EXPECT_THAT(refused.error_message(), HasSubstr("screenshot (SIGUSR2): cannot open"));
  EXPECT_THAT(Listing(elsewhere.path()), IsEmpty());

  ASSERT_TRUE(harness_->Stop(id, absl::Seconds(20)).ok());
  EXPECT_FALSE(fs::exists(alloc.task_dir() + "/console")) << "sockets removed with the VM";
  ASSERT_TRUE(harness_->Destroy(id, true).ok());
  EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
}

// A guest that never answers fails at boot_timeout: WaitTask's error names
// the screenshot and holds the serial console's last lines; the VM is gone.
TEST_F(VmConsoleTest, GuestThatNeverAnswersFailsAtBootTimeout) {
  EventRecorder events(harness_->client());
  FakeAlloc alloc("hang");
  json config = BootConfig(alloc, "guest-hang.qcow2");
  config["boot_timeout"] = "20s";
  config["boot_ready_port"] = "http";
  driverpb::TaskHandle handle;
  const absl::Time started = absl::Now();
  ASSERT_EQ(Start(alloc, config, &handle, FreePort()), "");
  const std::string id = handle.config().id();
  driverpb::WaitTaskResponse wait;
  ASSERT_TRUE(harness_->Wait(id, &wait, absl::Seconds(90)).ok());
  const absl::Duration took = absl::Now() - started;
  std::cerr << "boot timeout failed the task after " << took << "\n";
  EXPECT_GE(took, absl::Seconds(20));
  EXPECT_LT(took, absl::Seconds(40));
  const std::string& err = wait.err();
  EXPECT_THAT(err, HasSubstr("did not become ready within boot_timeout 20s"));
  EXPECT_THAT(err, HasSubstr("port \"http\""));
  EXPECT_THAT(err, HasSubstr("GUEST-HANG")) << "the serial console's last lines";
  const std::string logs = alloc.alloc_dir() + "/alloc/logs/";
  const size_t at = err.find(logs);
  ASSERT_NE(at, std::string::npos) << err;
  const std::string shot = err.substr(at, err.find(".png", at) + 4 - at);
  uint32_t width = 0, height = 0;
  EXPECT_EQ(CheckPng(ReadFile(shot), &width, &height), "") << shot;
  EXPECT_TRUE(events.WaitFor(id, "Boot timeout: ", absl::Seconds(5)));
  EXPECT_EQ(Annotation(events, id, "Boot timeout: ", "screenshot"), shot);
  ASSERT_TRUE(harness_->Destroy(id, true).ok());
  EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
  EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
}

// Hostile or wrong options: refused at StartTask naming the field, nothing left.
TEST_F(VmConsoleTest, BadConsoleOptionsAreRefusedAndLeaveNothing) {
  FakeAlloc alloc("bad");
  FakeAlloc long_alloc(std::string(100, 'n'));  // the task dir makes socket paths over 107 bytes
  const std::set<std::string> before = Listing(alloc.task_dir());
  const std::set<std::string> long_before = Listing(long_alloc.task_dir());
  const std::vector<std::pair<json, std::string>> cases = {
      {{{"boot_timeout", "soon"}}, "\"boot_timeout\": \"soon\" is not a duration"},
      {{{"boot_timeout", "-5s"}, {"guest_agent", true}}, "\"boot_timeout\": \"-5s\" is out of range"},
      {{{"boot_timeout", "100000h"}, {"guest_agent", true}}, "\"boot_timeout\": \"100000h\" is out of range"},
      {{{"boot_timeout", "inf"}, {"guest_agent", true}}, "\"boot_timeout\": \"inf\" is not a duration"},
      {{{"boot_timeout", "30s"}}, "\"boot_timeout\": needs something that answers"},
      {{{"boot_timeout", "30s"}, {"boot_ready_port", "ssh"}}, "\"boot_ready_port\": \"ssh\" is not a port_map label"},
      {{{"boot_ready_port", "http"}}, "\"boot_ready_port\": needs boot_timeout"},
  };
  for (const auto& [extra, expected] : cases) {
    SCOPED_TRACE(extra.dump());
    json config = BaseConfig("guest.qcow2");
    for (const auto& [key, value] : extra.items()) config[key] = value;
    driverpb::TaskHandle handle;
    EXPECT_THAT(Start(alloc, config, &handle, FreePort()), HasSubstr(expected));
    EXPECT_EQ(Listing(alloc.task_dir()), before);
  }
  json config = BaseConfig("guest.qcow2");
  config["console"] = true;
  driverpb::TaskHandle handle;
  const std::string error = Start(long_alloc, config, &handle, FreePort());
  EXPECT_THAT(error, HasSubstr("task config \"console\": the console socket"));
  EXPECT_THAT(error, HasSubstr("over the unix socket limit of 107"));
  EXPECT_EQ(Listing(long_alloc.task_dir()), long_before);
  EXPECT_THAT(::ndq::testing::VmStateLeft(state_dir_), IsEmpty());
  EXPECT_THAT(ProcessesMentioning(state_dir_), IsEmpty());
}

}  // namespace
}  // namespace ndq
