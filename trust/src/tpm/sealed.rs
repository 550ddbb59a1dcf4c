//! The sealed-object record, version 1: what the helper partition stores per bundle.
//!
//! Serialized as one JSON object (`deny_unknown_fields`): `bundle_id` (32 hex digits),
//! `pcr_bank` ("sha256"), `pcrs` (ascending indices), `expected` (hex PCR values at sealing,
//! same order), `policy_digest` (hex PolicyPCR digest), `storage_key_name` (hex TPM name of the
//! storage primary, identifying the host TPM), `public` (hex TPM2B_PUBLIC marshalled
//! by the TPM), `private` (hex TPM2B_PRIVATE body), `rollback_counter` (optional NV index of
//! the bundle's rollback counter). None of these is a secret: the private
//! blob is encrypted by the TPM's storage key.

use serde::{Deserialize, Serialize};

/// A key-slot secret sealed by a host TPM to a PCR policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealedObject {
    /// The bundle this key opens.
    pub bundle_id: String,
    /// The PCR bank of the policy.
    pub pcr_bank: String,
    /// PCR indices of the policy, ascending.
    pub pcrs: Vec<u8>,
    /// Hex PCR values at sealing, in `pcrs` order.
    pub expected: Vec<String>,
    /// Hex PolicyPCR digest (the sealed object's authPolicy).
    pub policy_digest: String,
    /// Hex TPM name of the storage primary the object was sealed under: identifies the host
    /// TPM (its owner seed) without any secret.
    pub storage_key_name: String,
    /// Hex marshalled TPM2B_PUBLIC.
    pub public: String,
    /// Hex TPM2B_PRIVATE.
    pub private: String,
    /// The NV index of the host TPM counter that guards the bundle against rollback (also
    /// in the bundle's authenticated superblock, which is what a launch trusts; a record
    /// and a bundle that disagree are refused). Absent in records made before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_counter: Option<u32>,
}
