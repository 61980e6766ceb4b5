//! kpx-lab: run kpx on one machine.

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "kpx-lab", version, about = "Run a kpx cluster on one machine")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The control plane end to end: kpx-control, a Service and its EndpointSlice, a watch.
    Demo,
    /// Remove labs: every network namespace named kpx-*, and the processes in them.
    Down {
        /// Every lab (required: there is no current lab to pick).
        #[arg(long)]
        all: bool,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    kpx_control::daemon::init_logging("warn");
    match Args::parse().command {
        Command::Demo => kpx_lab::demo::run().await,
        Command::Down { all } => {
            if !all {
                anyhow::bail!("kpx-lab down: pass --all to remove every lab");
            }
            let removed = kpx_lab::lab::down(kpx_lab::lab::LAB_PREFIX)?;
            println!("removed {removed} network namespace(s)");
            Ok(())
        }
    }
}
