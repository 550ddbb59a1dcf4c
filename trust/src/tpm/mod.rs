//! The host TPM 2.0: sealing a bundle's key-slot secret to a PCR policy, reading PCRs for
//! the attestation report, and unsealing through a policy session (tss-esapi).
//!
//! The TPM is reached through any TCTI (`device:/dev/tpmrm0` by default,
//! `swtpm:host=127.0.0.1,port=P` in tests). Only the sha256 PCR bank is used. This module
//! does not know bundle files or the helper partition; it turns a secret into a
//! [`SealedObject`] and back.

pub mod counter;
pub mod report;
pub mod scratch;
pub mod sealed;
pub mod tied_child;
pub mod vtpm;

pub use report::{AttestationReport, PcrCheck};
pub use sealed::SealedObject;

use sha2::{Digest as _, Sha256};
use std::str::FromStr;
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{KeyHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Digest, DigestValues, EccPoint, KeyedHashScheme, PcrSelectionList, PcrSelectionListBuilder,
    PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder, PublicKeyedHashParameters,
    SensitiveData, SymmetricDefinition, SymmetricDefinitionObject,
};
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::{Context, TctiNameConf};
use zeroize::Zeroizing;

/// The PCRs sealed to when the operator names none.
pub const DEFAULT_PCRS: [u8; 4] = [0, 2, 4, 7];
/// The default TCTI: the kernel's resource manager.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";

/// Errors talking to the host TPM or checking its state.
#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    /// The TCTI string does not parse.
    #[error("bad TCTI {tcti:?}")]
    Tcti {
        /// The string given.
        tcti: String,
        /// The cause.
        #[source]
        source: tss_esapi::Error,
    },
    /// A TPM command failed.
    #[error("TPM command {command} failed")]
    Command {
        /// Which command.
        command: &'static str,
        /// The TSS error.
        #[source]
        source: tss_esapi::Error,
    },
    /// A PCR index outside 0..=23.
    #[error("PCR index {0} is out of range (0..=23)")]
    PcrIndex(u8),
    /// The host's PCRs differ from the sealed policy; names the first differing PCR.
    #[error(
        "host PCR {pcr} does not match the sealed policy (expected {expected}, found {actual})"
    )]
    PcrMismatch {
        /// The PCR index.
        pcr: u8,
        /// Expected value, hex.
        expected: String,
        /// Actual value, hex.
        actual: String,
    },
    /// The host TPM is not the one the key was sealed on: its storage primary differs.
    #[error("host TPM identity check failed: this is not the TPM the key was sealed on")]
    OtherTpm,
    /// The sealed object does not load under this TPM's storage key: another TPM, or a
    /// cleared owner hierarchy.
    #[error("the sealed key was not made by this TPM (load under the storage primary failed)")]
    ForeignTpm(#[source] tss_esapi::Error),
    /// The TPM refused to unseal (policy failure after the PCR check passed: PCRs changed
    /// in between, or the record's policy was tampered with).
    #[error("the TPM refused to unseal the key (policy check failed)")]
    UnsealRefused(#[source] tss_esapi::Error),
    /// The sealed record's blobs do not decode.
    #[error("sealed record is malformed: {0}")]
    Malformed(&'static str),
}

fn cmd(command: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Command { command, source }
}

/// An open connection to the host TPM.
pub struct HostTpm {
    context: Context,
}

impl HostTpm {
    /// Connects through `tcti` (for example `device:/dev/tpmrm0` or
    /// `swtpm:host=127.0.0.1,port=2321`).
    pub fn connect(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|source| TpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        let context = Context::new(conf).map_err(|source| TpmError::Tcti {
            tcti: tcti.to_string(),
            source,
        })?;
        Ok(Self { context })
    }

    /// Reads the sha256 bank values of `pcrs`, in the order given.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<Vec<[u8; 32]>, TpmError> {
        let mut values = Vec::with_capacity(pcrs.len());
        for &pcr in pcrs {
            let selection = selection(&[pcr])?;
            let (_, _, digests) = self.context.pcr_read(selection).map_err(cmd("PCR_Read"))?;
            let digest = digests
                .value()
                .first()
                .ok_or(TpmError::Malformed("PCR_Read returned no digest"))?;
            let mut value = [0u8; 32];
            if digest.len() != 32 {
                return Err(TpmError::Malformed("PCR_Read returned a non-sha256 digest"));
            }
            value.copy_from_slice(digest.value());
            values.push(value);
        }
        Ok(values)
    }

    /// Extends sha256 PCR `pcr` with the SHA-256 of `data` (tests and the demo use this to
    /// make a host untrusted).
    pub fn extend_pcr(&mut self, pcr: u8, data: &[u8]) -> Result<(), TpmError> {
        let handle = PcrHandle::try_from(u32::from(pcr)).map_err(|_| TpmError::PcrIndex(pcr))?;
        let mut values = DigestValues::new();
        let digest = Digest::try_from(Sha256::digest(data).to_vec()).map_err(cmd("PCR_Extend"))?;
        values.set(HashingAlgorithm::Sha256, digest);
        self.context
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(cmd("PCR_Extend"))
    }

    /// Seals `secret` to the current values of `pcrs` under the owner storage primary.
    pub fn seal(
        &mut self,
        bundle_id: &str,
        pcrs: &[u8],
        secret: &[u8],
    ) -> Result<SealedObject, TpmError> {
        let mut pcrs = pcrs.to_vec();
        pcrs.sort_unstable();
        pcrs.dedup();
        let values = self.read_pcrs(&pcrs)?;
        let policy = self.policy_digest(&pcrs, &values)?;
        let (primary, storage_key_name) = self.storage_primary()?;
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_no_da(true)
            .build()
            .map_err(cmd("Create"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::KeyedHash)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_auth_policy(policy.clone())
            .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
            .with_keyed_hash_unique_identifier(Digest::default())
            .build()
            .map_err(cmd("Create"))?;
        let data = SensitiveData::try_from(secret.to_vec()).map_err(cmd("Create"))?;
        // The secret is TPM2_Create's first parameter: send it through a session salted
        // with the storage primary and with `decrypt` set, so it crosses the TPM interface
        // encrypted (AES-128-CFB under a key only this process and the TPM know).
        let created = self
            .encrypted_session(SessionType::Hmac, primary, true, false)
            .and_then(|session| {
                let created = self
                    .context
                    .execute_with_session(Some(session), |ctx| {
                        ctx.create(primary, public, None, Some(data), None, None)
                    })
                    .map_err(cmd("Create"));
                self.flush(tss_esapi::handles::SessionHandle::from(session).into());
                created
            });
        self.flush(primary.into());
        let created = created?;
        Ok(SealedObject {
            bundle_id: bundle_id.to_string(),
            pcr_bank: "sha256".into(),
            pcrs: pcrs.clone(),
            expected: values.iter().map(hex::encode).collect(),
            policy_digest: hex::encode(policy.value()),
            storage_key_name,
            public: hex::encode(created.out_public.marshall().map_err(cmd("Create"))?),
            private: hex::encode(created.out_private.value()),
            rollback_counter: None,
        })
    }

    /// Compares the host's PCRs with the values recorded at sealing.
    pub fn attest(&mut self, sealed: &SealedObject) -> Result<AttestationReport, TpmError> {
        let (primary, name) = self.storage_primary()?;
        self.flush(primary.into());
        let tpm_matches = name == sealed.storage_key_name;
        let actual = self.read_pcrs(&sealed.pcrs)?;
        let checks = sealed
            .pcrs
            .iter()
            .zip(&sealed.expected)
            .zip(&actual)
            .map(|((&pcr, expected), actual)| PcrCheck {
                pcr,
                expected: expected.clone(),
                actual: hex::encode(actual),
                matches: *expected == hex::encode(actual),
            })
            .collect();
        Ok(AttestationReport::new(sealed, tpm_matches, checks))
    }

    /// Attests, then unseals `sealed` through a PolicyPCR session. Refuses with
    /// [`TpmError::PcrMismatch`] naming the first differing PCR before asking the TPM.
    pub fn unseal(&mut self, sealed: &SealedObject) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let report = self.attest(sealed)?;
        if !report.tpm_matches {
            return Err(TpmError::OtherTpm);
        }
        if let Some(bad) = report.pcrs.iter().find(|c| !c.matches) {
            return Err(TpmError::PcrMismatch {
                pcr: bad.pcr,
                expected: bad.expected.clone(),
                actual: bad.actual.clone(),
            });
        }
        let public_bytes = hex::decode(&sealed.public)
            .map_err(|_| TpmError::Malformed("public blob is not hex"))?;
        let private_bytes = hex::decode(&sealed.private)
            .map_err(|_| TpmError::Malformed("private blob is not hex"))?;
        let public =
            Public::unmarshall(&public_bytes).map_err(|_| TpmError::Malformed("public blob"))?;
        let private =
            Private::try_from(private_bytes).map_err(|_| TpmError::Malformed("private blob"))?;
        let (primary, _) = self.storage_primary()?;
        let loaded = self
            .context
            .execute_with_nullauth_session(|ctx| ctx.load(primary, private, public))
            .map_err(TpmError::ForeignTpm);
        let result = loaded.and_then(|object| {
            let out = self.unseal_loaded(sealed, object, primary);
            self.flush(object.into());
            out
        });
        self.flush(primary.into());
        result
    }

    /// Unseals through a PolicyPCR session that is salted with the storage primary and has
    /// `encrypt` set: the TPM returns the secret (Unseal's first response parameter)
    /// encrypted under the session key, so it never crosses the TPM interface in the clear.
    fn unseal_loaded(
        &mut self,
        sealed: &SealedObject,
        object: KeyHandle,
        primary: KeyHandle,
    ) -> Result<Zeroizing<Vec<u8>>, TpmError> {
        let session = self.encrypted_session(SessionType::Policy, primary, false, true)?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(cmd("PolicyPCR"))?;
            self.context
                .policy_pcr(policy, Digest::default(), selection(&sealed.pcrs)?)
                .map_err(cmd("PolicyPCR"))?;
            let data = self
                .context
                .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
                .map_err(TpmError::UnsealRefused)?;
            Ok(Zeroizing::new(data.value().to_vec()))
        })();
        self.flush(tss_esapi::handles::SessionHandle::from(session).into());
        result
    }

    fn policy_digest(&mut self, pcrs: &[u8], values: &[[u8; 32]]) -> Result<Digest, TpmError> {
        let mut hasher = Sha256::new();
        for v in values {
            hasher.update(v);
        }
        let pcr_digest = Digest::try_from(hasher.finalize().to_vec()).map_err(cmd("PolicyPCR"))?;
        let session = self.policy_session(SessionType::Trial)?;
        let result = (|| {
            let policy = PolicySession::try_from(session).map_err(cmd("PolicyPCR"))?;
            self.context
                .policy_pcr(policy, pcr_digest, selection(pcrs)?)
                .map_err(cmd("PolicyPCR"))?;
            self.context
                .policy_get_digest(policy)
                .map_err(cmd("PolicyGetDigest"))
        })();
        self.flush(tss_esapi::handles::SessionHandle::from(session).into());
        result
    }

    fn policy_session(&mut self, kind: SessionType) -> Result<AuthSession, TpmError> {
        let session = self
            .context
            .start_auth_session(
                None,
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("StartAuthSession"))?
            .ok_or(TpmError::Malformed("StartAuthSession returned no session"))?;
        let (attributes, mask) = SessionAttributesBuilder::new().build();
        self.context
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(cmd("TRSess_SetAttributes"))?;
        Ok(session)
    }

    /// A session salted with `salt_key` (the storage primary: ECDH with its public key, so a
    /// wiretap on the TPM interface cannot derive the session key) that encrypts the
    /// command's first parameter (`decrypt`) and/or the response's (`encrypt`).
    fn encrypted_session(
        &mut self,
        kind: SessionType,
        salt_key: KeyHandle,
        decrypt: bool,
        encrypt: bool,
    ) -> Result<AuthSession, TpmError> {
        let session = self
            .context
            .start_auth_session(
                Some(salt_key),
                None,
                None,
                kind,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(cmd("StartAuthSession"))?
            .ok_or(TpmError::Malformed("StartAuthSession returned no session"))?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(decrypt)
            .with_encrypt(encrypt)
            .build();
        self.context
            .tr_sess_set_attributes(session, attributes, mask)
            .map_err(cmd("TRSess_SetAttributes"))?;
        Ok(session)
    }

    /// The owner-hierarchy ECC P-256 storage primary; the same template always derives the
    /// same key on the same TPM, so nothing needs to be persisted.
    fn storage_primary(&mut self) -> Result<(KeyHandle, String), TpmError> {
        let attributes = ObjectAttributesBuilder::new()
            .with_fixed_tpm(true)
            .with_fixed_parent(true)
            .with_sensitive_data_origin(true)
            .with_user_with_auth(true)
            .with_decrypt(true)
            .with_restricted(true)
            .build()
            .map_err(cmd("CreatePrimary"))?;
        let parameters = PublicEccParametersBuilder::new_restricted_decryption_key(
            SymmetricDefinitionObject::AES_128_CFB,
            EccCurve::NistP256,
        )
        .build()
        .map_err(cmd("CreatePrimary"))?;
        let public = PublicBuilder::new()
            .with_public_algorithm(PublicAlgorithm::Ecc)
            .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
            .with_object_attributes(attributes)
            .with_ecc_parameters(parameters)
            .with_ecc_unique_identifier(EccPoint::default())
            .build()
            .map_err(cmd("CreatePrimary"))?;
        let created = self
            .context
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
            })
            .map_err(cmd("CreatePrimary"))?;
        let name = self
            .context
            .tr_get_name(created.key_handle.into())
            .map_err(cmd("TR_GetName"))?;
        Ok((created.key_handle, hex::encode(name.value())))
    }

    fn flush(&mut self, handle: tss_esapi::handles::ObjectHandle) {
        if let Err(error) = self.context.flush_context(handle) {
            tracing::warn!(%error, "cannot flush TPM handle");
        }
    }
}

/// Parses "0,2,4,7" into PCR indices, checking the range.
pub fn parse_pcr_list(list: &str) -> Result<Vec<u8>, TpmError> {
    list.split(',')
        .map(|s| {
            s.trim()
                .parse::<u8>()
                .map_err(|_| TpmError::PcrIndex(u8::MAX))
        })
        .map(|r| {
            r.and_then(|p| {
                if p <= 23 {
                    Ok(p)
                } else {
                    Err(TpmError::PcrIndex(p))
                }
            })
        })
        .collect()
}

fn selection(pcrs: &[u8]) -> Result<PcrSelectionList, TpmError> {
    let slots = pcrs
        .iter()
        .map(|&p| {
            if p > 23 {
                return Err(TpmError::PcrIndex(p));
            }
            PcrSlot::try_from(1u32 << p).map_err(|_| TpmError::PcrIndex(p))
        })
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(cmd("PCR selection"))
}

#[cfg(test)]
mod tests;
