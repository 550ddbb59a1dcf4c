use clap::Parser;

/// sealvm-agent — the guest agent for application-consistent snapshots.
///
/// Runs inside the guest and answers qemu-guest-agent protocol commands on a virtio port.
#[derive(Parser)]
#[command(name = "sealvm-agent", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
