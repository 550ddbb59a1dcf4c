//! `sealvm bundle create|inspect|reseal|export`: the command line over
//! `sealvm_trust::provision`.

use crate::cli::size::parse_size;
use clap::{Args, Subcommand};
use sealvm_trust::bundle::payload::{CreateOptions, DiskSource};
use sealvm_trust::provision::{self, HostAccess, ProvisionError};
use sealvm_trust::tpm::{self, TpmError, DEFAULT_TCTI};
use std::path::PathBuf;

/// `sealvm bundle ...`
#[derive(Debug, Args)]
pub struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(Debug, Args)]
struct TpmArgs {
    /// The helper disk image holding the `sealvm-sealed` partition.
    #[arg(long)]
    helper_disk: PathBuf,
    /// The host TPM's TCTI.
    #[arg(long, default_value = DEFAULT_TCTI)]
    tcti: String,
}

impl TpmArgs {
    fn host(&self) -> HostAccess {
        HostAccess {
            helper_disk: self.helper_disk.clone(),
            tcti: self.tcti.clone(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum BundleCommand {
    /// Create a bundle: encrypt the disk, record the VM config, manufacture a vTPM with
    /// swtpm_setup, and seal the key to the host TPM's PCRs into the helper partition.
    Create {
        /// The bundle file to create (must not exist).
        bundle: PathBuf,
        #[command(flatten)]
        tpm: TpmArgs,
        /// PCRs the key is sealed to (sha256 bank).
        #[arg(long, default_value = "0,2,4,7")]
        pcrs: String,
        /// Guest kernel; its SHA-256 goes into the manifest.
        #[arg(long)]
        kernel: PathBuf,
        /// Guest initramfs; its SHA-256 goes into the manifest.
        #[arg(long)]
        initramfs: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Guest memory (K, M, G suffixes).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Raw disk image to encrypt into the bundle.
        #[arg(long, conflicts_with = "disk_size")]
        disk: Option<PathBuf>,
        /// Size of an empty disk instead of --disk.
        #[arg(long, value_parser = parse_size)]
        disk_size: Option<u64>,
        /// Tamper-evident disk: a MAC per sector, checked on every read (a changed sector
        /// is an I/O error to the guest, never wrong data). Costs 1/16 more space.
        #[arg(long)]
        integrity: bool,
    },
    /// Show the LUKS header and sealed policy; with a trusted host, the manifest too. Never
    /// prints keys. Exits non-zero, naming each check, when it could not check something
    /// (helper disk, sealed record, host TPM, host trust, bundle integrity).
    Inspect {
        /// The bundle.
        bundle: PathBuf,
        #[command(flatten)]
        tpm: TpmArgs,
    },
    /// Re-seal to the host's current PCRs (after a planned host update) with a new key-slot
    /// secret; the disk is not re-encrypted. The host must still satisfy the old policy.
    Reseal {
        /// The bundle.
        bundle: PathBuf,
        #[command(flatten)]
        tpm: TpmArgs,
        /// New PCR set (default: keep the sealed set).
        #[arg(long)]
        pcrs: Option<String>,
    },
    /// Disaster recovery: accept this older copy of the bundle as current (its rollback
    /// generation is set to the host TPM counter's), when the newest copy is lost. Only on
    /// an attested host; logged.
    AcceptRollback {
        /// The bundle.
        bundle: PathBuf,
        #[command(flatten)]
        tpm: TpmArgs,
    },
    /// Write the decrypted guest disk to a raw file; only on an attested host.
    Export {
        /// The bundle.
        bundle: PathBuf,
        #[command(flatten)]
        tpm: TpmArgs,
        /// The raw output file (must not exist).
        #[arg(long)]
        output: PathBuf,
    },
}

/// Errors of the bundle subcommands.
#[derive(Debug, thiserror::Error)]
pub enum BundleCliError {
    /// Neither --disk nor --disk-size was given.
    #[error("give --disk RAW or --disk-size SIZE")]
    NoDisk,
    /// A PCR list was malformed.
    #[error(transparent)]
    Pcrs(#[from] TpmError),
    /// The workflow failed.
    #[error(transparent)]
    Provision(#[from] ProvisionError),
    /// `bundle inspect` could not check everything it reports (each check and why).
    #[error("bundle inspect could not check everything: {0}")]
    Unchecked(String),
    /// Output could not be encoded.
    #[error("cannot encode output")]
    Json(#[source] serde_json::Error),
}

/// Runs `sealvm bundle`.
pub fn run(args: BundleArgs) -> Result<(), BundleCliError> {
    match args.command {
        BundleCommand::Create {
            bundle,
            tpm,
            pcrs,
            kernel,
            initramfs,
            cmdline,
            cpus,
            memory,
            disk,
            disk_size,
            integrity,
        } => {
            let manifest =
                provision::manifest_for(&kernel, initramfs.as_deref(), cmdline, cpus, memory)?;
            let source = match (&disk, disk_size) {
                (Some(raw), _) => DiskSource::Raw(raw),
                (None, Some(size)) => DiskSource::Empty(size),
                (None, None) => return Err(BundleCliError::NoDisk),
            };
            let pcrs = tpm::parse_pcr_list(&pcrs)?;
            let id = provision::create(
                &bundle,
                &tpm.host(),
                &pcrs,
                &manifest,
                source,
                CreateOptions { integrity },
            )?;
            println!("{id}");
            Ok(())
        }
        BundleCommand::Inspect { bundle, tpm } => {
            let inspection = provision::inspect(&bundle, &tpm.host())?;
            let json = serde_json::to_string_pretty(&inspection).map_err(BundleCliError::Json)?;
            println!("{json}");
            if inspection.failures.is_empty() {
                Ok(())
            } else {
                Err(BundleCliError::Unchecked(
                    inspection
                        .failures
                        .iter()
                        .map(|f| format!("{}: {}", f.check, f.error))
                        .collect::<Vec<_>>()
                        .join("; "),
                ))
            }
        }
        BundleCommand::Reseal { bundle, tpm, pcrs } => {
            let pcrs = pcrs.as_deref().map(tpm::parse_pcr_list).transpose()?;
            let done = provision::reseal(&bundle, &tpm.host(), pcrs.as_deref())?;
            println!(
                "resealed {} to PCRs {:?} (key slot {})",
                done.bundle_id, done.pcrs, done.key_slot
            );
            Ok(())
        }
        BundleCommand::AcceptRollback { bundle, tpm } => {
            let (old, host) = provision::accept_rollback(&bundle, &tpm.host())?;
            // Always on stderr, whatever RUST_LOG says: this undoes a protection.
            eprintln!(
                "sealvm: WARNING: accepting an older copy of {} (generation {old}, host counter \
                 {host}); its next launch moves the counter past every other copy",
                bundle.display()
            );
            println!(
                "accepted {} as current: its generation {old} is now the host counter's {host}",
                bundle.display()
            );
            Ok(())
        }
        BundleCommand::Export {
            bundle,
            tpm,
            output,
        } => Ok(provision::export(&bundle, &tpm.host(), &output)?),
    }
}
