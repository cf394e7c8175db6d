#include "host/signals.h"

#include <signal.h>

#include <string>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace ndq {
namespace {

using ::testing::HasSubstr;

TEST(ParseSignal, TheNamesNomadSendsAreTheHostsNumbers) {
  EXPECT_EQ(ParseSignal("SIGTERM").value_or(-1), SIGTERM);
  EXPECT_EQ(ParseSignal("SIGINT").value_or(-1), SIGINT);
  EXPECT_EQ(ParseSignal("SIGKILL").value_or(-1), SIGKILL);
  EXPECT_EQ(ParseSignal("SIGHUP").value_or(-1), SIGHUP);
  EXPECT_EQ(ParseSignal("SIGQUIT").value_or(-1), SIGQUIT);
  EXPECT_EQ(ParseSignal("SIGUSR1").value_or(-1), SIGUSR1);
  EXPECT_EQ(ParseSignal("SIGUSR2").value_or(-1), SIGUSR2);
  EXPECT_EQ(ParseSignal("SIGCONT").value_or(-1), SIGCONT);
  EXPECT_EQ(ParseSignal("SIGSTOP").value_or(-1), SIGSTOP);
  EXPECT_EQ(ParseSignal("SIGPWR").value_or(-1), SIGPWR);
}

TEST(ParseSignal, ThePrefixCaseAndSurroundingSpaceDoNotMatter) {
  EXPECT_EQ(ParseSignal("TERM").value_or(-1), SIGTERM);
  EXPECT_EQ(ParseSignal("sigterm").value_or(-1), SIGTERM);
  EXPECT_EQ(ParseSignal("term").value_or(-1), SIGTERM);
  EXPECT_EQ(ParseSignal("SigHup").value_or(-1), SIGHUP);
  EXPECT_EQ(ParseSignal("  SIGINT\n").value_or(-1), SIGINT);
}

TEST(ParseSignal, NumbersAreTakenAsTheyAre) {
  EXPECT_EQ(ParseSignal("15").value_or(-1), 15);
  EXPECT_EQ(ParseSignal("9").value_or(-1), 9);
  EXPECT_EQ(ParseSignal(" 1 ").value_or(-1), 1);
  // A real-time signal has no name here but is a valid number.
  EXPECT_EQ(ParseSignal(absl::StrCat(SIGRTMIN)).value_or(-1), SIGRTMIN);
  EXPECT_EQ(ParseSignal(absl::StrCat(NSIG - 1)).value_or(-1), NSIG - 1);
}

TEST(ParseSignal, AnUnknownNameIsAClearErrorNamingIt) {
  absl::StatusOr<int> parsed = ParseSignal("SIGBOGUS");
  ASSERT_FALSE(parsed.ok());
  EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(parsed.status().message(), HasSubstr("\"SIGBOGUS\""));
}

TEST(ParseSignal, MalformedAndOutOfRangeInputIsRejected) {
  for (const std::string bad : {"", "   ", "SIG", "SIGSIGTERM", "SIGTERM2", "SIG TERM", "TERM;KILL", "0", "-1", "-15",
                                "15abc", "0x0f", "1.5", "99999999999999999999"}) {
    absl::StatusOr<int> parsed = ParseSignal(bad);
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument)
        << "\"" << bad << "\" parsed as " << parsed.value_or(0);
  }
  // Past the host's last signal, kill(2) would refuse it: refuse it here.
  EXPECT_FALSE(ParseSignal(absl::StrCat(NSIG)).ok());
  EXPECT_FALSE(ParseSignal(absl::StrCat(NSIG + 100)).ok());
}

TEST(SignalName, NamesTheCommonSignals) {
  EXPECT_EQ(SignalName(SIGTERM), "SIGTERM");
  EXPECT_EQ(SignalName(SIGKILL), "SIGKILL");
  EXPECT_EQ(SignalName(SIGINT), "SIGINT");
  EXPECT_EQ(SignalName(SIGHUP), "SIGHUP");
}

TEST(SignalName, AnUnnamedNumberStillSaysWhichSignal) {
  EXPECT_EQ(SignalName(SIGRTMIN + 1), absl::StrCat("signal ", SIGRTMIN + 1));
  EXPECT_EQ(SignalName(0), "signal 0");
  EXPECT_EQ(SignalName(-3), "signal -3");
}

// Whatever SignalName calls by name, ParseSignal reads back as the same signal.
TEST(SignalName, EveryNameParsesBackToItsNumber) {
  int named = 0;
  for (int signal = 1; signal < NSIG; ++signal) {
    const std::string name = SignalName(signal);
    if (name.rfind("SIG", 0) != 0) continue;
    ++named;
    EXPECT_EQ(ParseSignal(name).value_or(-1), signal) << name;
    EXPECT_EQ(ParseSignal(name.substr(3)).value_or(-1), signal) << name;
  }
  EXPECT_GE(named, 8) << "the usual signals have names";
}

}  // namespace
}  // namespace ndq
