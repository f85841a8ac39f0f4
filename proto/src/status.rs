//! What agents report: the run phase, per-resource outcomes, the applied generation, and checks.
//!
//! Reports cross a trust boundary into the seeder, so every string is bounded and
//! [`StatusReport::validate`] names the field that is out of bounds.

use serde::{Deserialize, Serialize};

use crate::names::{Generation, NodeName, ResourceId, Sha256};

/// Bounds on a report; anything larger is refused whole.
pub const MAX_RESOURCES: usize = 1024;
pub const MAX_CHECKS: usize = 1024;
pub const MAX_SERVICES: usize = 256;
pub const MAX_TEXT: usize = 4096;
/// The largest `seq`: the seeder stores it as a signed 64-bit integer, and a larger one would wrap.
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// The agent's run state; the same states it reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case", deny_unknown_fields)]
pub enum Phase {
    Enrolling,
    Fetched,
    Applying {
        done: u32,
        total: u32,
    },
    Waiting {
        blocked_on: String,
    },
    Converged,
    Failed {
        kind: FailureKind,
        retryable: bool,
        message: String,
    },
}

impl Phase {
    pub fn label(&self) -> String {
        match self {
            Phase::Enrolling => "enrolling".into(),
            Phase::Fetched => "fetched".into(),
            Phase::Applying { done, total } => format!("applying {done}/{total}"),
            Phase::Waiting { blocked_on } => format!("waiting blocked_on={blocked_on}"),
            Phase::Converged => "converged".into(),
            Phase::Failed { kind, .. } => format!("failed kind={}", kind.as_str()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    Enroll,
    Verify,
    Apply,
    Wait,
    Check,
    Internal,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Enroll => "enroll",
            FailureKind::Verify => "verify",
            FailureKind::Apply => "apply",
            FailureKind::Wait => "wait",
            FailureKind::Check => "check",
            FailureKind::Internal => "internal",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Changed,
    Unchanged,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceReport {
    pub id: ResourceId,
    pub outcome: Outcome,
    /// Why it failed; never secret content.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CheckStatus {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "FAIL")]
    Fail,
    /// Could not run for a stated reason; never counts as a pass.
    #[serde(rename = "SKIP")]
    Skip,
}

impl CheckStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckStatus::Pass => "PASS",
            CheckStatus::Fail => "FAIL",
            CheckStatus::Skip => "SKIP",
        }
    }
}

/// One validation result, in the seed's report format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckRecord {
    pub node: NodeName,
    pub check: String,
    pub expected: String,
    pub got: String,
    pub status: CheckStatus,
}

impl CheckRecord {
    /// PASS iff `got` equals `expected`.
    pub fn compare(
        node: NodeName,
        check: impl Into<String>,
        expected: impl Into<String>,
        got: impl Into<String>,
    ) -> Self {
        let (expected, got) = (expected.into(), got.into());
        let status = if expected == got {
            CheckStatus::Pass
        } else {
            CheckStatus::Fail
        };
        Self {
            node,
            check: check.into(),
            expected,
            got,
            status,
        }
    }
}

/// How often a supervised service was restarted automatically (its `Restart=` policy after it
/// ended), as its service manager counts: systemd's `NRestarts`, or the agent's supervisor where
/// systemd is not PID 1. Both reset the count when the unit is started or restarted on request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRestarts {
    pub unit: String,
    pub restarts: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusReport {
    pub node: NodeName,
    /// Per-agent sequence number, strictly increasing across restarts; the seeder drops replays.
    /// At most [`MAX_SEQ`].
    pub seq: u64,
    /// Unix seconds when the agent produced it.
    pub at: u64,
    pub phase: Phase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<Sha256>,
    #[serde(default)]
    pub resources: Vec<ResourceReport>,
    #[serde(default)]
    pub checks: Vec<CheckRecord>,
    /// The manifest's services, measured with the checks (absent from older agents' reports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<ServiceRestarts>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("status report field {field}: {problem}")]
pub struct ReportError {
    pub field: String,
    pub problem: String,
}

fn bounded(field: impl Into<String>, s: &str) -> Result<(), ReportError> {
    if s.len() > MAX_TEXT {
        return Err(ReportError {
            field: field.into(),
            problem: format!("longer than {MAX_TEXT} bytes"),
        });
    }
    Ok(())
}

impl StatusReport {
    /// Bounds and consistency; `sender` is the node the client certificate names.
    pub fn validate(&self, sender: &NodeName) -> Result<(), ReportError> {
        if &self.node != sender {
            return Err(ReportError {
                field: "node".into(),
                problem: format!("report names {} but the caller is {sender}", self.node),
            });
        }
        if self.seq > MAX_SEQ {
            return Err(ReportError {
                field: "seq".into(),
                problem: format!("greater than {MAX_SEQ}"),
            });
        }
        if self.generation.is_some() != self.digest.is_some() {
            return Err(ReportError {
                field: "digest".into(),
                problem: "generation and digest go together".into(),
            });
        }
        match &self.phase {
            Phase::Waiting { blocked_on } => bounded("phase.blocked_on", blocked_on)?,
            Phase::Failed { message, .. } => bounded("phase.message", message)?,
            Phase::Applying { done, total } if done > total => {
                return Err(ReportError {
                    field: "phase.done".into(),
                    problem: "greater than total".into(),
                })
            }
            _ => {}
        }
        if self.resources.len() > MAX_RESOURCES {
            return Err(ReportError {
                field: "resources".into(),
                problem: format!("more than {MAX_RESOURCES} entries"),
            });
        }
        for (i, r) in self.resources.iter().enumerate() {
            if let Some(message) = &r.message {
                bounded(format!("resources[{i}].message"), message)?;
            }
        }
        if self.checks.len() > MAX_CHECKS {
            return Err(ReportError {
                field: "checks".into(),
                problem: format!("more than {MAX_CHECKS} entries"),
            });
        }
        for (i, c) in self.checks.iter().enumerate() {
            if &c.node != sender {
                return Err(ReportError {
                    field: format!("checks[{i}].node"),
                    problem: format!("a node reports only its own checks, not {}", c.node),
                });
            }
            bounded(format!("checks[{i}].check"), &c.check)?;
            bounded(format!("checks[{i}].expected"), &c.expected)?;
            bounded(format!("checks[{i}].got"), &c.got)?;
        }
        if self.services.len() > MAX_SERVICES {
            return Err(ReportError {
                field: "services".into(),
                problem: format!("more than {MAX_SERVICES} entries"),
            });
        }
        for (i, s) in self.services.iter().enumerate() {
            bounded(format!("services[{i}].unit"), &s.unit)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeName {
        "do-1461-pg-nyc3-01".parse().unwrap()
    }

    fn report() -> StatusReport {
        StatusReport {
            node: node(),
            seq: 3,
            at: 1000,
            phase: Phase::Waiting {
                blocked_on: "do-1461-pg-nyc3-01".into(),
            },
            generation: Some(Generation(2)),
            digest: Some(Sha256::digest(b"x")),
            resources: vec![ResourceReport {
                id: "file:a".parse().unwrap(),
                outcome: Outcome::Changed,
                message: None,
                duration_ms: 3,
            }],
            checks: vec![CheckRecord::compare(node(), "store.pg_version", "17", "17")],
            services: vec![ServiceRestarts {
                unit: "ai-memory-curator.service".into(),
                restarts: 5,
            }],
        }
    }

    #[test]
    fn wire_shape_matches_the_seed_report() {
        let v = serde_json::to_value(report()).unwrap();
        assert_eq!(v["checks"][0]["status"], "PASS");
        assert_eq!(v["phase"]["state"], "waiting");
        assert_eq!(v["resources"][0]["outcome"], "changed");
        assert_eq!(v["services"][0]["restarts"], 5);
        let back: StatusReport = serde_json::from_value(v).unwrap();
        assert_eq!(back, report());
        assert_eq!(
            report().phase.label(),
            "waiting blocked_on=do-1461-pg-nyc3-01"
        );
    }

    #[test]
    fn validate_names_the_field() {
        assert!(report().validate(&node()).is_ok());
        let other: NodeName = "do-1461-pg-fra1-01".parse().unwrap();
        assert_eq!(report().validate(&other).unwrap_err().field, "node");

        let mut r = report();
        r.checks[0].node = other.clone();
        assert_eq!(r.validate(&node()).unwrap_err().field, "checks[0].node");

        let mut r = report();
        r.checks[0].got = "x".repeat(MAX_TEXT + 1);
        assert_eq!(r.validate(&node()).unwrap_err().field, "checks[0].got");

        let mut r = report();
        r.seq = MAX_SEQ + 1;
        assert_eq!(r.validate(&node()).unwrap_err().field, "seq");
        r.seq = MAX_SEQ;
        assert!(r.validate(&node()).is_ok());

        let mut r = report();
        r.digest = None;
        assert_eq!(r.validate(&node()).unwrap_err().field, "digest");

        let mut r = report();
        r.phase = Phase::Applying { done: 4, total: 3 };
        assert_eq!(r.validate(&node()).unwrap_err().field, "phase.done");

        let mut r = report();
        r.services[0].unit = "x".repeat(MAX_TEXT + 1);
        assert_eq!(r.validate(&node()).unwrap_err().field, "services[0].unit");
        let mut r = report();
        r.services = vec![r.services[0].clone(); MAX_SERVICES + 1];
        assert_eq!(r.validate(&node()).unwrap_err().field, "services");
    }

    /// A report from an agent that predates restart counts still reads (no services), and a
    /// report without services is written as that agent wrote it.
    #[test]
    fn reports_without_services_read_and_write_as_before() {
        let mut v = serde_json::to_value(report()).unwrap();
        v.as_object_mut().unwrap().remove("services");
        let old: StatusReport = serde_json::from_value(v.clone()).unwrap();
        assert!(old.services.is_empty());
        assert_eq!(serde_json::to_value(&old).unwrap(), v);
        let mut v = serde_json::to_value(report()).unwrap();
        v["services"][0]["pid"] = 7.into();
        assert!(serde_json::from_value::<StatusReport>(v).is_err());
    }

    #[test]
    fn unknown_fields_and_statuses_are_refused() {
        let mut v = serde_json::to_value(report()).unwrap();
        v["checks"][0]["status"] = "MAYBE".into();
        assert!(serde_json::from_value::<StatusReport>(v).is_err());
        let mut v = serde_json::to_value(report()).unwrap();
        v["admin"] = true.into();
        assert!(serde_json::from_value::<StatusReport>(v).is_err());
    }
}
