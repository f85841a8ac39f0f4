//! `bootstrap`: the hiveseed node agent (enroll, verify, plan, apply, report, re-pull).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "bootstrap", version, about = "hiveseed node agent")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
