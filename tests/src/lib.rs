//! The kit sealvm's integration tests and `cargo xtask` share: where the guest images and
//! binaries are, what this host can virtualize, a launcher for the Linux guest under QEMU,
//! and the processes tests stand up beside the product (swtpm as the host TPM, daemons, a
//! vhost-user-blk load generator). It depends on no product crate, so xtask can use it on a
//! machine where nothing is installed yet.
//!
//! It does not build anything: `cargo xtask images` builds the guest images and
//! `cargo build` the binaries; the kit only finds them and says what to run when they are
//! missing.

pub mod api_doc;
pub mod background;
pub mod command;
pub mod console;
pub mod host;
pub mod loadgen;
pub mod paths;
pub mod qemu;
pub mod sealvm_vm;
pub mod sockets;
pub mod swtpm;

pub use background::{Background, BlkDaemon};
pub use console::Console;
pub use host::Accel;
pub use paths::{GuestImages, Workspace};
pub use qemu::{QemuGuest, QemuGuestBuilder};
pub use sealvm_vm::SealvmVm;
pub use swtpm::SwtpmProcess;

/// The line the Linux guest's init prints on the console once it is ready for commands.
pub const GUEST_READY_LINE: &str = "SEALVM-GUEST-READY";
