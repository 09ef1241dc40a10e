//! Automatic rekeying of the IKE-less SAs (pure: the caller passes the clock and counters).
//!
//! Keys are derived from the PSK per key *generation*, and every host receives with the
//! generations next to the one it sends with (`G - 1`, `G`, `G + 1`; [`super::rx_generations`]).
//! Two rekey triggers build on that, without any message between the hosts:
//!
//! - **Key age** (`--rekey-every P`): the generation a host sends with is
//!   `--key-generation + floor(unix_time / P)`. Hosts whose clocks agree to well within `P`
//!   move to the next generation at about the same time, and whichever moves first is already
//!   accepted by the others. No key is used for longer than `P` (plus clock skew).
//! - **Usage** (`--rekey-bytes N`, `--rekey-packets N`, with `--rekey-every`): once the
//!   outbound SA to one peer has carried `N` bytes or packets, that one direction moves one
//!   generation *ahead* (`G + 1`), which the peer already accepts. It catches up with the
//!   others at the next period boundary, and may then move ahead again. A direction moves
//!   ahead at most once per period: a limit that traffic exhausts twice within one period
//!   leaves that direction on its second key until the boundary (reported, never dropped or
//!   sent in clear); choose `N` above one period of peak traffic.
//!
//! A direction does not move ahead during the first [`ahead_guard`] of a period: a peer whose
//! clock is a little behind may still be in the previous period and would not yet accept
//! `G + 1`. See docs/keying.md.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Shortest period accepted for `--rekey-every`.
pub const MIN_PERIOD: Duration = Duration::from_secs(10);
/// Longest wait at the start of a period before a direction may move ahead.
pub const AHEAD_GUARD_MAX: Duration = Duration::from_secs(60);

/// When keys change by themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rekey {
    /// Maximum key age: the sending generation advances every period.
    pub every: Option<Duration>,
    /// Move a direction ahead once its outbound SA carried this many bytes...
    pub bytes: Option<u64>,
    /// ... or this many packets.
    pub packets: Option<u64>,
}

/// Why a rekey happened (status and metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Age,
    Usage,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Age => "age",
            Reason::Usage => "usage",
        }
    }
}

fn unix_secs(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The wait at the start of a period before a direction may move ahead: a quarter of the
/// period, at most [`AHEAD_GUARD_MAX`].
pub fn ahead_guard(period: Duration) -> Duration {
    (period / 4).min(AHEAD_GUARD_MAX)
}

impl Rekey {
    /// Check the settings; the error names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.every {
            if p < MIN_PERIOD {
                return Err(format!(
                    "--rekey-every {}: the period must be at least {} seconds",
                    p.as_secs(),
                    MIN_PERIOD.as_secs()
                ));
            }
        }
        if self.every.is_none() && (self.bytes.is_some() || self.packets.is_some()) {
            return Err(
                "--rekey-bytes/--rekey-packets need --rekey-every (a direction moves \
                        ahead one generation and catches up at the next period)"
                    .into(),
            );
        }
        if self.bytes == Some(0) || self.packets == Some(0) {
            return Err("--rekey-bytes/--rekey-packets: the limit must be at least 1".into());
        }
        Ok(())
    }

    /// Whether keys change by themselves at all.
    pub fn enabled(&self) -> bool {
        self.every.is_some()
    }

    fn period_secs(&self) -> Option<u64> {
        self.every.map(|p| p.as_secs().max(1))
    }

    /// The generation to send with at `now`, from the configured base generation.
    pub fn generation(&self, base: u32, now: SystemTime) -> u32 {
        match self.period_secs() {
            None => base,
            Some(p) => {
                let epoch = u32::try_from(unix_secs(now) / p).unwrap_or(u32::MAX);
                base.saturating_add(epoch)
            }
        }
    }

    /// When the generation next advances (unix seconds), if it does.
    pub fn next_at(&self, now: SystemTime) -> Option<u64> {
        self.period_secs()
            .map(|p| (unix_secs(now) / p + 1).saturating_mul(p))
    }

    /// How long until the generation next advances.
    pub fn until_next(&self, now: SystemTime) -> Option<Duration> {
        let next = UNIX_EPOCH + Duration::from_secs(self.next_at(now)?);
        Some(next.duration_since(now).unwrap_or(Duration::ZERO))
    }

    /// Whether a direction may move one generation ahead now (past the guard at the start of
    /// the period).
    pub fn may_move_ahead(&self, now: SystemTime) -> bool {
        let (Some(every), Some(p)) = (self.every, self.period_secs()) else {
            return false;
        };
        unix_secs(now) % p >= ahead_guard(every).as_secs()
    }

    /// Whether an outbound SA that carried `bytes` and `packets` reached a usage limit.
    pub fn exhausted(&self, bytes: u64, packets: u64) -> bool {
        self.bytes.is_some_and(|n| bytes >= n) || self.packets.is_some_and(|n| packets >= n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn every(s: u64) -> Rekey {
        Rekey {
            every: Some(Duration::from_secs(s)),
            ..Rekey::default()
        }
    }

    #[test]
    fn without_a_period_the_generation_is_the_base() {
        let r = Rekey::default();
        assert_eq!(r.generation(7, at(1_000_000)), 7);
        assert_eq!(r.next_at(at(5)), None);
        assert!(!r.may_move_ahead(at(5)));
        assert!(!r.enabled());
    }

    #[test]
    fn the_generation_advances_once_per_period_on_every_host_alike() {
        let r = every(3600);
        let g = r.generation(1, at(1_800_000_000));
        assert_eq!(g, 1 + 500_000);
        assert_eq!(r.generation(1, at(1_800_000_000 + 3599)), g);
        assert_eq!(r.generation(1, at(1_800_003_600)), g + 1);
        assert_eq!(r.next_at(at(1_800_000_001)), Some(1_800_003_600));
        assert_eq!(
            r.until_next(at(1_800_003_000)),
            Some(Duration::from_secs(600))
        );
        // Two hosts a few seconds apart differ by at most one generation, which both accept.
        for t in [1_800_003_598, 1_800_003_599, 1_800_003_600, 1_800_003_601] {
            let a = r.generation(1, at(t));
            let b = r.generation(1, at(t + 3));
            assert!(b == a || b == a + 1);
        }
    }

    #[test]
    fn a_direction_moves_ahead_only_past_the_guard() {
        let r = Rekey {
            bytes: Some(1000),
            ..every(3600)
        };
        assert_eq!(ahead_guard(Duration::from_secs(3600)), AHEAD_GUARD_MAX);
        assert_eq!(ahead_guard(Duration::from_secs(20)), Duration::from_secs(5));
        assert!(!r.may_move_ahead(at(1_800_000_000)));
        assert!(!r.may_move_ahead(at(1_800_000_059)));
        assert!(r.may_move_ahead(at(1_800_000_060)));
        assert!(r.may_move_ahead(at(1_800_003_599)));
    }

    #[test]
    fn usage_limits() {
        let r = Rekey {
            bytes: Some(1000),
            packets: Some(10),
            ..every(60)
        };
        assert!(!r.exhausted(999, 9));
        assert!(r.exhausted(1000, 0));
        assert!(r.exhausted(0, 10));
        assert!(!every(60).exhausted(u64::MAX, u64::MAX));
    }

    #[test]
    fn validation_names_the_flag() {
        assert!(every(60).validate().is_ok());
        assert!(every(5).validate().unwrap_err().contains("--rekey-every 5"));
        let no_period = Rekey {
            bytes: Some(5),
            ..Rekey::default()
        };
        assert!(no_period
            .validate()
            .unwrap_err()
            .contains("need --rekey-every"));
        let zero = Rekey {
            packets: Some(0),
            ..every(60)
        };
        assert!(zero.validate().unwrap_err().contains("at least 1"));
    }
}
