use clap::{Parser, Subcommand};
use sealvm::cli;
use sealvm::cli::run::RunError;
use sealvm_os::main_setup::{self, run_main, LogDefault};
use std::process::ExitCode;

/// sealvm — a KVM virtual machine monitor for shielded VMs.
///
/// Boots guests on /dev/kvm with virtio-mmio block and console devices, and launches sealed
/// bundles whose disk and vTPM state unlock only on a trusted host.
#[derive(Parser)]
#[command(name = "sealvm", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    verbosity: main_setup::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, inspect, reseal or export sealed bundles.
    Bundle(cli::bundle::BundleArgs),
    /// Manage the helper disk's `sealvm-sealed` partition.
    HelperPartition(cli::helper_partition::HelperPartitionArgs),
    /// Boot a VM (--kernel or --config), or launch a sealed bundle on an attested host
    /// (--bundle; --attest-only verifies host and bundle without booting and prints the report).
    Run(Box<cli::run::RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The one-line chain names the failed check ("bundle check failed: VM-state manifest
    // failed its integrity check"); -v adds each cause on its own line.
    run_main("sealvm", LogDefault::Warn, cli.verbosity, || {
        match cli.command {
            Command::Bundle(args) => cli::bundle::run(args).map_err(Into::into),
            Command::HelperPartition(args) => cli::helper_partition::run(args).map_err(Into::into),
            Command::Run(args) => cli::run::run(&args).map_err(|error| match error {
                RunError::NoKernel | RunError::BadArgument(_) => main_setup::usage(error),
                error => error.into(),
            }),
        }
    })
}
