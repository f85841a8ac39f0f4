//! The `seeder` command line: one subcommand per operator step.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::campaign::{self, CampaignDir};
use crate::fleet::Fleet;

#[derive(Debug, Parser)]
#[command(name = "seeder", version, about = "hiveseed control plane")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the campaign directory: CA, seeder certificate, signing keys, fleet secrets.
    /// Keeps whatever already exists.
    Init {
        /// The fleet description.
        #[arg(long)]
        fleet: PathBuf,
        /// The campaign directory (created 0700).
        #[arg(long)]
        dir: PathBuf,
    },
    /// Validate a fleet file and print the nodes it declares.
    Check {
        #[arg(long)]
        fleet: PathBuf,
    },
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Init { fleet, dir } => {
            let parsed = Fleet::load(&fleet)?;
            let log = campaign::init(&CampaignDir::new(&dir), &fleet, &parsed, SystemTime::now())
                .with_context(|| format!("initialising {}", dir.display()))?;
            for line in log {
                println!("{line}");
            }
            Ok(())
        }
        Command::Check { fleet } => {
            let f = Fleet::load(&fleet)?;
            println!(
                "campaign {}: {} nodes in {} regions, W={} (requested {})",
                f.campaign,
                f.nodes.len(),
                f.regions.len(),
                f.federation.quorum_w,
                f.federation.quorum_w_requested
            );
            for n in &f.nodes {
                println!("{:<28} {:<6} {:<6} {}", n.name, n.role, n.region, n.size);
            }
            Ok(())
        }
    }
}
