//! `sealvm helper-partition init`: add the `sealvm-sealed` partition to a helper disk image.

use crate::cli::size::{parse_size, SizeError};
use clap::{Args, Subcommand};
use sealvm_trust::helper_partition::{HelperPartitionError, SealedPartition};
use std::path::PathBuf;

/// `sealvm helper-partition ...`
#[derive(Debug, Args)]
pub struct HelperPartitionArgs {
    #[command(subcommand)]
    command: HelperPartitionCommand,
}

#[derive(Debug, Subcommand)]
enum HelperPartitionCommand {
    /// Create the `sealvm-sealed` GPT partition (fixed type GUID) in a helper disk image,
    /// creating the image or its GPT if missing, and write an empty sealed-key store.
    Init {
        /// The helper guest's disk image.
        image: PathBuf,
        /// Partition size (K, M, G suffixes).
        #[arg(long, default_value = "16M", value_parser = parse_size)]
        size: u64,
        /// Size of the image when it does not exist yet.
        #[arg(long, default_value = "64M", value_parser = parse_size)]
        image_size: u64,
    },
}

/// Errors of the helper-partition subcommand.
#[derive(Debug, thiserror::Error)]
pub enum HelperPartitionCliError {
    /// The partition could not be created.
    #[error(transparent)]
    Partition(#[from] HelperPartitionError),
    /// A size argument was malformed.
    #[error(transparent)]
    Size(#[from] SizeError),
}

/// Runs `sealvm helper-partition`.
pub fn run(args: HelperPartitionArgs) -> Result<(), HelperPartitionCliError> {
    match args.command {
        HelperPartitionCommand::Init {
            image,
            size,
            image_size,
        } => {
            SealedPartition::init(&image, size, image_size)?;
            tracing::info!(image = %image.display(), size, "created sealvm-sealed partition");
            println!("created sealvm-sealed partition in {}", image.display());
            Ok(())
        }
    }
}
