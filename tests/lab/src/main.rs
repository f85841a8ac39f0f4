//! `lab`: brings a whole hiveseed fleet up on one machine (one chroot per node) and tears it down.

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "lab", about = "hiveseed local lab")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
}
