//! The delivery checker: lost, duplicated and out-of-order messages.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

#[derive(Debug, Default)]
struct KeyState {
    expected: u64,
    handled: Vec<u32>,
    max_first_seen: Option<u64>,
    calls: u64,
}

#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, KeyState>,
    order_violations: Vec<String>,
    unexpected: Vec<(String, u64)>,
    records: u64,
}

/// What a run delivered, against what was produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryReport {
    /// Messages produced.
    pub produced: u64,
    /// Handler records (including duplicates).
    pub handled: u64,
    /// Produced messages never handled, as `key#seq`.
    pub lost: Vec<String>,
    /// Handled messages that were never produced.
    pub unexpected: Vec<String>,
    /// Histogram: times handled → number of messages handled that often (2 and above).
    pub duplicates: BTreeMap<u32, u64>,
    /// Per-key order violations, described.
    pub order_violations: Vec<String>,
}

impl DeliveryReport {
    /// No loss, nothing unexpected, no order violation.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty() && self.unexpected.is_empty() && self.order_violations.is_empty()
    }

    /// Messages handled more than once.
    pub fn duplicated(&self) -> u64 {
        self.duplicates.values().sum()
    }
}

impl fmt::Display for DeliveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "produced {} handled {} lost {} unexpected {} duplicated {} order violations {}",
            self.produced,
            self.handled,
            self.lost.len(),
            self.unexpected.len(),
            self.duplicated(),
            self.order_violations.len()
        )?;
        for (times, n) in &self.duplicates {
            writeln!(f, "  handled {times}x: {n}")?;
        }
        for l in self.lost.iter().take(10) {
            writeln!(f, "  lost {l}")?;
        }
        for v in self.order_violations.iter().take(10) {
            writeln!(f, "  order: {v}")?;
        }
        Ok(())
    }
}

/// Records produced and handled messages and judges the run.
///
/// Each key's messages carry sequence numbers 0, 1, 2, … in production order.
/// Handling sequence `s` of a key for the first time while an earlier sequence of that
/// key has never been handled is an order violation; handling a sequence again
/// (redelivery) is a duplicate, not a violation.
#[derive(Debug, Clone, Default)]
pub struct DeliveryChecker {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl DeliveryChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Produce the next sequence of `key`; returns it.
    pub fn produce(&self, key: &str) -> u64 {
        let mut s = self.state.lock().expect("checker poisoned");
        let k = s.keys.entry(key.to_owned()).or_default();
        let seq = k.expected;
        k.expected += 1;
        k.handled.push(0);
        seq
    }

    /// Record that a handler saw `key#seq`.
    pub fn handled(&self, key: &str, seq: u64) {
        {
            let mut s = self.state.lock().expect("checker poisoned");
            s.records += 1;
            let State {
                keys,
                order_violations,
                unexpected,
                ..
            } = &mut *s;
            match keys.get_mut(key) {
                Some(k) if (seq as usize) < k.handled.len() => {
                    k.calls += 1;
                    let first_time = k.handled[seq as usize] == 0;
                    k.handled[seq as usize] += 1;
                    if first_time {
                        if let Some(missing) =
                            k.handled[..seq as usize].iter().position(|n| *n == 0)
                        {
                            order_violations
                                .push(format!("key {key}: seq {seq} handled before seq {missing}"));
                        }
                        k.max_first_seen = Some(k.max_first_seen.map_or(seq, |m| m.max(seq)));
                    }
                }
                _ => unexpected.push((key.to_owned(), seq)),
            }
        }
        self.changed.notify_waiters();
    }

    /// Messages produced so far that were handled at least once.
    pub fn handled_distinct(&self) -> u64 {
        let s = self.state.lock().expect("checker poisoned");
        s.keys
            .values()
            .map(|k| k.handled.iter().filter(|n| **n > 0).count() as u64)
            .sum()
    }

    /// Messages produced so far.
    pub fn produced(&self) -> u64 {
        let s = self.state.lock().expect("checker poisoned");
        s.keys.values().map(|k| k.expected).sum()
    }

    /// Wait until every produced message was handled at least once, or fail after
    /// `timeout` with the report.
    pub async fn wait_all_handled(&self, timeout: Duration) -> Result<(), String> {
        self.wait_until(timeout, "every produced message handled", |c| {
            c.handled_distinct() >= c.produced()
        })
        .await
    }

    /// Wait until `condition` holds, re-checking whenever a message is recorded.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        condition: impl Fn(&DeliveryChecker) -> bool,
    ) -> Result<(), String> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if condition(self) {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.map_err(|_| {
            format!(
                "timed out after {timeout:?} waiting for: {what}\n{}",
                self.report()
            )
        })
    }

    /// Judge the run so far.
    pub fn report(&self) -> DeliveryReport {
        let s = self.state.lock().expect("checker poisoned");
        let mut r = DeliveryReport {
            handled: s.records,
            order_violations: s.order_violations.clone(),
            unexpected: s
                .unexpected
                .iter()
                .map(|(k, q)| format!("{k}#{q}"))
                .collect(),
            ..DeliveryReport::default()
        };
        let mut keys: Vec<_> = s.keys.iter().collect();
        keys.sort_by(|a, b| a.0.cmp(b.0));
        for (key, k) in keys {
            r.produced += k.expected;
            for (seq, n) in k.handled.iter().enumerate() {
                match *n {
                    0 => r.lost.push(format!("{key}#{seq}")),
                    1 => {}
                    n => *r.duplicates.entry(n).or_insert(0) += 1,
                }
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judges_loss_duplicates_and_order() {
        let c = DeliveryChecker::new();
        for _ in 0..3 {
            c.produce("a");
        }
        c.produce("b");
        c.handled("a", 0);
        c.handled("a", 2);
        c.handled("a", 0);
        c.handled("zz", 0);
        let r = c.report();
        assert_eq!(r.produced, 4);
        assert_eq!(r.lost, vec!["a#1".to_owned(), "b#0".to_owned()]);
        assert_eq!(r.duplicates.get(&2), Some(&1));
        assert_eq!(r.order_violations.len(), 1);
        assert_eq!(r.unexpected, vec!["zz#0".to_owned()]);
        assert!(!r.is_clean());
    }

    #[tokio::test]
    async fn wait_reports_what_did_not_happen() {
        let c = DeliveryChecker::new();
        c.produce("a");
        let e = c
            .wait_all_handled(Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(e.contains("every produced message handled"), "{e}");
        c.handled("a", 0);
        c.wait_all_handled(Duration::from_secs(1)).await.unwrap();
    }
}
