//! Subcommands of the `sealvm` binary: each module holds its clap arguments and the code
//! that runs it, so `main.rs` only dispatches.

pub mod bundle;
pub mod helper_partition;
pub mod launch;
pub mod run;
pub mod signals;
pub mod size;
