//! `sealvm bundle create|inspect|reseal|export`: provisioning sealed bundles.

use crate::bundle::luks1::{self, LuksError};
use crate::bundle::payload::{Bundle, BundleError, DiskSource, VmManifest};
use crate::cli::launch::{self, LaunchError};
use crate::cli::size::parse_size;
use crate::helper_partition::{HelperPartitionError, SealedPartition};
use crate::tpm::{self, HostTpm, TpmError, DEFAULT_TCTI};
use clap::{Args, Subcommand};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use zeroize::Zeroizing;

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
    },
    /// Show the LUKS header and sealed policy; with a trusted host, the manifest too. Never
    /// prints keys.
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
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Neither --disk nor --disk-size was given.
    #[error("give --disk RAW or --disk-size SIZE")]
    NoDisk,
    /// swtpm_setup failed to manufacture the vTPM.
    #[error("swtpm_setup failed to manufacture the vTPM: {0}")]
    Swtpm(String),
    /// The bundle failed.
    #[error(transparent)]
    Bundle(#[from] BundleError),
    /// The LUKS layer failed.
    #[error(transparent)]
    Luks(#[from] LuksError),
    /// The host TPM failed.
    #[error(transparent)]
    Tpm(#[from] TpmError),
    /// The helper partition failed.
    #[error(transparent)]
    Helper(#[from] HelperPartitionError),
    /// Attestation or opening failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// Output could not be encoded.
    #[error("cannot encode output")]
    Json(#[source] serde_json::Error),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> BundleCliError {
    let path = path.display().to_string();
    move |source| BundleCliError::File { path, source }
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
        } => {
            let manifest = VmManifest {
                vcpus: cpus,
                memory_mib: memory >> 20,
                cmdline,
                kernel_sha256: sha256_file(&kernel)?,
                initramfs_sha256: initramfs.as_deref().map(sha256_file).transpose()?,
            };
            let source = match (&disk, disk_size) {
                (Some(raw), _) => DiskSource::Raw(raw),
                (None, Some(size)) => DiskSource::Empty(size),
                (None, None) => return Err(BundleCliError::NoDisk),
            };
            let id = create(
                &bundle,
                &tpm,
                &tpm::parse_pcr_list(&pcrs)?,
                &manifest,
                source,
            )?;
            println!("{id}");
            Ok(())
        }
        BundleCommand::Inspect { bundle, tpm } => inspect(&bundle, &tpm),
        BundleCommand::Reseal { bundle, tpm, pcrs } => reseal(&bundle, &tpm, pcrs.as_deref()),
        BundleCommand::Export {
            bundle,
            tpm,
            output,
        } => export(&bundle, &tpm, &output),
    }
}

fn create(
    path: &Path,
    tpm: &TpmArgs,
    pcrs: &[u8],
    manifest: &VmManifest,
    disk: DiskSource<'_>,
) -> Result<String, BundleCliError> {
    // Check the helper partition and TPM before writing anything.
    let partition = SealedPartition::open(&tpm.helper_disk, true)?;
    let mut host = HostTpm::connect(&tpm.tcti)?;
    let secret = new_secret()?;
    let mut bundle = Bundle::create(path, secret.as_bytes(), manifest, &[], disk)?;
    let result = (|| {
        let state = manufacture_vtpm(&launch::vtpm_key_hex(&bundle))?;
        bundle.write_vtpm_state(&state)?;
        let sealed = host.seal(&bundle.id(), pcrs, secret.as_bytes())?;
        partition.put(sealed)?;
        Ok(bundle.id())
    })();
    if result.is_err() {
        // A bundle whose key was never sealed can never open: do not leave it behind.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// A fresh key-slot secret: 256 random bits as 64 hex characters (printable, so qemu-img's
/// `secret,data=` and cryptsetup accept it verbatim).
fn new_secret() -> Result<Zeroizing<String>, BundleCliError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut raw[..]).map_err(LuksError::Random)?;
    Ok(Zeroizing::new(hex::encode(&raw[..])))
}

/// Manufactures a vTPM with swtpm_setup (EK created, sha256 bank) in a private directory on
/// /dev/shm (memory, not persistent storage), its state encrypted with `key_hex`, and
/// returns swtpm's state blob.
pub fn manufacture_vtpm(key_hex: &str) -> Result<Vec<u8>, BundleCliError> {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = tempfile::Builder::new()
        .prefix("sealvm-vtpm-")
        .tempdir_in(&base)
        .map_err(file_err(&base))?;
    let keyfile = dir.path().join("key");
    let mut f = File::create(&keyfile).map_err(file_err(&keyfile))?;
    f.write_all(key_hex.as_bytes())
        .map_err(file_err(&keyfile))?;
    drop(f);
    let out = Command::new("swtpm_setup")
        .args([
            "--tpm2",
            "--createek",
            "--pcr-banks",
            "sha256",
            "--overwrite",
        ])
        .arg("--tpmstate")
        .arg(dir.path())
        .arg("--keyfile")
        .arg(&keyfile)
        .output()
        .map_err(|e| BundleCliError::Swtpm(e.to_string()))?;
    if !out.status.success() {
        return Err(BundleCliError::Swtpm(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let state_path = dir.path().join("tpm2-00.permall");
    std::fs::read(&state_path).map_err(file_err(&state_path))
}

#[derive(Serialize)]
struct Inspection {
    bundle_id: String,
    luks_version: u16,
    cipher: String,
    hash: String,
    key_bits: u32,
    payload_offset_sectors: u32,
    active_key_slots: Vec<usize>,
    sealed_pcrs: Option<Vec<u8>>,
    host_trusted: Option<bool>,
    manifest: Option<VmManifest>,
    disk_bytes: Option<u64>,
    vtpm_state_bytes: Option<usize>,
    vtpm_generation: Option<u64>,
}

fn inspect(path: &Path, tpm: &TpmArgs) -> Result<(), BundleCliError> {
    let file = File::open(path).map_err(file_err(path))?;
    let header = luks1::read_header(&file)?;
    let mut out = Inspection {
        bundle_id: header.uuid.clone(),
        luks_version: luks1::LUKS_VERSION,
        cipher: format!("{}-{}", header.cipher_name, header.cipher_mode),
        hash: header.hash_spec.clone(),
        key_bits: header.key_bytes * 8,
        payload_offset_sectors: header.payload_offset,
        active_key_slots: header
            .key_slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.active)
            .map(|(i, _)| i)
            .collect(),
        sealed_pcrs: None,
        host_trusted: None,
        manifest: None,
        disk_bytes: None,
        vtpm_state_bytes: None,
        vtpm_generation: None,
    };
    if let Ok(sealed) =
        SealedPartition::open(&tpm.helper_disk, false).and_then(|p| p.get(&header.uuid))
    {
        out.sealed_pcrs = Some(sealed.pcrs.clone());
        match launch::attest_and_open(path, &tpm.helper_disk, &tpm.tcti, false) {
            Ok(opened) => {
                out.host_trusted = Some(true);
                out.disk_bytes = Some(opened.bundle.disk_bytes());
                out.vtpm_state_bytes = Some(opened.vtpm_state.len());
                out.vtpm_generation = Some(opened.bundle.vtpm_generation());
                out.manifest = Some(opened.manifest);
            }
            Err(error) => {
                tracing::warn!(%error, "manifest not shown: bundle does not open on this host");
                out.host_trusted = Some(false);
            }
        }
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&out).map_err(BundleCliError::Json)?
    );
    Ok(())
}

fn reseal(path: &Path, tpm: &TpmArgs, pcrs: Option<&str>) -> Result<(), BundleCliError> {
    let partition = SealedPartition::open(&tpm.helper_disk, true)?;
    let (old_secret, _, _) = launch::attest_and_unseal(path, &tpm.helper_disk, &tpm.tcti)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(file_err(path))?;
    let (mut header, master_key, old_slot) = luks1::unlock(&file, &old_secret)?;
    let old_record = partition.get(&header.uuid)?;
    let pcrs = match pcrs {
        Some(list) => tpm::parse_pcr_list(list)?,
        None => old_record.pcrs.clone(),
    };
    let secret = new_secret()?;
    let new_slot = if old_slot == 0 { 1 } else { 0 };
    // New slot first, then the new sealed record, then drop the old slot: a crash at any
    // point leaves at least one secret that both opens a slot and is sealed.
    luks1::set_key_slot(&file, &mut header, &master_key, new_slot, secret.as_bytes())?;
    let sealed = HostTpm::connect(&tpm.tcti)?.seal(&header.uuid, &pcrs, secret.as_bytes())?;
    partition.put(sealed)?;
    luks1::kill_key_slot(&file, &mut header, old_slot)?;
    println!(
        "resealed {} to PCRs {:?} (key slot {new_slot})",
        header.uuid, pcrs
    );
    Ok(())
}

fn export(path: &Path, tpm: &TpmArgs, output: &Path) -> Result<(), BundleCliError> {
    let opened = launch::attest_and_open(path, &tpm.helper_disk, &tpm.tcti, false)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(output)
        .map_err(file_err(output))?;
    let chunk = 1u64 << 20;
    let mut buf = Zeroizing::new(vec![0u8; chunk as usize]);
    let mut offset = 0;
    while offset < opened.bundle.disk_bytes() {
        let len = chunk.min(opened.bundle.disk_bytes() - offset) as usize;
        opened.bundle.read_disk(offset, &mut buf[..len])?;
        out.write_all(&buf[..len]).map_err(file_err(output))?;
        offset += len as u64;
    }
    out.sync_all().map_err(file_err(output))?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String, BundleCliError> {
    let mut file = File::open(path).map_err(file_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(file_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}
