use clap::Parser;

/// sealvm-helper — the recovery-site helper: sealed key partition, standby volumes, failover.
#[derive(Parser)]
#[command(name = "sealvm-helper", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
