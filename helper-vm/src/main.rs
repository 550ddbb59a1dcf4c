use clap::Parser;
use sealvm_os::main_setup::{self, run_main, LogDefault};
use std::process::ExitCode;

/// sealvm-helper — the recovery-site helper: sealed key partition, standby volumes, failover.
#[derive(Parser)]
#[command(name = "sealvm-helper", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    verbosity: main_setup::Verbosity,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("sealvm-helper", LogDefault::Warn, cli.verbosity, || Ok(()))
}
