//! Named counters for input the control plane refused or ignored.
//!
//! Every path that drops a piece of input (an object, a port, an address) logs the reason
//! through `tracing` and bumps one of these counters, so a test can assert that the refusal
//! happened exactly as often as expected and an operator can see it in the table dump.
//! Reasons are `&'static str` so they double as metric labels.

use std::collections::BTreeMap;
use std::fmt;

/// Counts of refused input, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Skips {
    counts: BTreeMap<&'static str, u64>,
}

impl Skips {
    /// An empty set of counters.
    pub fn new() -> Self {
        Self::default()
    }
    /// Counts one occurrence of `reason`.
    pub fn bump(&mut self, reason: &'static str) {
        *self.counts.entry(reason).or_insert(0) += 1;
    }
    /// How often `reason` was counted.
    pub fn get(&self, reason: &str) -> u64 {
        self.counts.get(reason).copied().unwrap_or(0)
    }
    /// Every reason with its count, sorted by reason.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.counts.iter().map(|(k, v)| (*k, *v))
    }
    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
    /// Adds every count of `other` into `self`.
    pub fn merge(&mut self, other: &Skips) {
        for (k, v) in other.iter() {
            *self.counts.entry(k).or_insert(0) += v;
        }
    }
}

impl fmt::Display for Skips {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (k, v)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{k}={v}")?;
        }
        Ok(())
    }
}
