//! The trusted-launch options of `sealvm run` and `--attest-only`; the workflow itself is
//! `sealvm_trust::launch`, and booting the opened bundle is `super::run`.

use clap::Args;
use sealvm_trust::launch::{self, LaunchError};
use sealvm_trust::tpm::DEFAULT_TCTI;
use std::path::{Path, PathBuf};

/// The trusted-launch options of `sealvm run`.
#[derive(Debug, Args)]
pub struct TrustedLaunchArgs {
    /// Launch this sealed bundle (LUKS1 file): attest the host, unseal, open and verify it,
    /// and boot --kernel/--initramfs (checked against the bundle's digests) with the
    /// bundle's vCPUs, memory and command line, its disk and its vTPM.
    #[arg(long, requires = "helper_disk", conflicts_with = "config")]
    pub bundle: Option<PathBuf>,
    /// The helper disk image whose `sealvm-sealed` partition holds the bundle's sealed key.
    #[arg(long, requires = "bundle")]
    pub helper_disk: Option<PathBuf>,
    /// The host TPM's TCTI (e.g. `swtpm:host=127.0.0.1,port=2321`).
    #[arg(long, default_value = DEFAULT_TCTI)]
    pub tcti: String,
    /// Only attest: print the attestation report as JSON and exit (non-zero if untrusted).
    #[arg(long, requires = "bundle")]
    pub attest_only: bool,
}

/// Errors of `--attest-only`.
#[derive(Debug, thiserror::Error)]
pub enum AttestOnlyError {
    /// Attestation failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The report could not be printed.
    #[error("cannot print the attestation report")]
    Json(#[source] serde_json::Error),
}

/// `sealvm run --bundle B --helper-disk H --attest-only`: prints the attestation report as
/// JSON and fails when the host is not trusted.
pub fn attest_only(bundle: &Path, helper_disk: &Path, tcti: &str) -> Result<(), AttestOnlyError> {
    let report = launch::attest(bundle, helper_disk, tcti)?;
    let json = serde_json::to_string_pretty(&report).map_err(AttestOnlyError::Json)?;
    println!("{json}");
    launch::require_trusted(&report)?;
    Ok(())
}
