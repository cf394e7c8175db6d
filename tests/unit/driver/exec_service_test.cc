// driver/exec_service (ExecTask, ExecTaskStreaming) over real in-process gRPC,
// on a TaskManager that recovered a "running" task (an idle sleep process as
// its supervisor) whose guest agent is a fake serving the task's qga.sock.
#include "driver/exec_service.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../fakes/fake_vm_host.h"
#include "../../support/child_process.h"
#include "../../support/control_channel.h"
#include "../../support/eventually.h"
#include "../../support/temp_dir.h"
#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/unique_fd.h"
#include "host/fingerprint.h"
#include "vm/event_bus.h"

namespace ndq {
namespace {

using nlohmann::json;
using ::ndq::testing::BindUnix;
using ::ndq::testing::ChildProcess;
using ::ndq::testing::Eventually;
using ::ndq::testing::FakeVmHost;
using ::ndq::testing::kGenerous;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

// How the next command ends, as the agent reports it.
struct CommandOutcome {
  int exit_code = 0;
  int signal = 0;  // ended by this signal instead (exit_code unused)
  std::string out, err;
  bool out_truncated = false, err_truncated = false;
  bool hold = false;       // runs until killed
  std::string exec_error;  // guest-exec is refused with this description
};

CommandOutcome Exits(int code, std::string out = "", std::string err = "") {
  CommandOutcome outcome;
  outcome.exit_code = code;
  outcome.out = std::move(out);
  outcome.err = std::move(err);
  return outcome;
}
CommandOutcome KilledBy(int signal) {
  CommandOutcome outcome;
  outcome.signal = signal;
  return outcome;
}
CommandOutcome Held() {
  CommandOutcome outcome;
  outcome.hold = true;
  return outcome;
}
CommandOutcome Refused(std::string desc) {
  CommandOutcome outcome;
  outcome.exec_error = std::move(desc);
  return outcome;
}
CommandOutcome Truncated(CommandOutcome outcome, bool out, bool err) {
  outcome.out_truncated = out;
  outcome.err_truncated = err;
  return outcome;
}

// What guest-exec was asked to run.
struct ExecCall {
  std::string path;
  std::vector<std::string> args;
  std::string input;
};

// qemu-guest-agent as exec uses it, on a unix socket: sync, guest-exec and
// guest-exec-status. `/bin/sh -c "kill -KILL N"` kills command N.
class FakeGuestAgent {
 public:
  explicit FakeGuestAgent(const std::string& path) : listener_(BindUnix(path)) {
    EXPECT_TRUE(listener_.valid()) << path;
    ::listen(listener_.get(), 4);
    int fds[2];
    EXPECT_EQ(::pipe2(fds, O_CLOEXEC), 0);
    stop_read_.reset(fds[0]);
    stop_write_.reset(fds[1]);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeGuestAgent() {
    stop_write_.reset();
    thread_.join();
  }

  void Next(CommandOutcome outcome) {
    absl::MutexLock lock(&mu_);
    next_ = std::move(outcome);
  }
  std::vector<ExecCall> execs() {
    absl::MutexLock lock(&mu_);
    return execs_;
  }
  std::set<int64_t> killed() {
    absl::MutexLock lock(&mu_);
    return killed_;
  }

 private:
  // Whether `fd` has input, false once the test ends.
  bool WaitReadable(int fd) {
    pollfd p[2] = {{fd, POLLIN, 0}, {stop_read_.get(), POLLIN, 0}};
    return ::poll(p, 2, -1) > 0 && p[1].revents == 0;
  }

  void Serve() {
    while (WaitReadable(listener_.get())) {
      const UniqueFd conn(::accept4(listener_.get(), nullptr, nullptr, SOCK_CLOEXEC));
      std::string input;
      char buf[1 << 16];
      ssize_t n;
      while (WaitReadable(conn.get()) && (n = ::read(conn.get(), buf, sizeof buf)) > 0) {
        input.append(buf, static_cast<size_t>(n));
        for (size_t nl; (nl = input.find('\n')) != std::string::npos;) {
          std::string line = input.substr(0, nl);
          input.erase(0, nl + 1);
          line.erase(0, line.find_first_not_of('\xff'));
          const std::string reply = Answer(json::parse(line, nullptr, false)) + "\n";
          if (::send(conn.get(), reply.data(), reply.size(), MSG_NOSIGNAL) < 0) break;
        }
      }
    }
  }

  static std::string Error(const std::string& desc) {
    return json{{"error", {{"class", "GenericError"}, {"desc", desc}}}}.dump();
  }

  std::string Answer(const json& request) {
    if (!request.is_object()) return Error("JSON parse error");
    const std::string command = request.value("execute", "");
    const json args = request.value("arguments", json::object());
    if (command == "guest-sync-delimited") return "\xff" + json{{"return", args.at("id")}}.dump();
    absl::MutexLock lock(&mu_);
    if (command == "guest-exec") return StartCommand(args);
    if (command == "guest-exec-status") return Status(args.value("pid", int64_t{-1}));
    return Error("The command " + command + " has not been found");
  }

  std::string StartCommand(const json& args) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    ExecCall call;
    call.path = args.value("path", "");
    call.args = args.value("arg", std::vector<std::string>{});
    absl::Base64Unescape(args.value("input-data", ""), &call.input);
    const int64_t pid = ++last_pid_;
    if (call.path == "/bin/sh" && call.args.size() == 2 && call.args[1].rfind("kill -KILL ", 0) == 0) {
      killed_.insert(std::stoll(call.args[1].substr(11)));
      running_[pid] = CommandOutcome{};  // the kill itself ends at once
      return json{{"return", {{"pid", pid}}}}.dump();
    }
    if (!next_.exec_error.empty()) return Error(next_.exec_error);
    execs_.push_back(call);
    running_[pid] = next_;
    return json{{"return", {{"pid", pid}}}}.dump();
  }

  std::string Status(int64_t pid) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    auto it = running_.find(pid);
    if (it == running_.end()) return Error("Invalid parameter 'pid'");
    const CommandOutcome outcome = it->second;
    const bool was_killed = killed_.count(pid) > 0;
    if (outcome.hold && !was_killed) return json{{"return", {{"exited", false}}}}.dump();
    running_.erase(it);  // reported: forgotten
    json status = {{"exited", true}};
    if (was_killed || outcome.signal != 0) {
      status["signal"] = was_killed ? 9 : outcome.signal;
    } else {
      status["exitcode"] = outcome.exit_code;
    }
    if (!outcome.out.empty()) status["out-data"] = absl::Base64Escape(outcome.out);
    if (!outcome.err.empty()) status["err-data"] = absl::Base64Escape(outcome.err);
    if (outcome.out_truncated) status["out-truncated"] = true;
    if (outcome.err_truncated) status["err-truncated"] = true;
    return json{{"return", status}}.dump();
  }

  UniqueFd listener_, stop_read_, stop_write_;
  absl::Mutex mu_;
  CommandOutcome next_ ABSL_GUARDED_BY(mu_);
  std::vector<ExecCall> execs_ ABSL_GUARDED_BY(mu_);
  std::map<int64_t, CommandOutcome> running_ ABSL_GUARDED_BY(mu_);
  std::set<int64_t> killed_ ABSL_GUARDED_BY(mu_);
  int64_t last_pid_ ABSL_GUARDED_BY(mu_) = 1000;
  std::thread thread_;
};

// Only the two exec calls, served by the module under test.
class ExecOnlyService : public driverpb::Driver::Service {
 public:
  explicit ExecOnlyService(TaskManager* tasks) : tasks_(tasks) {}
  std::atomic<bool> shutting_down{false};

  grpc::Status ExecTask(grpc::ServerContext* context, const driverpb::ExecTaskRequest* request,
                        driverpb::ExecTaskResponse* response) override {
    return ExecTaskOnce(*tasks_, context, *request, response, [this] { return shutting_down.load(); });
  }
  grpc::Status ExecTaskStreaming(grpc::ServerContext* context, ExecStream* stream) override {
    return ExecTaskStreamed(*tasks_, context, stream, [this] { return shutting_down.load(); });
  }

 private:
  TaskManager* const tasks_;
};

constexpr char kTaskId[] = "a1/web/1";
using Request = driverpb::ExecTaskStreamingRequest;
using Response = driverpb::ExecTaskStreamingResponse;

Request SetupFrame(const std::vector<std::string>& command, const std::string& task = kTaskId, bool tty = false) {
  Request frame;
  frame.mutable_setup()->set_task_id(task);
  for (const std::string& arg : command) frame.mutable_setup()->add_command(arg);
  frame.mutable_setup()->set_tty(tty);
  return frame;
}

Request Stdin(const std::string& data, bool close) {
  Request frame;
  frame.mutable_stdin()->set_data(data);
  frame.mutable_stdin()->set_close(close);
  return frame;
}

// A frame in a line: "stdout: DATA" (its size when long), "stderr closed",
// "exit CODE signal N".
std::string Describe(const Response& frame) {
  if (frame.exited()) return absl::StrCat("exit ", frame.result().exit_code(), " signal ", frame.result().signal());
  const bool out = frame.has_stdout();
  const driverpb::ExecTaskStreamingIOOperation& io = out ? frame.stdout() : frame.stderr();
  const std::string name = out ? "stdout" : "stderr";
  if (io.close()) return name + " closed";
  return io.data().size() > 100 ? absl::StrCat(name, ": ", io.data().size(), " bytes") : name + ": " + io.data();
}

// What a streamed exec sent back.
struct Streamed {
  grpc::Status status;
  std::vector<std::string> frames;  // Describe()d
  std::string out, err;             // the data of all frames
  bool exited = false;
};

// One ExecTaskStreaming call, driven frame by frame as Nomad does.
class ExecSession {
 public:
  explicit ExecSession(driverpb::Driver::Stub& stub) {
    context_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    stream_ = stub.ExecTaskStreaming(&context_);
  }
  void Send(const Request& frame) { stream_->Write(frame); }
  void End() { stream_->WritesDone(); }
  // Reads frames until the exit frame (true) or the end of the call (false).
  bool ReadUntilExit() {
    Response frame;
    while (stream_->Read(&frame)) {
      result_.frames.push_back(Describe(frame));
      result_.out += frame.stdout().data();
      result_.err += frame.stderr().data();
      if (frame.exited()) return result_.exited = true;
    }
    return false;
  }
  // Reads what is left and the call's status.
  Streamed Finish() {
    while (ReadUntilExit()) {
    }
    result_.status = stream_->Finish();
    return result_;
  }

 private:
  grpc::ClientContext context_;
  std::unique_ptr<grpc::ClientReaderWriter<Request, Response>> stream_;
  Streamed result_;
};

class ExecServiceTest : public ::testing::Test {
 protected:
  ExecServiceTest() {
    plugin_.state_dir = state_.path();
    plugin_.image_cache_dir = cache_.path();
    std::filesystem::create_directories(state_ / "vm");
    agent_ = std::make_unique<FakeGuestAgent>(state_ / "vm/qga.sock");
    TaskManagerOptions options;
    options.supervisor_path = "/nonexistent/nomad-qemu-supervisor";
    options.host = &host_;
    tasks_ = std::make_unique<TaskManager>(options, [this] { return plugin_; }, &fingerprinter_, &events_);
    service_ = std::make_unique<ExecOnlyService>(tasks_.get());
    grpc::ServerBuilder builder;
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    stub_ = driverpb::Driver::NewStub(server_->InProcessChannel(grpc::ChannelArguments()));
  }
  ~ExecServiceTest() override { server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(10)); }

  // Registers kTaskId as a VM the plugin found running after a restart.
  void RecoverTask(bool guest_agent, pid_t supervisor) {
    DriverStateRecord record;
    record.state_dir = state_ / "vm";
    record.supervisor_pid = supervisor;
    record.guest_agent = guest_agent;
    record.guest_agent_socket = state_ / "vm/qga.sock";
    const absl::Status recovered = tasks_->Recover(TaskIdentity{kTaskId, "web", "a1"}, record.Encode());
    ASSERT_TRUE(recovered.ok()) << recovered;
  }
  void RecoverRunningTask() { RecoverTask(true, supervisor_.pid()); }

  grpc::Status ExecOnce(const std::vector<std::string>& command, driverpb::ExecTaskResponse* response,
                        absl::Duration timeout = absl::ZeroDuration(), const std::string& task = kTaskId) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    driverpb::ExecTaskRequest request;
    request.set_task_id(task);
    for (const std::string& arg : command) request.add_command(arg);
    request.mutable_timeout()->set_seconds(absl::ToInt64Seconds(timeout));
    request.mutable_timeout()->set_nanos(
        static_cast<int32_t>(absl::ToInt64Nanoseconds(timeout - absl::Seconds(absl::ToInt64Seconds(timeout)))));
    return stub_->ExecTask(&context, request, response);
  }

  // Sends `frames`, ends the stream, and reads everything back.
  Streamed StreamExec(const std::vector<Request>& frames) {
    ExecSession session(*stub_);
    for (const Request& frame : frames) session.Send(frame);
    session.End();
    return session.Finish();
  }

  // Sets the shutdown flag once the agent has started a command.
  std::thread ShutDownOnceStarted() {
    return std::thread([this] {
      EXPECT_TRUE(Eventually([this] { return !agent_->execs().empty(); }, kGenerous));
      service_->shutting_down = true;
    });
  }

  TempDir state_, cache_;
  PluginConfig plugin_;
  FakeVmHost host_;
  Fingerprinter fingerprinter_{std::getenv("PATH") != nullptr ? std::getenv("PATH") : "/usr/bin", "/dev/kvm"};
  EventBus events_;
  ChildProcess supervisor_{{"/bin/sleep", "1000"}};
  std::unique_ptr<FakeGuestAgent> agent_;
  std::unique_ptr<TaskManager> tasks_;
  std::unique_ptr<ExecOnlyService> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<driverpb::Driver::Stub> stub_;
};

// ---------------------------------------------------------------------------
// ExecTask (script checks): one request, one response

class ExecTaskOnceTest : public ExecServiceTest {};

TEST_F(ExecTaskOnceTest, ACommandThatIsMissingOrEmptyIsRefusedBeforeTheTaskIsAsked) {
  RecoverRunningTask();
  for (const std::vector<std::string>& command : {std::vector<std::string>{}, std::vector<std::string>{"", "x"}}) {
    driverpb::ExecTaskResponse response;
    const grpc::Status status = ExecOnce(command, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_EQ(status.error_message(), "exec: no command given");
  }
  EXPECT_THAT(agent_->execs(), IsEmpty());
}

TEST_F(ExecTaskOnceTest, AnUnknownTaskIsNotFound) {
  driverpb::ExecTaskResponse response;
  const grpc::Status status = ExecOnce({"/bin/true"}, &response, absl::ZeroDuration(), "b2/db/1");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("b2/db/1"));
}

TEST_F(ExecTaskOnceTest, ATaskWithoutTheGuestAgentIsAFailedPrecondition) {
  RecoverTask(/*guest_agent=*/false, supervisor_.pid());
  driverpb::ExecTaskResponse response;
  const grpc::Status status = ExecOnce({"/bin/true"}, &response);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("exec runs commands through the guest agent"));
  EXPECT_THAT(status.error_message(), HasSubstr("guest_agent = true"));
}

TEST_F(ExecTaskOnceTest, OutputAndExitCodeComeBackWhole) {
  RecoverRunningTask();
  agent_->Next(Exits(3, "hello\n", "careful\n"));
  driverpb::ExecTaskResponse response;
  const grpc::Status status = ExecOnce({"/bin/echo", "hello", "world"}, &response);
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(response.stdout(), "hello\n");
  EXPECT_EQ(response.stderr(), "careful\n");
  EXPECT_EQ(response.result().exit_code(), 3);
  EXPECT_EQ(response.result().signal(), 0);
  const std::vector<ExecCall> execs = agent_->execs();
  ASSERT_EQ(execs.size(), 1u);
  EXPECT_EQ(execs[0].path, "/bin/echo");
  EXPECT_EQ(execs[0].args, (std::vector<std::string>{"hello", "world"}));
  EXPECT_EQ(execs[0].input, "") << "a script check has no stdin";
}

// As Nomad's own executor reports it: 128 + the signal's number.
TEST_F(ExecTaskOnceTest, ACommandEndedByASignalExitsWith128PlusIt) {
  RecoverRunningTask();
  agent_->Next(KilledBy(15));
  driverpb::ExecTaskResponse response;
  ASSERT_TRUE(ExecOnce({"/bin/sleep", "60"}, &response).ok());
  EXPECT_EQ(response.result().exit_code(), 143);
  EXPECT_EQ(response.result().signal(), 15);
}

TEST_F(ExecTaskOnceTest, WhatTheAgentCutIsSaidAfterTheCommandsStderr) {
  RecoverRunningTask();
  agent_->Next(Truncated(Exits(0, "o", "e\n"), true, true));
  driverpb::ExecTaskResponse response;
  ASSERT_TRUE(ExecOnce({"/bin/yes"}, &response).ok());
  EXPECT_EQ(response.stdout(), "o");
  EXPECT_EQ(response.stderr(),
            "e\n"
            "nomad-driver-qemu: the guest agent kept only the first 16 MiB of stdout\n"
            "nomad-driver-qemu: the guest agent kept only the first 16 MiB of stderr\n");
}

TEST_F(ExecTaskOnceTest, ACommandPastItsTimeoutIsKilledInTheGuest) {
  RecoverRunningTask();
  agent_->Next(Held());
  driverpb::ExecTaskResponse response;
  const absl::Time start = absl::Now();
  const grpc::Status status = ExecOnce({"/bin/sleep", "60"}, &response, absl::Milliseconds(300));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED);
  EXPECT_EQ(status.error_message(), "exec of /bin/sleep ran past its timeout and was killed in the guest");
  EXPECT_EQ(agent_->killed(), (std::set<int64_t>{1001})) << "the command's guest pid";
}

TEST_F(ExecTaskOnceTest, ThePluginShuttingDownCancelsAndKillsTheCommand) {
  RecoverRunningTask();
  agent_->Next(Held());
  std::thread stopper = ShutDownOnceStarted();
  driverpb::ExecTaskResponse response;
  const grpc::Status status = ExecOnce({"/bin/sleep", "60"}, &response);
  stopper.join();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(status.error_message(), "exec of /bin/sleep was cancelled and killed in the guest");
  EXPECT_EQ(agent_->killed(), (std::set<int64_t>{1001}));
}

// ---------------------------------------------------------------------------
// ExecTaskStreaming (`nomad alloc exec`)

class ExecTaskStreamingTest : public ExecServiceTest {};

TEST_F(ExecTaskStreamingTest, AStreamEndedBeforeAnyFrameIsCancelled) {
  const Streamed r = StreamExec({});
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(r.status.error_message(), "exec: the stream ended at once");
  EXPECT_THAT(r.frames, IsEmpty());
}

TEST_F(ExecTaskStreamingTest, BadSetupsAreRefusedBeforeTheTaskIsAsked) {
  RecoverRunningTask();
  struct Case {
    Request first;
    std::string message;
  };
  const std::vector<Case> cases = {
      {Stdin("ls\n", false), "exec: the first frame of the stream carries no setup"},
      {SetupFrame({}), "exec: no command given"},
      {SetupFrame({"", "-c", "ls"}), "exec: no command given"},
      {SetupFrame({"/bin/sh"}, kTaskId, /*tty=*/true), "a terminal (tty) is not supported through the guest agent"}};
  for (const Case& c : cases) {
    const Streamed r = StreamExec({c.first, Stdin("", true)});
    EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << c.message;
    EXPECT_THAT(r.status.error_message(), HasSubstr(c.message));
    EXPECT_THAT(r.frames, IsEmpty()) << c.message;
  }
  EXPECT_THAT(agent_->execs(), IsEmpty());
}

TEST_F(ExecTaskStreamingTest, ATerminalIsRefusedWithTheWaysThatWork) {
  RecoverRunningTask();
  const Streamed r = StreamExec({SetupFrame({"/bin/sh"}, kTaskId, /*tty=*/true)});
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("nomad alloc exec -t=false"));
  EXPECT_THAT(r.status.error_message(), HasSubstr("console = true"));
}

TEST_F(ExecTaskStreamingTest, TasksThatCannotExecFailTheCallWithoutFrames) {
  const Streamed unknown = StreamExec({SetupFrame({"/bin/true"}, "b2/db/1"), Stdin("", true)});
  EXPECT_EQ(unknown.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(unknown.status.error_message(), HasSubstr("b2/db/1"));
  EXPECT_THAT(unknown.frames, IsEmpty());
  RecoverTask(/*guest_agent=*/true, /*supervisor=*/999999999);  // the VM ended while the plugin was away
  const Streamed exited = StreamExec({SetupFrame({"/bin/true"}), Stdin("", true)});
  EXPECT_EQ(exited.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(exited.status.error_message(), HasSubstr("has exited"));
  EXPECT_THAT(exited.frames, IsEmpty());
  EXPECT_THAT(agent_->execs(), IsEmpty());
}

// Stdin is gathered until Nomad closes it (terminal sizes mean nothing
// here); the output comes first, then both streams close, then the exit.
TEST_F(ExecTaskStreamingTest, StdinGoesWholeAndTheFramesEndWithClosesAndTheExit) {
  RecoverRunningTask();
  agent_->Next(Exits(2, "out", "err"));
  Request resize;
  resize.mutable_tty_size()->set_height(24);
  resize.mutable_tty_size()->set_width(80);
  const Streamed r = StreamExec({SetupFrame({"/bin/cat", "-"}), resize, Stdin("ab", false), Stdin("c", true)});
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_THAT(r.frames, ::testing::ElementsAre("stdout: out", "stderr: err", "stdout closed", "stderr closed",
                                               "exit 2 signal 0"));
  const std::vector<ExecCall> execs = agent_->execs();
  ASSERT_EQ(execs.size(), 1u);
  EXPECT_EQ(execs[0].path, "/bin/cat");
  EXPECT_EQ(execs[0].args, std::vector<std::string>{"-"});
  EXPECT_EQ(execs[0].input, "abc");
}

TEST_F(ExecTaskStreamingTest, LongOutputGoesIn64KiBFrames) {
  RecoverRunningTask();
  std::string output(150000, '\0');
  for (size_t i = 0; i < output.size(); ++i) output[i] = static_cast<char>('A' + i % 26);
  agent_->Next(Truncated(Exits(0, output), true, false));
  const Streamed r = StreamExec({SetupFrame({"/bin/cat", "big"}), Stdin("", true)});
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_THAT(r.frames, ::testing::ElementsAre(
                            "stdout: 65536 bytes", "stdout: 65536 bytes", "stdout: 18928 bytes",
                            "stderr: nomad-driver-qemu: the guest agent kept only the first 16 MiB of stdout\n",
                            "stdout closed", "stderr closed", "exit 0 signal 0"));
  EXPECT_TRUE(r.out == output) << "the frames joined are the output";
}

// An interactive shell that types nothing: the command starts once stdin has
// been quiet for kStdinQuiet, with what came before.
TEST_F(ExecTaskStreamingTest, StdinThatGoesQuietStartsTheCommandWithWhatCame) {
  RecoverRunningTask();
  agent_->Next(Exits(0, "ran"));
  ExecSession session(*stub_);
  session.Send(SetupFrame({"/bin/sh"}));
  session.Send(Stdin("echo ran\n", false));
  const absl::Time typed = absl::Now();
  ASSERT_TRUE(session.ReadUntilExit());
  const absl::Duration waited = absl::Now() - typed;
  session.End();
  const Streamed r = session.Finish();
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_GE(waited, kStdinQuiet);
  EXPECT_LT(waited, kStdinQuiet + absl::Seconds(5));
  EXPECT_EQ(r.out, "ran");
  const std::vector<ExecCall> execs = agent_->execs();
  ASSERT_EQ(execs.size(), 1u);
  EXPECT_EQ(execs[0].input, "echo ran\n");
}

// The command cannot run: the stream is past its start, so the reason is
// said on stderr and the exit is a shell's (126), not a failed call.
TEST_F(ExecTaskStreamingTest, StdinOverTheLimitEndsWithExit126WithoutRunning) {
  RecoverRunningTask();
  std::vector<Request> frames = {SetupFrame({"/bin/cat"})};
  const std::string mib(1 << 20, 'x');
  for (size_t sent = 0; sent <= GuestExec::kMaxStdin; sent += mib.size()) frames.push_back(Stdin(mib, false));
  frames.push_back(Stdin("", true));
  const Streamed r = StreamExec(frames);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.err,
            "nomad-driver-qemu: exec: stdin is over 16 MiB, the most the driver passes to the guest agent\n");
  ASSERT_GE(r.frames.size(), 3u);
  EXPECT_THAT(std::vector<std::string>(r.frames.end() - 3, r.frames.end()),
              ::testing::ElementsAre("stdout closed", "stderr closed", "exit 126 signal 0"));
  EXPECT_THAT(agent_->execs(), IsEmpty());
}

TEST_F(ExecTaskStreamingTest, AProgramTheGuestLacksExits127AndOtherRefusals126) {
  RecoverRunningTask();
  const std::vector<std::pair<std::string, int>> refusals = {
      {"Failed to execute child process \u201cnope\u201d (No such file or directory)", 127},
      {"Failed to execute child process \u201cnope\u201d (Permission denied)", 126}};
  for (const auto& [desc, code] : refusals) {
    agent_->Next(Refused(desc));
    const Streamed r = StreamExec({SetupFrame({"nope", "-v"}), Stdin("", true)});
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
    EXPECT_THAT(r.err, ::testing::StartsWith("nomad-driver-qemu: guest exec of nope: "));
    EXPECT_THAT(r.err, HasSubstr(desc));
    ASSERT_FALSE(r.frames.empty());
    EXPECT_EQ(r.frames.back(), absl::StrCat("exit ", code, " signal 0"));
  }
}

TEST_F(ExecTaskStreamingTest, ThePluginShuttingDownCancelsTheStreamAndKillsTheCommand) {
  RecoverRunningTask();
  agent_->Next(Held());
  ExecSession session(*stub_);
  session.Send(SetupFrame({"/bin/sleep", "60"}));
  session.Send(Stdin("", true));
  std::thread stopper = ShutDownOnceStarted();
  stopper.join();
  session.End();
  const Streamed r = session.Finish();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_EQ(r.status.error_message(), "exec of /bin/sleep was cancelled and killed in the guest");
  EXPECT_FALSE(r.exited) << "no exit frame for a command that did not end by itself";
  EXPECT_EQ(agent_->killed(), (std::set<int64_t>{1001}));
}

}  // namespace
}  // namespace ndq
