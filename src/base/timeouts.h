// Every wait of the driver, named in one place with why it is that long.
//
// Upper bounds Nomad sees:
// - StartTask: the image download (its own retries, see image/fetcher.h;
//   cancelled with the call) + qemu-img (kOverlayCreate) + kQmpStart for QEMU
//   to answer on QMP + kPidFileWait, plus kCancelCheck to notice a caller that
//   gave up. Without a download: kQmpStart + kPidFileWait, about 40 s.
//   With advertise_address, plus the job's advertise_timeout (default 2 min,
//   at most 10 min, src/qemu/network_plan.h) for the guest's address.
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
// (Not so for a start that waits for advertise_address, up to 10 min: a
// recovery meanwhile fails Unavailable, and Nomad retries it.)
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

// QMP and the guest agent -------------------------------------------------------
// One QMP or guest-agent command's answer: QEMU answers in milliseconds; a
// guest agent may be slow in a busy guest.
inline constexpr absl::Duration kQmpCommand = absl::Seconds(10);
// warm_start: QEMU saving or loading a template's device state (under a
// megabyte: RAM is mapped, not streamed) takes milliseconds; this bounds a
// stuck migration.
inline constexpr absl::Duration kWarmMigrate = absl::Minutes(2);
// Connecting to a running VM's QMP or agent socket, and each command a stop
// or powerdown sends: short, so the whole stays within kPowerdownBudget.
inline constexpr absl::Duration kQmpQuick = absl::Seconds(2);
// Reconnecting QMP in the background after a plugin restart, per attempt.
inline constexpr absl::Duration kQmpReconnect = absl::Seconds(1);
// How often guest-sync is sent again while the agent has not answered.
inline constexpr absl::Duration kAgentSyncResend = absl::Seconds(1);

// Images -------------------------------------------------------------------------
// A download's connection set-up, and how long a transfer may stay below the
// low-speed floor before it is retried (resuming).
inline constexpr absl::Duration kDownloadConnect = absl::Seconds(10);
inline constexpr absl::Duration kDownloadLowSpeed = absl::Seconds(30);
// Back-off between download attempts: doubling from the first, capped.
inline constexpr absl::Duration kDownloadFirstBackoff = absl::Milliseconds(500);
inline constexpr absl::Duration kDownloadMaxBackoff = absl::Seconds(30);
// How often a back-off wait looks whether the start was cancelled.
inline constexpr absl::Duration kDownloadCancelPoll = absl::Milliseconds(100);
// The image cache's per-key lock around creating or removing a file (not a
// download): held for milliseconds, so 30 s means a stuck holder.
inline constexpr absl::Duration kCacheKeyLock = absl::Seconds(30);

// Nomad's streams --------------------------------------------------------------
// Fingerprint: re-sent this often when nothing changed (as Nomad's drivers
// do); the host is looked at every kFingerprintCheck (cheap: stat and list).
inline constexpr absl::Duration kFingerprintResend = absl::Seconds(30);
inline constexpr absl::Duration kFingerprintCheck = absl::Seconds(1);
// TaskStats looks for a client that left once a second, not five times:
// 20 VMs' streams stay cheap (docs/benchmarks.md).
inline constexpr absl::Duration kStatsCancelCheck = absl::Seconds(1);

// Host probes -----------------------------------------------------------------
// One `qemu-system-* --version` (and friends) at fingerprint time.
inline constexpr absl::Duration kFingerprintProbe = absl::Seconds(10);

// --- exec (nomad alloc exec) -------------------------------------------------
// A command's stdin counts as done once Nomad sent nothing for this long.
inline constexpr absl::Duration kExecStdinQuiet = absl::Milliseconds(500);
// How often a running exec looks whether its caller gave up.
inline constexpr absl::Duration kExecCancelCheck = absl::Milliseconds(50);
// How long the stream's last frames get to reach Nomad.
inline constexpr absl::Duration kExecStreamEndGrace = absl::Seconds(5);
// guest-exec-status polling: from this, doubling, up to the next.
inline constexpr absl::Duration kGuestExecFirstPoll = absl::Milliseconds(5);
inline constexpr absl::Duration kGuestExecMaxPoll = absl::Milliseconds(200);
// How often a guest command's wait looks whether its caller gave up.
inline constexpr absl::Duration kGuestExecCancelCheck = absl::Milliseconds(10);
// How long exec waits for the task's guest agent to answer.
inline constexpr absl::Duration kExecAgentConnect = absl::Seconds(3);

// --- watches after StartTask (vm/vm_watches.h, vm/boot_watch.h) ----------------
// One probe of the guest agent or the ready port, and the longest pause between probes.
inline constexpr absl::Duration kBootProbe = absl::Seconds(2);
inline constexpr absl::Duration kBootProbeMaxPause = absl::Seconds(1);
// boot_timeout passed: how long QEMU gets to exit on SIGTERM before SIGKILL.
inline constexpr absl::Duration kBootFailureStop = absl::Seconds(5);
// How long a restored guest's agent gets to answer before its clock is set.
inline constexpr absl::Duration kRestoredClock = absl::Seconds(60);
// How long a cold warm_start VM has to become ready before no template is taken.
inline constexpr absl::Duration kWarmReady = absl::Minutes(30);
// QMP screendump.
inline constexpr absl::Duration kScreenshot = absl::Seconds(10);

// --- the warm pool (vm/warm_pool.h) ----------------------------------------------
// How long a template's pool is kept without a restore taking from it.
inline constexpr absl::Duration kPoolIdle = absl::Minutes(30);
// How long a restore waits for the adoption of a relaunched plugin's pool.
inline constexpr absl::Duration kPoolAdoptWait = absl::Seconds(5);
// How long after a restore the pool starts refilling (the restored guest's
// first moments get the CPU).
inline constexpr absl::Duration kPoolRefillDelay = absl::Milliseconds(500);
// A pooled QEMU's own start, state load and warm-up, each.
inline constexpr absl::Duration kPoolSlotStep = absl::Seconds(30);
// The warm-up's connection: how long the guest has to close its side.
inline constexpr absl::Duration kPoolWarmUpProbe = absl::Seconds(3);

}  // namespace ndq::timeouts
