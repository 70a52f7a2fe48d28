//! The cool-down of an actor past its restart limit: how long its slot waits before a
//! fresh actor takes it over, growing while fresh actors keep failing.

use std::time::Duration;
use tokio::time::Instant;

use eventbus_core::Error;

/// How long a slot whose actor went past its restart limit stays out of service
/// before a fresh actor takes it over.
///
/// The first cool-down of a slot lasts [`first`](CoolDown::first); each further one
/// doubles, up to [`max`](CoolDown::max), while the fresh actors keep going past the
/// limit. A fresh actor that stays in service for a whole `restart_window` resets the
/// slot to `first`. Defaults: 1 s, capped at 30 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoolDown {
    /// The first cool-down of a slot.
    pub first: Duration,
    /// The longest cool-down.
    pub max: Duration,
}

impl Default for CoolDown {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(30),
        }
    }
}

impl CoolDown {
    /// A schedule starting at `first`, doubling, capped at `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, max }
    }

    /// The `n`-th cool-down in a row (from 1): `first · 2^(n-1)`, at most `max`.
    pub fn nth(&self, n: u32) -> Duration {
        let doublings = n.saturating_sub(1).min(31);
        self.first
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// Check the schedule; the error names the field.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.max < self.first {
            return Err(Error::config(format!(
                "actor pool cool_down.max ({:?}) must be at least cool_down.first ({:?})",
                self.max, self.first
            )));
        }
        Ok(())
    }
}

/// One slot's cool-down state. Written by the supervisor; read by health.
#[derive(Debug, Default)]
pub(crate) struct CoolState {
    /// Cool-downs in a row: fresh actors that went past the limit again within a
    /// restart window of their start.
    streak: u32,
    /// Bumped by every cool-down, so that a revival timer of an earlier one is ignored.
    epoch: u64,
    /// When the current cool-down ends; `None` while in service.
    until: Option<Instant>,
    /// When the last fresh actor started.
    revived_at: Option<Instant>,
}

impl CoolState {
    /// The slot went out of service at `now`: the next cool-down and its epoch.
    pub(crate) fn begin(
        &mut self,
        now: Instant,
        window: Duration,
        schedule: &CoolDown,
    ) -> (Duration, u64) {
        let again = self
            .revived_at
            .is_some_and(|t| now.saturating_duration_since(t) < window);
        self.streak = if again || self.until.is_some() {
            self.streak.saturating_add(1)
        } else {
            1
        };
        let wait = schedule.nth(self.streak);
        self.epoch += 1;
        self.until = Some(now + wait);
        (wait, self.epoch)
    }

    /// A fresh actor took the slot over at `now`.
    pub(crate) fn end(&mut self, now: Instant) {
        self.until = None;
        self.revived_at = Some(now);
    }

    /// The epoch of the current (or last) cool-down.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Time left of the current cool-down at `now`; `None` while in service.
    pub(crate) fn left(&self, now: Instant) -> Option<Duration> {
        self.until.map(|u| u.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_first_up_to_max() {
        let s = CoolDown::default();
        let secs: Vec<u64> = (1..=8).map(|n| s.nth(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(s.nth(0), Duration::from_secs(1));
        assert_eq!(s.nth(u32::MAX), Duration::from_secs(30));
        let zero = CoolDown::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(zero.nth(5), Duration::ZERO);
        assert!(
            CoolDown::new(Duration::from_secs(2), Duration::from_secs(1))
                .validate()
                .unwrap_err()
                .to_string()
                .contains("cool_down.max")
        );
    }

    #[test]
    fn streak_grows_while_fresh_actors_fail_within_the_window_and_resets_after() {
        let s = CoolDown::default();
        let window = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut c = CoolState::default();
        assert_eq!(c.begin(t0, window, &s).0, Duration::from_secs(1));
        assert!(c.left(t0).is_some());
        c.end(t0 + Duration::from_secs(1));
        assert_eq!(c.left(t0), None);
        // The fresh actor fails past its limit 10 s after it started: twice as long.
        let (wait, epoch) = c.begin(t0 + Duration::from_secs(11), window, &s);
        assert_eq!((wait, epoch), (Duration::from_secs(2), 2));
        c.end(t0 + Duration::from_secs(13));
        // This one lasts longer than a window: back to the first cool-down.
        let (wait, epoch) = c.begin(t0 + Duration::from_secs(100), window, &s);
        assert_eq!((wait, epoch), (Duration::from_secs(1), 3));
        // A failed revival (still cooling) counts as another one in a row.
        assert_eq!(
            c.begin(t0 + Duration::from_secs(101), window, &s).0,
            Duration::from_secs(2)
        );
    }
}
