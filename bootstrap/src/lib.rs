//! The hiveseed agent's provisioning core: observe the node through a rooted [`host::Host`],
//! [`plan`] (pure: desired vs observed → actions), [`apply`] (the only side effects, one outcome
//! per resource), run node-local [`resources::check`]s, and supervise services where systemd is
//! not PID 1. The agent loop (enroll, fetch, verify, report) drives these.

pub mod agent;
pub mod apply;
pub mod cli;
pub mod client;
pub mod facts;
pub mod host;
pub mod plan;
pub mod resources;
pub mod spawn;
pub mod spool;
pub mod state_file;
pub mod supervisor;
pub mod unit;

pub use apply::{apply, ApplyEnv, ApplyError, ApplyEvent, ApplySettings, ApplySummary};
pub use host::{Host, HostError, RealHost};
pub use plan::{
    observe, observe_manager, plan, Action, CredentialReason, ObserveEnv, ObserveError, Observed,
    Plan, PlanContext, PlanError, ServiceManager, Step,
};
pub use resources::check::{run_checks, CheckEnv};
pub use resources::wait::WaitPolicy;
pub use resources::{
    ArtifactFetcher, BoxFuture, CertSigner, CredentialIssuer, FetchError, NodeReadiness,
    ReadinessError, ResourceError, SignError, Unavailable,
};
pub use supervisor::{Supervisor, SupervisorError, SupervisorSettings};
