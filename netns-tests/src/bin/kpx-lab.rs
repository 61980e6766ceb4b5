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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Args::parse().command {
        Command::Demo => kpx_lab::demo::run().await,
    }
}
