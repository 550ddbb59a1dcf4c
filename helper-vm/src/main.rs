use clap::Parser;
use sealvm_os::main_setup;
use std::process::ExitCode;

/// sealvm-helper — the recovery-site helper: sealed key partition, standby volumes, failover.
#[derive(Parser)]
#[command(name = "sealvm-helper", version, about, long_about)]
struct Cli {
    /// Log more (repeat for more), and print the full error chain on failure.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    main_setup::init_logging(main_setup::LogDefault::Warn, cli.verbose);
    main_setup::finish("sealvm-helper", cli.verbose > 0, Ok(()))
}
