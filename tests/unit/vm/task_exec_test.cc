// vm/task_exec: `nomad alloc exec` into a VM, through a VmTask whose guest
// agent is a fake qemu-ga on a real unix socket that runs pretend programs
// (tests/support/fake_agent_socket.h), so deadlines, cancellation and kills
// can be checked without QEMU.
#include "vm/task_exec.h"

#include <atomic>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "../../support/fake_agent_socket.h"
#include "../../support/temp_dir.h"
#include "absl/strings/escaping.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"

namespace ndq {
namespace {

using ::ndq::testing::FakeAgentSocket;
using ::ndq::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::Pair;
using json = nlohmann::json;

json Error(const std::string& desc) { return {{"error", {{"class", "GenericError"}, {"desc", desc}}}}; }

// The guest's side of guest-exec, by program: /bin/echo exits 3 at once,
// writing its arguments to stdout and its stdin to stderr; /bin/sleep runs
// until `kill -KILL` through /bin/sh; /bin/crash breaks the agent's session
// when asked how it is; anything else is not installed. Pids start at 100.
// Used on the agent's thread only.
class GuestPrograms {
 public:
  std::atomic<bool> has_shell{true};

  json Answer(const json& request) {
    const std::string command = request.value("execute", "");
    if (command == "guest-exec") return Exec(request["arguments"]);
    if (command == "guest-exec-status") return Status(request["arguments"]["pid"].get<int64_t>());
    return Error("unexpected command " + command);
  }

 private:
  struct Process {
    std::string path;
    std::vector<std::string> args;
    std::string input;
    bool killed = false;
  };

  json Exec(const json& args) {
    Process process{args["path"].get<std::string>(), args.value("arg", std::vector<std::string>{}), "", false};
    const bool installed = process.path == "/bin/echo" || process.path == "/bin/sleep" ||
                           process.path == "/bin/crash" || (process.path == "/bin/sh" && has_shell);
    if (!installed) {
      return Error("Failed to execute child process \u201c" + process.path + "\u201d (No such file or directory)");
    }
    if (args.contains("input-data")) absl::Base64Unescape(args["input-data"].get<std::string>(), &process.input);
    int64_t victim = 0;
    if (process.path == "/bin/sh" && process.args.size() == 2 && absl::StartsWith(process.args[1], "kill -KILL ") &&
        absl::SimpleAtoi(process.args[1].substr(11), &victim) && processes_.count(victim)) {
      processes_[victim].killed = true;
    }
    processes_[next_pid_] = std::move(process);
    return {{"return", {{"pid", next_pid_++}}}};
  }

  json Status(int64_t pid) {
    auto it = processes_.find(pid);
    if (it == processes_.end()) return Error("Invalid parameter 'pid'");
    const Process& p = it->second;
    if (p.path == "/bin/crash") return FakeAgentSocket::HangUp();
    if (p.path == "/bin/sleep" && !p.killed) return {{"return", {{"exited", false}}}};
    json status = {{"exited", true}};
    if (p.path == "/bin/sleep") {
      status["signal"] = 9;
    } else if (p.path == "/bin/sh") {
      status["exitcode"] = 0;
    } else {
      status["exitcode"] = 3;
      status["out-data"] = absl::Base64Escape(absl::StrJoin(p.args, " ") + "\n");
      status["err-data"] = absl::Base64Escape("stdin: " + p.input);
    }
    processes_.erase(it);  // qemu-ga forgets a command once it reported its exit
    return {{"return", status}};
  }

  std::map<int64_t, Process> processes_;
  int64_t next_pid_ = 100;
};

class TaskExecTest : public ::testing::Test {
 protected:
  TaskExecTest() { agent_.ready = true; }

  std::shared_ptr<VmTask> Vm(bool guest_agent = true) {
    DriverStateRecord record;
    record.guest_agent = guest_agent;
    record.guest_agent_socket = guest_agent ? tmp_.path() + "/qga.sock" : "";
    return std::make_shared<VmTask>(TaskIdentity{"a/web/1", "web", "a"}, record, UniqueFd(), UniqueFd(), nullptr);
  }

  static GuestExecRequest Command(std::vector<std::string> argv) {
    GuestExecRequest request;
    request.argv = std::move(argv);
    return request;
  }

  // The guest-exec and guest-exec-status calls the agent answered: "exec PATH LAST_ARG" or "status PID".
  std::vector<std::string> Calls() {
    std::vector<std::string> calls;
    for (const json& request : agent_.requests()) {
      const json& args = request["arguments"];
      if (request["execute"] != "guest-exec") {
        calls.push_back("status " + std::to_string(args["pid"].get<int64_t>()));
        continue;
      }
      const std::string last_arg = args.contains("arg") ? " " + args["arg"].back().get<std::string>() : "";
      calls.push_back("exec " + args["path"].get<std::string>() + last_arg);
    }
    return calls;
  }

  TempDir tmp_;
  GuestPrograms programs_;
  FakeAgentSocket agent_{tmp_.path() + "/qga.sock", [this](const json& request) { return programs_.Answer(request); }};
};

TEST_F(TaskExecTest, ATaskWithoutTheGuestAgentIsRefusedBeforeAnyCommand) {
  std::shared_ptr<VmTask> vm = Vm(false);
  const absl::Status checked = CheckExecTarget(*vm);
  EXPECT_TRUE(absl::IsFailedPrecondition(checked)) << checked;
  EXPECT_THAT(std::string(checked.message()),
              HasSubstr("exec runs commands through the guest agent: task a/web/1 runs without the guest agent"));
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, Command({"/bin/echo"}), {});
  EXPECT_EQ(result.status(), checked);
  EXPECT_EQ(agent_.connections, 0);
}

TEST_F(TaskExecTest, AnExitedTaskIsRefused) {
  std::shared_ptr<VmTask> vm = Vm();
  vm->MarkExited(ExitResult{});
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, Command({"/bin/echo"}), {});
  EXPECT_TRUE(absl::IsFailedPrecondition(result.status())) << result.status();
  EXPECT_THAT(std::string(result.status().message()),
              HasSubstr("exec runs commands through the guest agent: task a/web/1 has exited"));
  EXPECT_EQ(agent_.connections, 0);
}

TEST_F(TaskExecTest, AnAgentThatDoesNotAnswerIsUnavailable) {
  agent_.hang_up = true;  // QEMU closes the channel at once
  std::shared_ptr<VmTask> vm = Vm();
  const absl::Time start = absl::Now();
  const absl::Status checked = CheckExecTarget(*vm);
  EXPECT_TRUE(absl::IsUnavailable(checked)) << checked;
  EXPECT_THAT(std::string(checked.message()), HasSubstr("the guest agent of task a/web/1 does not answer within 3s "
                                                        "(is qemu-guest-agent running in the guest?)"));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2)) << "a closed channel needs no waiting";
  EXPECT_TRUE(absl::IsUnavailable(ExecInTask(*vm, Command({"/bin/echo"}), {}).status()));
}

TEST_F(TaskExecTest, RunsTheCommandAndHandsOverItsOutput) {
  std::shared_ptr<VmTask> vm = Vm();
  ASSERT_TRUE(CheckExecTarget(*vm).ok());
  GuestExecRequest request = Command({"/bin/echo", "hello", "guest"});
  request.env = {"GREETING=1"};
  request.stdin_data = "typed";
  std::vector<std::pair<int, std::string>> chunks;
  TaskExecOptions options;
  options.on_output = [&chunks](int stream, absl::string_view chunk) { chunks.emplace_back(stream, std::string(chunk)); };
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, request, options);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->exited);
  EXPECT_EQ(result->exit_code, 3);
  EXPECT_EQ(result->output.stdout_data, "hello guest\n");
  EXPECT_EQ(result->output.stderr_data, "stdin: typed");
  EXPECT_THAT(chunks, ::testing::ElementsAre(Pair(1, "hello guest\n"), Pair(2, "stdin: typed")));
  const json exec = agent_.requests().at(0);
  EXPECT_EQ(exec["arguments"]["env"], json({"GREETING=1"}));
  EXPECT_EQ(exec["arguments"]["capture-output"], true);
  EXPECT_EQ(agent_.connections, 1) << "the check's session is the one exec used";
}

TEST_F(TaskExecTest, AProgramTheGuestLacksIsNotFoundAndTheSessionStays) {
  std::shared_ptr<VmTask> vm = Vm();
  absl::StatusOr<GuestExecResult> missing = ExecInTask(*vm, Command({"htop"}), {});
  EXPECT_TRUE(absl::IsNotFound(missing.status())) << missing.status();
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("guest exec of htop"));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("No such file or directory"));
  absl::StatusOr<GuestExecResult> next = ExecInTask(*vm, Command({"/bin/echo", "again"}), {});
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->output.stdout_data, "again\n");
  EXPECT_EQ(agent_.connections, 1) << "an answered error is no reason to reconnect";
}

TEST_F(TaskExecTest, ABrokenSessionIsDroppedAndTheNextExecConnectsAnew) {
  std::shared_ptr<VmTask> vm = Vm();
  absl::StatusOr<GuestExecResult> broken = ExecInTask(*vm, Command({"/bin/crash"}), {});
  EXPECT_TRUE(absl::IsUnavailable(broken.status())) << broken.status();
  EXPECT_THAT(std::string(broken.status().message()), HasSubstr("closed the connection"));
  absl::StatusOr<GuestExecResult> next = ExecInTask(*vm, Command({"/bin/echo", "fresh"}), {});
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_EQ(next->output.stdout_data, "fresh\n");
  EXPECT_EQ(agent_.connections, 2);
}

TEST_F(TaskExecTest, ACommandPastItsDeadlineIsKilledAndCollectedInTheGuest) {
  std::shared_ptr<VmTask> vm = Vm();
  TaskExecOptions options;
  options.deadline = absl::Now() + absl::Milliseconds(300);
  const absl::Time start = absl::Now();
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, Command({"/bin/sleep", "600"}), options);
  EXPECT_TRUE(absl::IsDeadlineExceeded(result.status())) << result.status();
  EXPECT_EQ(result.status().message(), "exec of /bin/sleep ran past its timeout and was killed in the guest");
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));
  const std::vector<std::string> calls = Calls();
  ASSERT_GE(calls.size(), 5u);
  EXPECT_EQ(calls.front(), "exec /bin/sleep 600");
  // The end: the kill, its own exit, and the killed command's exit collected.
  EXPECT_THAT(std::vector<std::string>(calls.end() - 3, calls.end()),
              ::testing::ElementsAre("exec /bin/sh kill -KILL 100", "status 101", "status 100"));
}

TEST_F(TaskExecTest, ACommandWhoseCallEndedIsKilledInTheGuest) {
  std::shared_ptr<VmTask> vm = Vm();
  TaskExecOptions options;
  // Nomad's call ends once the command has been seen running.
  options.cancelled = [this] { return agent_.requests().size() >= 2; };
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, Command({"/bin/sleep", "600"}), options);
  EXPECT_TRUE(absl::IsCancelled(result.status())) << result.status();
  EXPECT_EQ(result.status().message(), "exec of /bin/sleep was cancelled and killed in the guest");
  EXPECT_THAT(Calls(), ::testing::ElementsAre("exec /bin/sleep 600", "status 100", "status 100",
                                              "exec /bin/sh kill -KILL 100", "status 101", "status 100"));
}

TEST_F(TaskExecTest, AKillTheGuestCannotRunStillEndsTheExecAsTimedOut) {
  programs_.has_shell = false;  // no /bin/sh to kill with
  std::shared_ptr<VmTask> vm = Vm();
  TaskExecOptions options;
  options.deadline = absl::Now() + absl::Milliseconds(200);
  absl::StatusOr<GuestExecResult> result = ExecInTask(*vm, Command({"/bin/sleep", "600"}), options);
  EXPECT_TRUE(absl::IsDeadlineExceeded(result.status())) << result.status();
  EXPECT_THAT(std::string(result.status().message()), HasSubstr("ran past its timeout"));
  EXPECT_EQ(Calls().back(), "exec /bin/sh kill -KILL 100");
  EXPECT_TRUE(ExecInTask(*vm, Command({"/bin/echo"}), {}).ok()) << "the session is still good";
  EXPECT_EQ(agent_.connections, 1);
}

}  // namespace
}  // namespace ndq
