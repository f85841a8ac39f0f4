//! Waiting on a condition with a deadline: the lab's one polling primitive.
//!
//! Process exits are waited on with pidfds (`procs`), which need no polling. What is left has
//! no event to wait on (a mount that stops being busy, a process entering a chroot, a file
//! appearing in a node), so it is polled here, at a short interval, always with a deadline.

use std::time::{Duration, Instant};

/// How often [`until`] re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// The condition was still false at the deadline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timed out after {deadline:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub deadline: Duration,
}

/// Re-checks `cond` every [`POLL_INTERVAL`] until it holds, or fails once `deadline` has
/// passed. The condition is always checked at least once.
pub fn until(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> bool,
) -> Result<(), TimedOut> {
    let started = Instant::now();
    loop {
        if cond() {
            return Ok(());
        }
        if started.elapsed() >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                deadline,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// [`until`] for a condition that yields a value when it holds (`Some`); `None` at the deadline.
pub fn until_some<T>(deadline: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let mut found = None;
    let _ = until("a value", deadline, || {
        found = probe();
        found.is_some()
    });
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn true_condition_returns_at_once_false_one_times_out() {
        assert_eq!(until("x", Duration::ZERO, || true), Ok(()));
        let err = until("never", Duration::from_millis(50), || false).unwrap_err();
        assert_eq!(err.what, "never");
        let mut n = 0;
        until("third check", Duration::from_secs(5), || {
            n += 1;
            n == 3
        })
        .unwrap();
        assert_eq!(n, 3);
    }

    #[test]
    fn until_some_yields_the_value_or_none() {
        let mut n = 0;
        let v = until_some(Duration::from_secs(5), || {
            n += 1;
            (n == 2).then_some(n * 10)
        });
        assert_eq!(v, Some(20));
        assert_eq!(until_some(Duration::from_millis(50), || None::<u8>), None);
    }
}
