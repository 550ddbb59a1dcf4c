//! The attestation report: which PCRs the sealed policy covers, their expected and actual
//! values. `sealvm run --attest-only` prints it as JSON.

use super::sealed::SealedObject;
use serde::Serialize;

/// One PCR compared with the sealed policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PcrCheck {
    /// PCR index.
    pub pcr: u8,
    /// Hex value recorded at sealing.
    pub expected: String,
    /// Hex value read from the host TPM now.
    pub actual: String,
    /// True when they are equal.
    pub matches: bool,
}

/// The host's PCR state against a bundle's sealed policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationReport {
    /// The bundle the policy belongs to.
    pub bundle_id: String,
    /// The PCR bank.
    pub pcr_bank: String,
    /// Hex PolicyPCR digest.
    pub policy_digest: String,
    /// Per-PCR comparison.
    pub pcrs: Vec<PcrCheck>,
    /// True when the TPM is the one the key was sealed on (same storage primary).
    pub tpm_matches: bool,
    /// True when the TPM matches and every PCR matches.
    pub trusted: bool,
}

impl AttestationReport {
    /// Builds the report from the sealed record and the per-PCR checks.
    pub fn new(sealed: &SealedObject, tpm_matches: bool, pcrs: Vec<PcrCheck>) -> Self {
        Self {
            bundle_id: sealed.bundle_id.clone(),
            pcr_bank: sealed.pcr_bank.clone(),
            policy_digest: sealed.policy_digest.clone(),
            tpm_matches,
            trusted: tpm_matches && pcrs.iter().all(|c| c.matches),
            pcrs,
        }
    }
}
