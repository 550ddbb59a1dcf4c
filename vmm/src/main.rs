use clap::Parser;

/// sealvm — a KVM virtual machine monitor for shielded VMs.
///
/// Boots guests on /dev/kvm with virtio-mmio block and console devices, and launches sealed
/// bundles whose disk and vTPM state unlock only on a trusted host.
#[derive(Parser)]
#[command(name = "sealvm", version, about, long_about)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
