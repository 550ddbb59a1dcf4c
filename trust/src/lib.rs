//! sealvm-trust: everything a shielded VM's launch needs except the VM itself.
//!
//! Sealed bundles ([`bundle`]: LUKS1 container, payload, XTS), sealing a bundle's key to the
//! host TPM ([`tpm`]), the guest's vTPM lifecycle ([`tpm::vtpm`]), the helper disk's sealed
//! GPT partition ([`helper_partition`]), and the workflows built from them as library
//! functions: [`launch`] (attest, unseal, open, verify boot files) and [`provision`] (create,
//! inspect, reseal, export, vTPM manufacture). No clap and no KVM here: `sealvm` puts a
//! command line over these functions and boots what [`launch::attest_and_open`] returns;
//! the recovery helper calls the same functions.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bundle;
pub mod helper_partition;
pub mod launch;
pub mod provision;
pub mod tpm;
