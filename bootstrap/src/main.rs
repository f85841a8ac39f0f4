//! `bootstrap`: the hiveseed node agent (enroll, verify, plan, apply, report, re-pull).

use clap::Parser;

fn main() -> std::process::ExitCode {
    hiveseed_bootstrap::cli::init_logging();
    hiveseed_bootstrap::cli::run(hiveseed_bootstrap::cli::Cli::parse())
}
