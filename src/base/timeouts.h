// Every wait of the driver, named in one place with why it is that long.
//
// Upper bounds Nomad sees:
// - StartTask: the image download (its own retries, see image/fetcher.h;
//   cancelled with the call) + qemu-img (kOverlayCreate) + kQmpStart for QEMU
//   to answer on QMP + kPidFileWait, plus kCancelCheck to notice a caller that
//   gave up. Without a download: kQmpStart + kPidFileWait, about 40 s.
// - StopTask: the job's kill_timeout + kStopOverhead (powerdown request,
//   the grace after the stop signal, and two SIGKILL waits): timeout + 17 s.
// - RecoverTask: kRecoverWait at most, when a start of the same task is under way.
#pragma once

#include "absl/time/time.h"

namespace ndq::timeouts {

// StartTask -------------------------------------------------------------------
// QEMU answering on its QMP socket. TCG guests with large RAM take a few
// seconds to set up; 30 s leaves room on a loaded host.
inline constexpr absl::Duration kQmpStart = absl::Seconds(30);
// The supervisor writing QEMU's pid after QMP answered: it records the pid
// right after exec, but a loaded host may run QEMU first.
inline constexpr absl::Duration kPidFileWait = absl::Seconds(10);
// How often a start that waits looks whether its caller gave up: a quarter
// second keeps a cancelled StartTask from holding resources noticeably.
inline constexpr absl::Duration kCancelCheck = absl::Milliseconds(250);
// qemu-img writing a qcow2 overlay header: milliseconds normally; a minute
// only on a stalled disk, where failing beats hanging the start.
inline constexpr absl::Duration kOverlayCreate = absl::Seconds(60);
// qemu-img info on an image chain (probing formats and backing files).
inline constexpr absl::Duration kImageProbe = absl::Seconds(30);

// RecoverTask -----------------------------------------------------------------
// A concurrent start or recovery of the same task: longer than kQmpStart +
// kPidFileWait, so a start that will succeed is waited for.
inline constexpr absl::Duration kRecoverWait = absl::Seconds(60);

// Stop and exit -----------------------------------------------------------------
// How long QEMU gets after the stop signal before SIGKILL.
inline constexpr absl::Duration kKillGrace = absl::Seconds(3);
// The most a powerdown request may take (lock, guest agent, QMP).
inline constexpr absl::Duration kPowerdownBudget = absl::Seconds(4);
// How long the exit record may take after a SIGKILL (to QEMU, then to the
// supervisor) before giving up.
inline constexpr absl::Duration kKillWait = absl::Seconds(5);
// What Stop may take beyond its timeout: kPowerdownBudget + kKillGrace +
// 2 * kKillWait (spelled out: absl's Duration arithmetic is not constexpr).
inline constexpr absl::Duration kStopOverhead = absl::Seconds(4 + 3 + 2 * 5);
// QEMU's last QMP events (SHUTDOWN, ...) relayed before the exit event.
inline constexpr absl::Duration kExitEventDrain = absl::Seconds(1);
// A VM's cgroup emptying after its processes died (the kernel frees them
// asynchronously); then rmdir.
inline constexpr absl::Duration kCgroupDrain = absl::Seconds(5);

// Host probes -----------------------------------------------------------------
// One `qemu-system-* --version` (and friends) at fingerprint time.
inline constexpr absl::Duration kFingerprintProbe = absl::Seconds(10);

}  // namespace ndq::timeouts
