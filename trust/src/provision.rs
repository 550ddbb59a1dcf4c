//! Provisioning sealed bundles: create (encrypt the disk, manufacture the vTPM, seal the
//! key), inspect, reseal to new PCRs, export the decrypted disk. Each is a library function
//! over a [`HostAccess`] (the helper disk and the host TPM); `sealvm bundle` prints what
//! they return. Nothing here boots a VM.

use crate::bundle::luks1::{self, LuksError};
use crate::bundle::payload::{
    Bundle, BundleError, CreateOptions, DiskSource, RollbackMark, VmManifest,
};
use crate::helper_partition::{HelperPartitionError, SealedPartition};
use crate::launch::{self, LaunchError};
use crate::tpm::scratch::Scratch;
use crate::tpm::tied_child::{self, SecretPipe};
use crate::tpm::vtpm::VtpmError;
use crate::tpm::{HostTpm, TpmError};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use zeroize::Zeroizing;

/// Where a bundle's sealed key lives and which TPM seals it.
#[derive(Debug, Clone)]
pub struct HostAccess {
    /// The helper disk image holding the `sealvm-sealed` partition.
    pub helper_disk: PathBuf,
    /// The host TPM's TCTI.
    pub tcti: String,
}

/// Errors of the provisioning workflows.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    File {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// swtpm_setup could not be started.
    #[error("cannot run swtpm_setup (is swtpm-tools installed?)")]
    SwtpmSpawn(#[source] std::io::Error),
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
    /// The exported disk could not be written.
    #[error(transparent)]
    Export(#[from] sealvm_os::durable::ReplaceError),
    /// The vTPM's private scratch directory could not be made.
    #[error(transparent)]
    Vtpm(#[from] VtpmError),
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError {
    let path = path.display().to_string();
    move |source| ProvisionError::File { path, source }
}

/// Builds a manifest for a new bundle from the boot files (hashed here) and the VM shape.
pub fn manifest_for(
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: String,
    vcpus: u32,
    memory_bytes: u64,
) -> Result<VmManifest, ProvisionError> {
    Ok(VmManifest {
        vcpus,
        memory_mib: memory_bytes >> 20,
        cmdline,
        kernel_sha256: sha256_file(kernel)?,
        initramfs_sha256: initramfs.map(sha256_file).transpose()?,
    })
}

/// Creates the bundle at `path` (which must not exist): encrypts `disk` into it (with a MAC
/// per sector when `options.integrity`), records `manifest`, manufactures a vTPM, and seals a fresh key-slot secret to `pcrs` of the host
/// TPM into the helper partition. Returns the bundle id. On failure nothing is left behind.
pub fn create(
    path: &Path,
    host: &HostAccess,
    pcrs: &[u8],
    manifest: &VmManifest,
    disk: DiskSource<'_>,
    options: CreateOptions,
) -> Result<String, ProvisionError> {
    // Check the helper partition and TPM before writing anything.
    let partition = SealedPartition::open(&host.helper_disk, true)?;
    let mut host = HostTpm::connect(&host.tcti)?;
    let secret = new_secret()?;
    let mut bundle = Bundle::create_with(path, secret.as_bytes(), manifest, &[], disk, options)?;
    let result = (|| {
        let state = manufacture_vtpm(&launch::vtpm_key_hex(&bundle))?;
        bundle.write_vtpm_state(&state)?;
        // Rollback protection: a counter of its own on the host TPM, its value in the
        // bundle's authenticated superblock, its index in the sealed record too.
        let preferred = u32::from_le_bytes(
            Sha256::digest(bundle.id().as_bytes())[..4]
                .try_into()
                .unwrap_or([0; 4]),
        );
        let (counter_index, generation) = host.define_counter(preferred)?;
        bundle.write_rollback_mark(RollbackMark {
            counter_index,
            generation,
        })?;
        let mut sealed = host.seal(&bundle.id(), pcrs, secret.as_bytes())?;
        sealed.rollback_counter = Some(counter_index);
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
pub(crate) fn new_secret() -> Result<Zeroizing<String>, ProvisionError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut raw[..]).map_err(LuksError::Random)?;
    Ok(Zeroizing::new(hex::encode(&raw[..])))
}

/// Manufactures a vTPM with swtpm_setup (EK created, sha256 bank) in a private scratch
/// directory on memory (0700 on /dev/shm, never a disk; swtpm_setup 0.7 makes its state
/// file 0640 whatever the umask, so the directory is what keeps others out), encrypted with
/// `key_hex`, which swtpm_setup reads from a pipe (`--keyfile-fd`), never a file. Returns
/// swtpm's state blob.
pub fn manufacture_vtpm(key_hex: &str) -> Result<Zeroizing<Vec<u8>>, ProvisionError> {
    let scratch = Scratch::create().map_err(VtpmError::Scratch)?;
    let dir = scratch.path();
    let key = SecretPipe::new(key_hex.as_bytes()).map_err(ProvisionError::SwtpmSpawn)?;
    let mut command = Command::new("swtpm_setup");
    command
        .args([
            "--tpm2",
            "--createek",
            "--pcr-banks",
            "sha256",
            "--overwrite",
        ])
        .arg("--tpmstate")
        .arg(dir)
        .arg("--keyfile-fd")
        .arg(key.fd().to_string());
    let out = tied_child::output(command, Some(&key)).map_err(ProvisionError::SwtpmSpawn)?;
    if !out.status.success() {
        return Err(ProvisionError::Swtpm(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    let state_path = dir.join("tpm2-00.permall");
    std::fs::read(&state_path)
        .map(Zeroizing::new)
        .map_err(file_err(&state_path))
}

/// What `bundle inspect` reports; never a key. Fields it could not check are `null` and
/// the reason is in `failures`.
#[derive(Debug, Serialize)]
pub struct Inspection {
    bundle_id: String,
    luks_version: u16,
    cipher: String,
    hash: String,
    key_bits: u32,
    payload_offset_sectors: u32,
    active_key_slots: Vec<usize>,
    sealed_pcrs: Option<Vec<u8>>,
    host_trusted: Option<bool>,
    bundle_verified: Option<bool>,
    manifest: Option<VmManifest>,
    disk_bytes: Option<u64>,
    vtpm_state_bytes: Option<usize>,
    vtpm_generation: Option<u64>,
    rollback_counter: Option<u32>,
    rollback_generation: Option<u64>,
    disk_integrity: Option<bool>,
    /// Each check that could not be made or failed, with its error chain.
    pub failures: Vec<InspectFailure>,
}

/// One check `bundle inspect` could not complete.
#[derive(Debug, Clone, Serialize)]
pub struct InspectFailure {
    /// Which check: "helper partition", "sealed record", "host TPM", "host attestation",
    /// "bundle".
    pub check: &'static str,
    /// What failed, with its causes.
    pub error: String,
}

/// An error and its causes on one line.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// Reads the LUKS header, the sealed policy, attests the host and, on a trusted host, opens
/// and verifies the bundle to report the manifest too. A header that does not parse is an
/// error; every later check that cannot be made is recorded in [`Inspection::failures`]
/// (the host's trust is reported apart from whether the bundle verifies).
pub fn inspect(path: &Path, host: &HostAccess) -> Result<Inspection, ProvisionError> {
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
        bundle_verified: None,
        manifest: None,
        disk_bytes: None,
        vtpm_state_bytes: None,
        vtpm_generation: None,
        rollback_counter: None,
        rollback_generation: None,
        disk_integrity: None,
        failures: Vec::new(),
    };
    let fail = |check: &'static str, error: &dyn std::error::Error| InspectFailure {
        check,
        error: error_chain(error),
    };
    let partition = match SealedPartition::open(&host.helper_disk, false) {
        Ok(partition) => partition,
        Err(error) => {
            out.failures.push(fail("helper partition", &error));
            return Ok(out);
        }
    };
    match partition.get(&header.uuid) {
        Ok(sealed) => out.sealed_pcrs = Some(sealed.pcrs.clone()),
        Err(error) => {
            out.failures.push(fail("sealed record", &error));
            return Ok(out);
        }
    }
    let (report, opened) =
        match launch::attest_then_open(path, &host.helper_disk, &host.tcti, false) {
            Ok(result) => result,
            Err(error) => {
                out.failures.push(fail("host TPM", &error));
                return Ok(out);
            }
        };
    let trusted = report.trusted && report.tpm_matches;
    out.host_trusted = Some(trusted);
    match opened {
        Ok(opened) => {
            out.bundle_verified = Some(true);
            out.disk_bytes = Some(opened.bundle.disk_bytes());
            out.vtpm_state_bytes = Some(opened.vtpm_state.len());
            out.vtpm_generation = Some(opened.bundle.vtpm_generation());
            let mark = opened.bundle.rollback_mark();
            out.rollback_counter = mark.map(|m| m.counter_index);
            out.rollback_generation = mark.map(|m| m.generation);
            out.disk_integrity = Some(opened.bundle.has_integrity());
            out.manifest = Some(opened.manifest);
        }
        Err(error) if !trusted => out.failures.push(fail("host attestation", &error)),
        Err(error) => {
            out.bundle_verified = Some(false);
            out.failures.push(fail("bundle", &error));
        }
    }
    Ok(out)
}

/// Re-seals the bundle to the host's current PCRs (`pcrs`, or the sealed set) with a new
/// key-slot secret; the disk is not re-encrypted. Returns the id, PCRs and new key slot.
pub fn reseal(
    path: &Path,
    host: &HostAccess,
    pcrs: Option<&[u8]>,
) -> Result<Resealed, ProvisionError> {
    let partition = SealedPartition::open(&host.helper_disk, true)?;
    let (old_secret, _, _) = launch::attest_and_unseal(path, &host.helper_disk, &host.tcti)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(file_err(path))?;
    let (mut header, master_key, old_slot) = luks1::unlock(&file, &old_secret)?;
    let old_record = partition.get(&header.uuid)?;
    let pcrs = match pcrs {
        Some(list) => list.to_vec(),
        None => old_record.pcrs.clone(),
    };
    let secret = new_secret()?;
    let new_slot = if old_slot == 0 { 1 } else { 0 };
    // New slot first, then the new sealed record, then drop the old slot: a crash at any
    // point leaves at least one secret that both opens a slot and is sealed.
    luks1::set_key_slot(&file, &mut header, &master_key, new_slot, secret.as_bytes())?;
    let mut sealed = HostTpm::connect(&host.tcti)?.seal(&header.uuid, &pcrs, secret.as_bytes())?;
    sealed.rollback_counter = old_record.rollback_counter;
    partition.put(sealed)?;
    luks1::kill_key_slot(&file, &mut header, old_slot)?;
    Ok(Resealed {
        bundle_id: header.uuid.clone(),
        pcrs,
        key_slot: new_slot,
    })
}

/// Writes the decrypted guest disk to `output` (which must not exist) with mode 0600, only
/// on an attested host. The file appears under its name only once complete and synced
/// (sealvm-os's durable replacement).
pub fn export(path: &Path, host: &HostAccess, output: &Path) -> Result<(), ProvisionError> {
    let opened = launch::attest_and_open(path, &host.helper_disk, &host.tcti, false)?;
    if output.symlink_metadata().is_ok() {
        return Err(ProvisionError::File {
            path: output.display().to_string(),
            source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        });
    }
    let mut read_error = None;
    sealvm_os::durable::replace_stream(output, 0o600, |out| {
        let chunk = 1u64 << 20;
        let mut buf = Zeroizing::new(vec![0u8; chunk as usize]);
        let mut offset = 0;
        while offset < opened.bundle.disk_bytes() {
            let len = chunk.min(opened.bundle.disk_bytes() - offset) as usize;
            if let Err(error) = opened.bundle.read_disk(offset, &mut buf[..len]) {
                read_error = Some(error);
                return Err(std::io::Error::other("bundle read failed"));
            }
            out.write_all(&buf[..len])?;
            offset += len as u64;
        }
        Ok(())
    })
    .map_err(|error| match read_error.take() {
        Some(bundle_error) => ProvisionError::Bundle(bundle_error),
        None => ProvisionError::Export(error),
    })
}

/// Accepts an older copy of a bundle as current (disaster recovery: the newest copy is
/// lost): on an attested host, opens the bundle without the rollback check and records the
/// host counter's current value in it, so it launches again. Logged as a warning; returns
/// (the bundle's old generation, the counter's value).
pub fn accept_rollback(path: &Path, host: &HostAccess) -> Result<(u64, u64), ProvisionError> {
    let (_, opened) =
        launch::attest_then_open_unchecked_rollback(path, &host.helper_disk, &host.tcti)?;
    let mut opened = opened?;
    let mark = opened
        .bundle
        .rollback_mark()
        .ok_or(LaunchError::NoRollbackCounter)?;
    let current = HostTpm::connect(&host.tcti)?.read_counter(mark.counter_index)?;
    tracing::warn!(
        bundle = %path.display(),
        bundle_generation = mark.generation,
        host_generation = current,
        "accepting an older copy of the bundle: its rollback generation is set to the host counter"
    );
    opened.bundle.write_rollback_mark(RollbackMark {
        counter_index: mark.counter_index,
        generation: current.max(mark.generation),
    })?;
    Ok((mark.generation, current))
}

/// The SHA-256 of a file, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, ProvisionError> {
    let mut file = File::open(path).map_err(file_err(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(file_err(path))?;
    Ok(hex::encode(hasher.finalize()))
}

/// What [`reseal`] did.
#[derive(Debug, Clone)]
pub struct Resealed {
    /// The bundle's id.
    pub bundle_id: String,
    /// The PCRs it is sealed to now.
    pub pcrs: Vec<u8>,
    /// The key slot that holds the new secret.
    pub key_slot: usize,
}
