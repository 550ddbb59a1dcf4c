use clap::{Parser, Subcommand};
use sealvm::cli;

/// sealvm — a KVM virtual machine monitor for shielded VMs.
///
/// Boots guests on /dev/kvm with virtio-mmio block and console devices, and launches sealed
/// bundles whose disk and vTPM state unlock only on a trusted host.
#[derive(Parser)]
#[command(name = "sealvm", version, about, long_about)]
struct Cli {
    /// Print the full error chain on failure.
    #[arg(short, long, global = true)]
    verbose: bool,
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

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result: anyhow::Result<()> = match cli.command {
        Command::Bundle(args) => cli::bundle::run(args).map_err(Into::into),
        Command::HelperPartition(args) => cli::helper_partition::run(args).map_err(Into::into),
        Command::Run(args) => cli::run::run(&args).map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The one-line chain names the failed check ("bundle check failed: VM-state
            // manifest failed its integrity check"); -v adds the structured detail.
            eprintln!("sealvm: {error:#}");
            if cli.verbose {
                eprintln!("{error:?}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
