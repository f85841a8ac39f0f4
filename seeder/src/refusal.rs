//! Refused enrollments (and any other refusal worth an operator's attention): each is counted in
//! the state database, one row per source, kind and minute so a flood cannot grow it without
//! bound, and logged with its kind, node and source. Never the token: callers pass a kind tag and
//! an error whose message is made of parsed values only.

use std::net::IpAddr;

use hiveseed_proto::NodeName;

use crate::error::Error;
use crate::state::Seeder;

/// At most this many characters of a refusal's message are logged, quoted and escaped (`?`):
/// parts of a message can come from the request, which must not forge or flood log lines.
const LOGGED_REASON_CHARS: usize = 240;

/// Whether the `count`th refusal of a row is logged at WARN: the first, then every power of ten,
/// so a flood shows in the log without filling it (the store keeps every count).
fn worth_a_warning(count: u64) -> bool {
    count <= 1 || 10u64.pow(count.ilog10()) == count
}

impl Seeder {
    /// Records and logs a refusal of `kind` (a short stable tag: `token_expired`,
    /// `rate_limited`, ...) from `source`, naming `node` when the request named a valid one, and
    /// returns `error` to answer with. A store that cannot record it does not change the answer.
    pub fn refuse(
        &self,
        source: IpAddr,
        kind: &'static str,
        node: Option<&NodeName>,
        error: Error,
    ) -> Error {
        let node_field = node.map_or("-", NodeName::as_str);
        let reason: String = error.message.chars().take(LOGGED_REASON_CHARS).collect();
        let count = match self.store.record_refusal(self.now(), source, kind, node) {
            Ok(count) => count,
            Err(e) => {
                tracing::error!(error = %e, kind = %kind, node = %node_field, source = %source, "could not record a refusal");
                0
            }
        };
        if worth_a_warning(count) {
            tracing::warn!(kind = %kind, node = %node_field, source = %source, count, reason = ?reason, "refused");
        } else {
            tracing::debug!(kind = %kind, node = %node_field, source = %source, count, reason = ?reason, "refused");
        }
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_and_every_power_of_ten_are_warned() {
        let warned: Vec<u64> = (0..=10_000).filter(|&c| worth_a_warning(c)).collect();
        assert_eq!(warned, [0, 1, 10, 100, 1000, 10_000]);
    }
}
