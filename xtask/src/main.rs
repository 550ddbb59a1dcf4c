//! `cargo xtask`: set-up, guest images, demo, test and bench for the sealvm workspace.

mod bench;
mod cpio;
mod demo;
mod demo_bundle;
mod demo_vmm;
mod images;
mod setup;
mod test;

use clap::{Parser, Subcommand};

/// Developer tasks for sealvm. Every command installs or builds what it needs first.
#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the Debian packages sealvm's tests and demo need (does nothing when all are
    /// there; needs root to install).
    Setup,
    /// Build the guest images into images/build/ (nothing is rebuilt when its inputs did not
    /// change).
    Images,
    /// Show the main job: boot the Linux guest and show it working.
    Demo,
    /// Everything CI runs: setup, images, rustfmt, clippy and every test.
    Test,
    /// Run the benchmarks and print one table, sealvm beside its peers.
    Bench {
        /// Run one group only: boot, agent, vmm, blk, journal or bundle.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let workspace = sealvm_testkit::Workspace::locate();
    match cli.command {
        Task::Setup => setup::run(),
        Task::Images => images::build_all(&workspace).map(|_| ()),
        Task::Demo => demo::run(&workspace),
        Task::Test => test::run(&workspace),
        Task::Bench { only } => bench::run_benchmarks(&workspace, only.as_deref()),
    }
}
