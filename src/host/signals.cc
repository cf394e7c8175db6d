#include "host/signals.h"

#include <signal.h>

#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

constexpr std::pair<const char*, int> kSignals[] = {
    {"SIGHUP", SIGHUP},   {"SIGINT", SIGINT},     {"SIGQUIT", SIGQUIT}, {"SIGABRT", SIGABRT},
    {"SIGKILL", SIGKILL}, {"SIGUSR1", SIGUSR1},   {"SIGUSR2", SIGUSR2}, {"SIGTERM", SIGTERM},
    {"SIGCONT", SIGCONT}, {"SIGSTOP", SIGSTOP},   {"SIGTSTP", SIGTSTP}, {"SIGPWR", SIGPWR},
    {"SIGWINCH", SIGWINCH}, {"SIGALRM", SIGALRM},
};

}  // namespace

absl::StatusOr<int> ParseSignal(const std::string& name) {
  std::string upper = absl::AsciiStrToUpper(absl::StripAsciiWhitespace(name));
  int number = 0;
  if (absl::SimpleAtoi(upper, &number) && number > 0 && number < NSIG) return number;
  if (!absl::StartsWith(upper, "SIG")) upper = "SIG" + upper;
  for (const auto& [signame, value] : kSignals) {
    if (upper == signame) return value;
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown signal \"", name, "\""));
}

std::string SignalName(int signal) {
  for (const auto& [signame, value] : kSignals) {
    if (value == signal) return signame;
  }
  return absl::StrCat("signal ", signal);
}

}  // namespace ndq
