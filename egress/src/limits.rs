//! Per-rule connection rate limits and byte caps, counted over the sandbox's life (a policy
//! update keeps the counts of rules whose id stays).

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use crate::policy::{DenyReason, Rule};

#[derive(Debug, Default)]
struct Counter {
    /// Start times of connections inside the current rate window.
    recent: VecDeque<Instant>,
    bytes: u64,
}

/// Live counts for every rule that carried traffic.
#[derive(Debug, Default)]
pub struct RuleCounters {
    by_rule: HashMap<String, Counter>,
}

impl RuleCounters {
    /// Counts a new connection under `rule`, or refuses it when the rule's rate limit or byte cap
    /// is reached (a refused attempt does not count).
    pub fn open_connection(&mut self, rule: &Rule, now: Instant) -> Result<(), DenyReason> {
        let counter = self.by_rule.entry(rule.id.clone()).or_default();
        if rule.byte_cap.is_some_and(|cap| counter.bytes >= cap) {
            return Err(DenyReason::ByteCapReached);
        }
        if let Some(limit) = rule.rate_limit {
            while counter
                .recent
                .front()
                .is_some_and(|start| now.saturating_duration_since(*start) >= limit.per)
            {
                counter.recent.pop_front();
            }
            if counter.recent.len() >= limit.connections as usize {
                return Err(DenyReason::RateLimited);
            }
            counter.recent.push_back(now);
        }
        Ok(())
    }

    /// Adds `n` bytes (either direction) to `rule`'s count; Err once its byte cap is passed,
    /// and the caller then closes the connection.
    pub fn add_bytes(&mut self, rule: &Rule, n: u64) -> Result<(), DenyReason> {
        let counter = self.by_rule.entry(rule.id.clone()).or_default();
        counter.bytes = counter.bytes.saturating_add(n);
        match rule.byte_cap {
            Some(cap) if counter.bytes > cap => Err(DenyReason::ByteCapReached),
            _ => Ok(()),
        }
    }

    /// Bytes `rule_id` carried so far.
    pub fn bytes(&self, rule_id: &str) -> u64 {
        self.by_rule.get(rule_id).map_or(0, |counter| counter.bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::policy::Policy;

    fn rule(json: &str) -> std::sync::Arc<Rule> {
        Policy::from_json_str(json).unwrap().rules()[0].clone()
    }

    #[test]
    fn rate_limit_is_a_sliding_window() {
        let rule = rule(
            r#"{"rules":[{"id":"r","domain":"a.com","rate_limit":{"connections":2,"per_seconds":10}}]}"#,
        );
        let mut counters = RuleCounters::default();
        let start = Instant::now();
        assert_eq!(counters.open_connection(&rule, start), Ok(()));
        assert_eq!(
            counters.open_connection(&rule, start + Duration::from_secs(1)),
            Ok(())
        );
        assert_eq!(
            counters.open_connection(&rule, start + Duration::from_secs(2)),
            Err(DenyReason::RateLimited)
        );
        assert_eq!(
            counters.open_connection(&rule, start + Duration::from_secs(10)),
            Ok(())
        );
        assert_eq!(
            counters.open_connection(&rule, start + Duration::from_secs(10)),
            Err(DenyReason::RateLimited)
        );
        assert_eq!(
            counters.open_connection(&rule, start + Duration::from_secs(11)),
            Ok(())
        );
    }

    #[test]
    fn byte_cap_cuts_and_refuses_new_connections() {
        let rule = rule(r#"{"rules":[{"id":"r","domain":"a.com","byte_cap":100}]}"#);
        let mut counters = RuleCounters::default();
        let now = Instant::now();
        assert_eq!(counters.open_connection(&rule, now), Ok(()));
        assert_eq!(counters.add_bytes(&rule, 60), Ok(()));
        assert_eq!(counters.add_bytes(&rule, 40), Ok(()));
        assert_eq!(
            counters.add_bytes(&rule, 1),
            Err(DenyReason::ByteCapReached)
        );
        assert_eq!(counters.bytes("r"), 101);
        assert_eq!(
            counters.open_connection(&rule, now),
            Err(DenyReason::ByteCapReached)
        );
    }

    #[test]
    fn unlimited_rules_only_count() {
        let rule = rule(r#"{"rules":[{"id":"r","domain":"a.com"}]}"#);
        let mut counters = RuleCounters::default();
        for _ in 0..1000 {
            assert_eq!(counters.open_connection(&rule, Instant::now()), Ok(()));
            assert_eq!(counters.add_bytes(&rule, 1 << 40), Ok(()));
        }
    }
}
