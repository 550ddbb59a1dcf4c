//! Sealed bundles: one LUKS1 file per VM holding its manifest, vTPM state and guest disk.
//!
//! [`luks1`] is the container format, [`xts`] the per-sector cipher, [`volume`] the
//! decrypted sector view over the payload, [`payload`] what sealvm keeps inside it. Sealing the key-slot secret to the host TPM
//! lives elsewhere (`crate::tpm`); this module never talks to a TPM.

pub mod integrity;
pub mod luks1;
pub mod payload;
pub mod volume;
pub mod xts;

#[cfg(test)]
mod integrity_tests;
#[cfg(test)]
mod interop_tests;
#[cfg(test)]
mod payload_tests;
