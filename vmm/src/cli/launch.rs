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
    /// Check everything a launch checks without booting: attest the host, unseal, open the
    /// bundle and verify its regions (and --kernel/--initramfs when given); print the
    /// attestation report with the outcome as JSON; exit non-zero if any check fails.
    #[arg(long, requires = "bundle")]
    pub attest_only: bool,
}

/// Errors of `--attest-only`.
#[derive(Debug, thiserror::Error)]
pub enum AttestOnlyError {
    /// Attestation or verification failed.
    #[error(transparent)]
    Launch(#[from] LaunchError),
    /// The report could not be printed.
    #[error("cannot print the attestation report")]
    Json(#[source] serde_json::Error),
}

/// `sealvm run --bundle B --helper-disk H --attest-only [--kernel K [--initramfs I]]`:
/// attests the host, unseals and opens the bundle, verifies its regions (and the boot files
/// when given), prints the attestation report with `bundle_verified` (and `error`) as
/// JSON, and fails when any check fails. Nothing boots and nothing is written.
pub fn attest_only(
    bundle: &Path,
    helper_disk: &Path,
    tcti: &str,
    kernel: Option<&Path>,
    initramfs: Option<&Path>,
) -> Result<(), AttestOnlyError> {
    let (report, opened) = launch::attest_then_open(bundle, helper_disk, tcti, false)?;
    let verified = opened.and_then(|opened| {
        if let Some(kernel) = kernel {
            launch::read_verified_boot_files(&opened.manifest, kernel, initramfs)?;
        }
        Ok(opened)
    });
    let mut json = serde_json::to_value(&report).map_err(AttestOnlyError::Json)?;
    json["bundle_verified"] = serde_json::Value::Bool(verified.is_ok());
    match &verified {
        Ok(opened) => {
            json["bundle_id"] = opened.bundle.id().into();
            json["vtpm_generation"] = opened.bundle.vtpm_generation().into();
            json["boot_files_verified"] = kernel.is_some().into();
        }
        Err(error) => json["error"] = error_chain(error).into(),
    }
    let text = serde_json::to_string_pretty(&json).map_err(AttestOnlyError::Json)?;
    println!("{text}");
    verified?;
    Ok(())
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
