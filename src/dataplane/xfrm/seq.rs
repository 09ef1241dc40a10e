//! ESP sequence numbers anchored to the clock (pure: the caller passes the time).
//!
//! The keys are derived, not negotiated: an SA that is re-created (reboot, `ip xfrm state
//! flush`, `cleanup` + `apply`) has the same SPI and key as before. Starting its sequence
//! numbers at 1 again would reuse AES-GCM nonces (the IV is the 64-bit sequence number) and
//! a peer with anti-replay on would drop the traffic. So every SA is created with extended
//! sequence numbers (ESN, 64 bits) and its counter starts at the current time in *ticks*
//! (a quarter microsecond since the Unix epoch) instead of 1:
//!
//! - **Sender**: a new outbound SA starts at `now`. Its counter then grows by one per packet;
//!   the sidecar keeps it at least at `now - SEND_LAG` by raising it (`XFRM_MSG_NEWAE`) when it
//!   lags. A re-created SA therefore always starts above every number the old one used, as
//!   long as the SA never sent more than 4 million packets per second on average (it then
//!   runs ahead of the clock; [`ahead_of_clock`] reports it and the persisted floor covers
//!   it) and the clock did not go back.
//! - **Receiver**: a new inbound SA starts its replay window at `now - RECEIVE_SKEW`, and the
//!   sidecar raises the window of an idle inbound SA to that value. The kernel infers the upper
//!   32 bits of a received sequence number from its window; keeping windows near the clock
//!   keeps every sender's numbers within the inference range (2^32 ticks = 17.9 minutes) after
//!   any pause or restart, while packets older than the window are dropped as replays.
//!
//! Consequence: hosts' clocks must agree within [`RECEIVE_SKEW`] minus [`SEND_LAG`] (behind)
//! and about 11 minutes (ahead); NTP gives milliseconds. See docs/keying.md.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Sequence-number ticks per second (a quarter microsecond each).
pub const TICKS_PER_SEC: u64 = 4_000_000;
/// How far a receiver's window trails its clock after a start or raise.
pub const RECEIVE_SKEW: Duration = Duration::from_secs(300);
/// How far a sender's counter may trail its clock before the sidecar raises it.
pub const SEND_LAG: Duration = Duration::from_secs(60);
/// How far beyond [`RECEIVE_SKEW`] an inbound window may fall behind before it is raised (so
/// an idle SA is raised once a minute, not at every look).
pub const RECEIVE_SLACK: Duration = Duration::from_secs(60);
/// Largest anti-replay window accepted (packets; the ESN bitmap is `window / 32` words).
pub const MAX_REPLAY_WINDOW: u32 = 4096;

/// Ticks of a duration.
pub fn ticks(d: Duration) -> u64 {
    d.as_secs() * TICKS_PER_SEC + u64::from(d.subsec_nanos()) / (1_000_000_000 / TICKS_PER_SEC)
}

/// The clock in ticks since the Unix epoch (0 before the epoch).
pub fn clock(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH).map(ticks).unwrap_or(0)
}

/// Where a new outbound SA's counter starts: the clock, or the persisted floor if that is
/// higher (the clock went back, or the SA ran ahead of it before the restart).
pub fn out_start(now: SystemTime, floor: u64) -> u64 {
    clock(now).max(floor)
}

/// Where a new inbound SA's replay window starts.
pub fn in_start(now: SystemTime) -> u64 {
    clock(now).saturating_sub(ticks(RECEIVE_SKEW))
}

/// The raised counter for an outbound SA whose counter is `oseq`, or `None` if it is recent.
/// Raises only by more than [`SEND_LAG`], so packets sent between reading and raising
/// (fewer than `SEND_LAG` x 4 Mpps) can never push the counter past the new value.
pub fn raise_out(now: SystemTime, oseq: u64) -> Option<u64> {
    let c = clock(now);
    (c > oseq.saturating_add(ticks(SEND_LAG))).then_some(c)
}

/// The raised window top for an inbound SA whose highest accepted number is `seq`, or `None`.
/// Every sender keeps its counter within [`SEND_LAG`] of its clock, so a window more than
/// [`RECEIVE_SKEW`] behind the clock belongs to a link idle for minutes: raising it drops
/// nothing a live sender will send, and keeps a restarted sender within the kernel's
/// inference range.
pub fn raise_in(now: SystemTime, seq: u64) -> Option<u64> {
    let target = in_start(now);
    (target > seq.saturating_add(ticks(RECEIVE_SLACK))).then_some(target)
}

/// How far (in ticks) an outbound counter is ahead of the clock, if it is: the SA sent more
/// than 4 Mpps on average. A restart then must start above the persisted floor, not the clock.
pub fn ahead_of_clock(now: SystemTime, oseq: u64) -> Option<u64> {
    oseq.checked_sub(clock(now)).filter(|d| *d > 0)
}

/// Split a 64-bit sequence number into the kernel's (high, low) halves.
pub fn split(n: u64) -> (u32, u32) {
    ((n >> 32) as u32, n as u32)
}

/// Join the kernel's (high, low) halves.
pub fn join(hi: u32, lo: u32) -> u64 {
    (u64::from(hi) << 32) | u64::from(lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn ticks_are_quarter_microseconds() {
        assert_eq!(ticks(Duration::from_micros(1)), 4);
        assert_eq!(ticks(Duration::from_secs(1)), TICKS_PER_SEC);
        assert_eq!(clock(at(1)), TICKS_PER_SEC);
        // 2026: about 7.1e15 ticks, far from 2^64 (1.8e19: year ~148,000).
        let now = clock(at(1_796_000_000));
        assert!(now > 1 << 52 && now < 1 << 53, "{now}");
    }

    #[test]
    fn inference_range_covers_skew_and_lag() {
        // The kernel infers seq_hi correctly for numbers up to 2^32 above the window.
        let range = Duration::from_secs((1u64 << 32) / TICKS_PER_SEC);
        assert!(
            range > RECEIVE_SKEW + RECEIVE_SLACK + SEND_LAG + Duration::from_secs(300),
            "{range:?}"
        );
        // A tended sender (at most SEND_LAG + one 5 s refresh behind) stays above a raised
        // window with minutes to spare for clock offsets.
        assert!(RECEIVE_SKEW > SEND_LAG + Duration::from_secs(5 + 180));
    }

    #[test]
    fn a_restarted_sender_starts_above_its_old_counter() {
        // Created at t=1000, sent 1e9 packets (1 Mpps for 1000 s), restarted at t=2000.
        let old = out_start(at(1000), 0) + 1_000_000_000;
        let new = out_start(at(2000), 0);
        assert!(new > old);
        // The clock went back below the persisted floor: the floor wins.
        assert_eq!(out_start(at(500), old + 1), old + 1);
    }

    #[test]
    fn receiver_window_accepts_a_restarted_sender() {
        // Receiver window created at t=1000 (starts at 700 s); sender restarted at t=5000.
        let window = in_start(at(1000));
        let raised = raise_in(at(5000), window).unwrap();
        let sender = out_start(at(5000), 0);
        assert!(sender > raised, "ahead of the window: accepted");
        assert!(
            sender - raised < 1 << 32,
            "within the kernel's seq_hi inference"
        );
        // A recent window is left alone (a live sender keeps it recent), and so is one that
        // was just raised: nothing to do at the next look.
        assert_eq!(raise_in(at(1000), window), None);
        assert_eq!(raise_in(at(1000), clock(at(990))), None);
        assert_eq!(raise_in(at(1059), window), None);
        assert_eq!(raise_in(at(5005), raised), None);
        assert!(raise_in(at(1061), window).is_some());
    }

    #[test]
    fn sender_raised_only_when_lagging() {
        let c = clock(at(100));
        assert_eq!(raise_out(at(100), c), None);
        assert_eq!(raise_out(at(100), c - ticks(SEND_LAG)), None);
        assert_eq!(raise_out(at(100), c - ticks(SEND_LAG) - 1), Some(c));
        assert_eq!(ahead_of_clock(at(100), c + 5), Some(5));
        assert_eq!(ahead_of_clock(at(100), c), None);
    }

    #[test]
    fn split_join_roundtrip() {
        let n = 0x0019_8a3b_c4d5_e6f7;
        let (hi, lo) = split(n);
        assert_eq!((hi, lo), (0x0019_8a3b, 0xc4d5_e6f7));
        assert_eq!(join(hi, lo), n);
    }
}
