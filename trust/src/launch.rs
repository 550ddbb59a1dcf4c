//! Trusted launch up to the point where the VMM takes over: attest the host against the
//! bundle's sealed policy, unseal the key-slot secret, open the bundle and verify its
//! regions.
//!
//! The boot path of a VMM, in order: [`attest_and_open`] → [`read_verified_boot_files`]
//! (the kernel and initramfs read once and checked against [`OpenedBundle::manifest`]; the
//! VMM boots the returned bytes, never the paths) → [`advance_rollback`] (the bundle's
//! generation, then the host TPM counter) → start the guest's vTPM with
//! `crate::tpm::vtpm::Vtpm::start(&opened.vtpm_state, &opened.vtpm_key_hex(), false)` and
//! point a TPM CRB device at its unix sockets → serve the disk through
//! `Bundle::read_disk`/`write_disk` (per-sector XTS, no plaintext on disk) → on shutdown
//! `vtpm.stop_and_write_back(&mut opened.bundle)`. This module does not boot anything.

use crate::bundle::luks1::{self, LuksError};
use crate::bundle::payload::{Bundle, BundleError, VmManifest};
use crate::helper_partition::{HelperPartitionError, SealedPartition};
use crate::tpm::{AttestationReport, HostTpm, TpmError};
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// Errors that stop a launch before any guest code runs; each names the failed check.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The bundle file cannot be opened.
    #[error("cannot open bundle {path}")]
    BundleFile {
        /// The bundle path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The bundle's LUKS header is unreadable (not a bundle, truncated).
    #[error("bundle header check failed")]
    Header(#[source] LuksError),
    /// The helper partition is missing or has no record for this bundle.
    #[error("helper partition check failed")]
    HelperPartition(#[from] HelperPartitionError),
    /// The host TPM could not be reached or refused.
    #[error("host TPM check failed")]
    Tpm(#[from] TpmError),
    /// The bundle did not open or verify with the unsealed key.
    #[error("bundle check failed")]
    Bundle(#[from] BundleError),
    /// The host is not in the sealed state; the report says which PCRs differ.
    #[error("host attestation failed: PCR {pcrs:?} differ from the sealed policy")]
    Untrusted {
        /// The PCRs that differ.
        pcrs: Vec<u8>,
    },
    /// The host TPM is not the one the key was sealed on.
    #[error(
        "host attestation failed: TPM identity check failed (not the TPM the key was sealed on)"
    )]
    OtherTpm,
    /// A kernel or initramfs differs from the digest in the bundle's manifest.
    #[error("{what} {path} does not match the SHA-256 recorded in the bundle manifest")]
    BootFileDigest {
        /// "kernel" or "initramfs".
        what: &'static str,
        /// The file given.
        path: String,
    },
    /// The bundle is an older copy than the host TPM's counter says was last launched.
    #[error(
        "this bundle is an older copy: generation {bundle}, the host TPM says {host} (restore \
         the newest copy; if none survives, `sealvm bundle accept-rollback` takes this one, \
         logged)"
    )]
    Rollback {
        /// The generation recorded in the bundle.
        bundle: u64,
        /// The host TPM counter's value.
        host: u64,
    },
    /// The sealed record and the bundle name different rollback counters (or only one has
    /// one): one of them was tampered with or replaced by an older copy.
    #[error(
        "the bundle's rollback counter ({bundle:?}) differs from the sealed record's ({record:?})"
    )]
    RollbackCounterMismatch {
        /// The NV index in the bundle's superblock.
        bundle: Option<u32>,
        /// The NV index in the sealed record.
        record: Option<u32>,
    },
    /// The bundle has no rollback counter (made before rollback protection).
    #[error("the bundle has no rollback counter (made before rollback protection)")]
    NoRollbackCounter,
    /// A boot file could not be read.
    #[error("cannot read {path}")]
    BootFile {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A bundle opened on an attested host: everything the VMM needs to boot it.
pub struct OpenedBundle {
    /// The open bundle (guest disk access, vTPM write-back).
    pub bundle: Bundle,
    /// The verified VM-state manifest.
    pub manifest: VmManifest,
    /// The verified vTPM state blob (swtpm's `tpm2-00.permall`, itself encrypted with
    /// [`OpenedBundle::vtpm_key_hex`]).
    pub vtpm_state: Zeroizing<Vec<u8>>,
    /// The attestation report that allowed the launch.
    pub report: AttestationReport,
    /// Time per step: attest, unseal, open (LUKS + HMAC checks).
    pub timings: LaunchTimings,
}

/// How long each launch step took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LaunchTimings {
    /// Reading PCRs and comparing them with the policy.
    pub attest: Duration,
    /// Unsealing through the policy session.
    pub unseal: Duration,
    /// Opening the LUKS key slot and verifying the regions.
    pub open: Duration,
}

impl OpenedBundle {
    /// The 128-bit AES key (32 hex digits) for swtpm's `--key file=...,format=hex`, derived from
    /// the bundle's master key.
    pub fn vtpm_key_hex(&self) -> Zeroizing<String> {
        vtpm_key_hex(&self.bundle)
    }
}

/// The swtpm state key of `bundle`, as swtpm's hex key file wants it.
pub fn vtpm_key_hex(bundle: &Bundle) -> Zeroizing<String> {
    let key = bundle.vtpm_encryption_key();
    Zeroizing::new(hex::encode(&key[..16]))
}

fn sealed_record(
    bundle: &Path,
    helper_disk: &Path,
) -> Result<crate::tpm::SealedObject, LaunchError> {
    let file = File::open(bundle).map_err(|source| LaunchError::BundleFile {
        path: bundle.display().to_string(),
        source,
    })?;
    let header = luks1::read_header(&file).map_err(LaunchError::Header)?;
    Ok(SealedPartition::open(helper_disk, false)?.get(&header.uuid)?)
}

/// Reads the host PCRs and compares them with the bundle's sealed policy.
pub fn attest(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
) -> Result<AttestationReport, LaunchError> {
    let sealed = sealed_record(bundle, helper_disk)?;
    Ok(HostTpm::connect(tcti)?.attest(&sealed)?)
}

/// Attests the host, unseals the key-slot secret, opens the bundle and verifies its manifest
/// and vTPM state. Nothing is written to the bundle.
pub fn attest_and_open(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
    writable: bool,
) -> Result<OpenedBundle, LaunchError> {
    let (_, opened) = attest_then_open(bundle, helper_disk, tcti, writable)?;
    opened
}

/// [`attest_and_open`] that keeps the attestation report when a later step fails: the outer
/// error means the host could not be attested at all (no sealed record, TPM unreachable);
/// the inner result is the rest of the launch (trust decision, unseal, open, verify,
/// rollback check).
pub fn attest_then_open(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
    writable: bool,
) -> Result<(AttestationReport, Result<OpenedBundle, LaunchError>), LaunchError> {
    attest_then_open_with(bundle, helper_disk, tcti, writable, true)
}

/// [`attest_then_open`] for writing, without the rollback check: only for
/// `bundle accept-rollback`.
pub(crate) fn attest_then_open_unchecked_rollback(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
) -> Result<(AttestationReport, Result<OpenedBundle, LaunchError>), LaunchError> {
    attest_then_open_with(bundle, helper_disk, tcti, true, false)
}

fn attest_then_open_with(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
    writable: bool,
    check_rollback: bool,
) -> Result<(AttestationReport, Result<OpenedBundle, LaunchError>), LaunchError> {
    let sealed = sealed_record(bundle, helper_disk)?;
    let mut tpm = HostTpm::connect(tcti)?;
    let start = Instant::now();
    let report = tpm.attest(&sealed)?;
    let attest = start.elapsed();
    let opened = (|| {
        require_trusted(&report)?;
        let start = Instant::now();
        let secret = tpm.unseal(&sealed)?;
        let unseal = start.elapsed();
        let start = Instant::now();
        let opened = Bundle::open(bundle, &secret, writable)?;
        let manifest = opened.manifest()?;
        let vtpm_state = opened.vtpm_state()?;
        let mark = opened.rollback_mark();
        if mark.map(|m| m.counter_index) != sealed.rollback_counter {
            return Err(LaunchError::RollbackCounterMismatch {
                bundle: mark.map(|m| m.counter_index),
                record: sealed.rollback_counter,
            });
        }
        if let (Some(mark), true) = (mark, check_rollback) {
            let host = tpm.read_counter(mark.counter_index)?;
            if mark.generation < host {
                return Err(LaunchError::Rollback {
                    bundle: mark.generation,
                    host,
                });
            }
        }
        let timings = LaunchTimings {
            attest,
            unseal,
            open: start.elapsed(),
        };
        tracing::info!(bundle = %bundle.display(), id = %opened.id(), "bundle opened on attested host");
        Ok(OpenedBundle {
            bundle: opened,
            manifest,
            vtpm_state,
            report: report.clone(),
            timings,
        })
    })();
    Ok((report, opened))
}

/// Advances the bundle's rollback protection for a launch, before any guest code runs:
/// writes generation `max(bundle, counter) + 1` into the bundle's authenticated superblock
/// (synced), calls `between` (a crash-test seam), then increments the host TPM counter up
/// to that generation. In that order a crash between the steps leaves the bundle one ahead
/// of the counter, which still launches (a bundle is refused only when it is *behind*), and
/// the counter never lags a completed launch, so every copy taken before this launch is
/// refused afterwards. The other order would need a tolerance of one, and that would let
/// the most recent copy back in. Returns the new generation; `None` for a bundle without a
/// counter.
pub fn advance_rollback(
    opened: &mut OpenedBundle,
    tcti: &str,
    between: impl FnOnce(),
) -> Result<Option<u64>, LaunchError> {
    let Some(mark) = opened.bundle.rollback_mark() else {
        tracing::warn!(id = %opened.bundle.id(), "bundle has no rollback counter: copies of it are not detected");
        return Ok(None);
    };
    let mut tpm = HostTpm::connect(tcti)?;
    let mut host = tpm.read_counter(mark.counter_index)?;
    let target = mark.generation.max(host) + 1;
    opened
        .bundle
        .write_rollback_mark(crate::bundle::payload::RollbackMark {
            counter_index: mark.counter_index,
            generation: target,
        })?;
    between();
    // At most two steps: the bundle is never more than one ahead of the counter.
    for _ in 0..2 {
        if host >= target {
            break;
        }
        host = tpm.increment_counter(mark.counter_index)?;
    }
    if host < target {
        return Err(LaunchError::Rollback {
            bundle: target,
            host,
        });
    }
    Ok(Some(target))
}

/// Turns an attestation report into the launch decision: an error naming the other TPM or
/// the PCRs that differ, or `Ok` on a trusted host.
pub fn require_trusted(report: &AttestationReport) -> Result<(), LaunchError> {
    if !report.tpm_matches {
        return Err(LaunchError::OtherTpm);
    }
    if !report.trusted {
        return Err(LaunchError::Untrusted {
            pcrs: report
                .pcrs
                .iter()
                .filter(|c| !c.matches)
                .map(|c| c.pcr)
                .collect(),
        });
    }
    Ok(())
}

/// Attests and unseals, returning the key-slot secret.
pub fn attest_and_unseal(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
) -> Result<(Zeroizing<Vec<u8>>, AttestationReport, LaunchTimings), LaunchError> {
    let sealed = sealed_record(bundle, helper_disk)?;
    let mut tpm = HostTpm::connect(tcti)?;
    let start = Instant::now();
    let report = tpm.attest(&sealed)?;
    let attest = start.elapsed();
    require_trusted(&report)?;
    let start = Instant::now();
    let secret = tpm.unseal(&sealed)?;
    let timings = LaunchTimings {
        attest,
        unseal: start.elapsed(),
        open: Duration::ZERO,
    };
    Ok((secret, report, timings))
}

/// A kernel and initramfs read once and verified against a manifest: the bytes to boot.
/// Booting these bytes, never the paths again, is what makes the check hold (a file
/// swapped after the check is never read).
pub struct VerifiedBootFiles {
    /// The kernel bytes whose SHA-256 matched.
    pub kernel: Vec<u8>,
    /// The initramfs bytes whose SHA-256 matched, when the manifest lists one.
    pub initramfs: Option<Vec<u8>>,
}

/// Reads the kernel and initramfs the VMM is about to boot, each exactly once, and checks
/// the bytes read against the manifest's digests; returns those bytes.
pub fn read_verified_boot_files(
    manifest: &VmManifest,
    kernel: &Path,
    initramfs: Option<&Path>,
) -> Result<VerifiedBootFiles, LaunchError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| LaunchError::BootFile {
            path: path.display().to_string(),
            source,
        })
    };
    let sha256 = |bytes: &[u8]| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(bytes));
    let kernel_bytes = read(kernel)?;
    if sha256(&kernel_bytes) != manifest.kernel_sha256 {
        return Err(LaunchError::BootFileDigest {
            what: "kernel",
            path: kernel.display().to_string(),
        });
    }
    let initramfs = match (initramfs, &manifest.initramfs_sha256) {
        (Some(path), Some(expected)) => {
            let bytes = read(path)?;
            if sha256(&bytes) != *expected {
                return Err(LaunchError::BootFileDigest {
                    what: "initramfs",
                    path: path.display().to_string(),
                });
            }
            Some(bytes)
        }
        (None, None) => None,
        (path, _) => {
            return Err(LaunchError::BootFileDigest {
                what: "initramfs",
                path: path
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|| "(none)".into()),
            })
        }
    };
    Ok(VerifiedBootFiles {
        kernel: kernel_bytes,
        initramfs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_files_must_match_manifest_digests() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("k");
        std::fs::write(&kernel, b"kernel").unwrap();
        let manifest = VmManifest {
            vcpus: 1,
            memory_mib: 64,
            cmdline: String::new(),
            kernel_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"kernel")),
            initramfs_sha256: None,
        };
        let verified = read_verified_boot_files(&manifest, &kernel, None).unwrap();
        assert_eq!(verified.kernel, b"kernel");
        std::fs::write(&kernel, b"kernel with a backdoor").unwrap();
        assert!(matches!(
            read_verified_boot_files(&manifest, &kernel, None),
            Err(LaunchError::BootFileDigest { what: "kernel", .. })
        ));
        std::fs::write(&kernel, b"kernel").unwrap();
        // An initramfs the manifest does not list is refused too.
        assert!(matches!(
            read_verified_boot_files(&manifest, &kernel, Some(&kernel)).err(),
            Some(LaunchError::BootFileDigest {
                what: "initramfs",
                ..
            })
        ));
    }
}
