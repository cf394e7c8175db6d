#include "base/timeouts.h"
#include "driver/exec_service.h"

#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "driver/error_classification.h"

namespace ndq {
namespace {

constexpr absl::Duration kCancelCheck = timeouts::kExecCancelCheck;
// After the exit frame, how long Nomad gets to end the stream before the
// call is cancelled so the stdin reader can be joined.
constexpr absl::Duration kStreamEndGrace = timeouts::kExecStreamEndGrace;

driverpb::ExitResult ExitOf(const GuestExecResult& result) {
  driverpb::ExitResult out;
  // A command ended by a signal reports 128+N, as Nomad's executor does.
  out.set_exit_code(result.exited ? result.exit_code : 128 + result.signal);
  out.set_signal(result.exited ? 0 : result.signal);
  return out;
}

// What the agent cut or dropped, said on stderr after the command's own output.
std::string OutputNotes(const GuestExecOutput& output, uint64_t late_stdin) {
  std::string notes;
  const size_t limit_mib = GuestExec::kAgentOutputLimit >> 20;
  for (const auto& [truncated, name] : {std::pair{output.stdout_truncated, "stdout"},
                                        std::pair{output.stderr_truncated, "stderr"}}) {
    if (truncated) {
      absl::StrAppend(&notes, "nomad-driver-qemu: the guest agent kept only the first ", limit_mib, " MiB of ", name,
                      "\n");
    }
  }
  if (late_stdin > 0) {
    absl::StrAppend(&notes, "nomad-driver-qemu: ", late_stdin,
                    " bytes of stdin came after the command had started and were dropped "
                    "(qemu-guest-agent takes input only when a command starts)\n");
  }
  return notes;
}

absl::Status CheckCommand(const google::protobuf::RepeatedPtrField<std::string>& command) {
  if (command.empty() || command[0].empty()) return absl::InvalidArgumentError("exec: no command given");
  return absl::OkStatus();
}

// Reads the client's frames after the setup on a thread of its own: stdin
// until the command starts, then only to notice the end of the stream.
class StdinReader {
 public:
  explicit StdinReader(ExecStream* stream) : stream_(stream), last_input_(absl::Now()) {
    thread_ = std::thread([this] { Run(); });
  }
  ~StdinReader() {
    if (thread_.joinable()) thread_.join();
  }
  StdinReader(const StdinReader&) = delete;
  StdinReader& operator=(const StdinReader&) = delete;

  // The command's stdin: everything up to the close, or what came before a
  // pause of kStdinQuiet. InvalidArgument over GuestExec::kMaxStdin.
  absl::StatusOr<std::string> TakeInput(const std::function<bool()>& cancelled) {
    absl::MutexLock lock(&mu_);
    auto settled = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return closed_ || over_limit_; };
    while (!settled()) {
      if (cancelled()) return absl::CancelledError("exec: the stream ended before the command started");
      const absl::Time quiet_end = last_input_ + kStdinQuiet;
      if (absl::Now() >= quiet_end) break;
      mu_.AwaitWithDeadline(absl::Condition(&settled), std::min(quiet_end, absl::Now() + kCancelCheck));
    }
    taken_ = true;
    if (over_limit_) {
      return absl::InvalidArgumentError(absl::StrCat("exec: stdin is over ", GuestExec::kMaxStdin >> 20,
                                                     " MiB, the most the driver passes to the guest agent"));
    }
    return std::move(input_);
  }

  uint64_t late_bytes() {
    absl::MutexLock lock(&mu_);
    return late_bytes_;
  }

  // Waits for the client to end the stream (Nomad does once it has the exit);
  // cancels the call if it does not, so the reader thread can be joined.
  void Finish(grpc::ServerContext* context) {
    {
      absl::MutexLock lock(&mu_);
      auto ended = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return ended_; };
      mu_.AwaitWithTimeout(absl::Condition(&ended), kStreamEndGrace);
      if (!ended_) context->TryCancel();
    }
    thread_.join();
  }

 private:
  void Run() {
    driverpb::ExecTaskStreamingRequest frame;
    while (stream_->Read(&frame)) {
      if (!frame.has_stdin()) continue;  // terminal sizes mean nothing without a tty
      absl::MutexLock lock(&mu_);
      const std::string& data = frame.stdin().data();
      if (taken_) {
        late_bytes_ += data.size();
      } else if (input_.size() + data.size() > GuestExec::kMaxStdin) {
        over_limit_ = true;
      } else {
        input_ += data;
        last_input_ = absl::Now();
      }
      if (frame.stdin().close()) closed_ = true;
    }
    absl::MutexLock lock(&mu_);
    closed_ = true;
    ended_ = true;
  }

  ExecStream* const stream_;
  std::thread thread_;
  absl::Mutex mu_;
  std::string input_ ABSL_GUARDED_BY(mu_);
  absl::Time last_input_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;    // stdin closed, or the stream ended
  bool over_limit_ ABSL_GUARDED_BY(mu_) = false;
  bool taken_ ABSL_GUARDED_BY(mu_) = false;     // the command has started
  bool ended_ ABSL_GUARDED_BY(mu_) = false;     // the client ended the stream
  uint64_t late_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

// The frames after the command: the rest of the notes, both streams closed,
// then the exit.
void WriteEnd(ExecStream* stream, const GuestExecResult& result, uint64_t late_stdin) {
  driverpb::ExecTaskStreamingResponse frame;
  if (std::string notes = OutputNotes(result.output, late_stdin); !notes.empty()) {
    frame.mutable_stderr()->set_data(std::move(notes));
    stream->Write(frame);
  }
  frame.Clear();
  frame.mutable_stdout()->set_close(true);
  stream->Write(frame);
  frame.Clear();
  frame.mutable_stderr()->set_close(true);
  stream->Write(frame);
  frame.Clear();
  frame.set_exited(true);
  *frame.mutable_result() = ExitOf(result);
  stream->Write(frame);
}

// A command that could not run, reported the way a shell would: the reason
// on stderr and exit code 127 (no such program) or 126. The stream is past
// its start by then, and only an exit frame ends it cleanly for Nomad.
GuestExecResult FailedCommand(const absl::Status& status) {
  GuestExecResult result;
  result.exited = true;
  result.exit_code = absl::IsNotFound(status) ? 127 : 126;
  result.output.stderr_data = absl::StrCat("nomad-driver-qemu: ", status.message(), "\n");
  return result;
}

// Runs the command of a streamed exec once its setup frame was read.
grpc::Status RunStreamed(TaskManager& tasks, grpc::ServerContext* context, ExecStream* stream,
                         const driverpb::ExecTaskStreamingRequest::Setup& setup,
                         const std::function<bool()>& shutting_down) {
  // Errors before the command are the call's status: no stdin read yet.
  if (absl::Status ready = tasks.CheckExec(setup.task_id()); !ready.ok()) return ToGrpc(ready);
  StdinReader reader(stream);
  bool client_gone = false;
  auto cancelled = [&] { return client_gone || context->IsCancelled() || shutting_down(); };
  auto write_output = [&](int which, absl::string_view chunk) {
    driverpb::ExecTaskStreamingResponse frame;
    auto* io = which == 1 ? frame.mutable_stdout() : frame.mutable_stderr();
    io->set_data(std::string(chunk));
    if (!client_gone && !stream->Write(frame)) client_gone = true;
  };
  absl::StatusOr<std::string> input = reader.TakeInput(cancelled);
  absl::StatusOr<GuestExecResult> result = absl::UnknownError("exec: not run");
  if (!input.ok()) {
    result = input.status();
  } else {
    GuestExecRequest request;
    request.argv.assign(setup.command().begin(), setup.command().end());
    request.stdin_data = std::move(*input);
    TaskExecOptions options;
    options.cancelled = cancelled;
    options.on_output = write_output;
    result = tasks.Exec(setup.task_id(), request, options);
  }
  if (!result.ok() && !absl::IsCancelled(result.status())) {
    result = FailedCommand(result.status());
    write_output(2, result->output.stderr_data);
  }
  if (result.ok()) WriteEnd(stream, *result, reader.late_bytes());
  reader.Finish(context);
  return result.ok() ? grpc::Status::OK : ToGrpc(result.status());
}

}  // namespace

grpc::Status ExecTaskOnce(TaskManager& tasks, grpc::ServerContext* context, const driverpb::ExecTaskRequest& request,
                          driverpb::ExecTaskResponse* response, const std::function<bool()>& shutting_down) {
  if (absl::Status valid = CheckCommand(request.command()); !valid.ok()) return ToGrpc(valid);
  GuestExecRequest exec;
  exec.argv.assign(request.command().begin(), request.command().end());
  TaskExecOptions options;
  const absl::Duration timeout =
      absl::Seconds(request.timeout().seconds()) + absl::Nanoseconds(request.timeout().nanos());
  if (timeout > absl::ZeroDuration()) options.deadline = absl::Now() + timeout;
  options.cancelled = [&] { return context->IsCancelled() || shutting_down(); };
  absl::StatusOr<GuestExecResult> result = tasks.Exec(request.task_id(), exec, options);
  if (!result.ok()) return ToGrpc(result.status());
  response->set_stdout(std::move(result->output.stdout_data));
  response->set_stderr(std::move(result->output.stderr_data) + OutputNotes(result->output, 0));
  *response->mutable_result() = ExitOf(*result);
  return grpc::Status::OK;
}

grpc::Status ExecTaskStreamed(TaskManager& tasks, grpc::ServerContext* context, ExecStream* stream,
                              const std::function<bool()>& shutting_down) {
  driverpb::ExecTaskStreamingRequest first;
  if (!stream->Read(&first)) return grpc::Status(grpc::StatusCode::CANCELLED, "exec: the stream ended at once");
  if (!first.has_setup()) {
    return ToGrpc(absl::InvalidArgumentError("exec: the first frame of the stream carries no setup"));
  }
  const driverpb::ExecTaskStreamingRequest::Setup& setup = first.setup();
  if (setup.tty()) {
    return ToGrpc(absl::InvalidArgumentError(
        "exec: a terminal (tty) is not supported through the guest agent; run `nomad alloc exec -t=false ...`, or "
        "attach to the VM's serial console (task config console = true)"));
  }
  if (absl::Status valid = CheckCommand(setup.command()); !valid.ok()) return ToGrpc(valid);
  return RunStreamed(tasks, context, stream, setup, shutting_down);
}

}  // namespace ndq
