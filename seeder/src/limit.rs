//! Enrollment rate limiting: a token bucket per source address and one overall, so one noisy
//! address cannot starve a fleet's first boot.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub struct EnrollLimiter {
    per_source: f64,
    total: f64,
    state: Mutex<(Bucket, HashMap<IpAddr, Bucket>)>,
}

impl EnrollLimiter {
    pub fn new(per_source: f64, total: f64) -> Self {
        let now = Instant::now();
        Self {
            per_source,
            total,
            state: Mutex::new((
                Bucket {
                    tokens: 2.0 * total,
                    at: now,
                },
                HashMap::new(),
            )),
        }
    }

    /// Takes a token for `source`; false means answer 429.
    pub fn allow(&self, source: IpAddr, now: Instant) -> bool {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (global, per) = &mut *guard;
        if per.len() > 100_000 {
            // Forget idle sources rather than grow without bound.
            per.retain(|_, b| now.saturating_duration_since(b.at).as_secs() < 60);
        }
        let burst = 2.0 * self.per_source;
        let b = per.entry(source).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        if !b.take(self.per_source, burst, now) {
            return false;
        }
        global.take(self.total, 2.0 * self.total, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_source_burst_then_refill() {
        let l = EnrollLimiter::new(1.0, 1000.0);
        let t0 = Instant::now();
        let a: IpAddr = "127.1.1.11".parse().unwrap();
        let b: IpAddr = "127.1.1.12".parse().unwrap();
        assert!(l.allow(a, t0));
        assert!(l.allow(a, t0));
        assert!(!l.allow(a, t0), "burst of 2 exhausted");
        assert!(l.allow(b, t0), "another source is not affected");
        assert!(l.allow(a, t0 + Duration::from_millis(1100)), "refilled");
    }

    #[test]
    fn global_limit_applies_across_sources() {
        let l = EnrollLimiter::new(100.0, 1.0);
        let t0 = Instant::now();
        let allowed = (0..10u8)
            .filter(|i| l.allow(IpAddr::from([127, 2, 0, *i]), t0))
            .count();
        assert_eq!(allowed, 2);
    }
}
