use clap::Parser;

/// sealvm-blk — a vhost-user-blk backend that journals every write.
///
/// Serves volumes to QEMU, cloud-hypervisor or sealvm over a vhost-user socket; every write
/// becomes a journal record for bookmarks, point-in-time recovery and replication.
#[derive(Parser)]
#[command(name = "sealvm-blk", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
