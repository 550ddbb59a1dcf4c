//! Sealing against a real swtpm: round trip, PCR change refused, another TPM refused.

use super::{HostTpm, TpmError};
use sealvm_testkit::SwtpmProcess;

const PCRS: [u8; 2] = [16, 23];

#[test]
fn seal_unseal_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = SwtpmProcess::start(&dir.path().join("host")).unwrap();
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    let sealed = tpm.seal("b1", &PCRS, b"the-key-slot-secret").unwrap();
    assert_eq!(sealed.pcrs, vec![16, 23]);
    let report = tpm.attest(&sealed).unwrap();
    assert!(report.trusted);
    let secret = tpm.unseal(&sealed).unwrap();
    assert_eq!(&secret[..], b"the-key-slot-secret");
    // A fresh connection (as the next launch makes) unseals too.
    drop(tpm);
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    assert_eq!(&tpm.unseal(&sealed).unwrap()[..], b"the-key-slot-secret");
}

#[test]
fn extended_pcr_refuses_unseal_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = SwtpmProcess::start(&dir.path().join("host")).unwrap();
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    let sealed = tpm.seal("b1", &PCRS, b"secret").unwrap();
    tpm.extend_pcr(16, b"untrusted update").unwrap();
    let report = tpm.attest(&sealed).unwrap();
    assert!(!report.trusted);
    assert!(!report.pcrs[0].matches && report.pcrs[1].matches);
    match tpm.unseal(&sealed) {
        Err(TpmError::PcrMismatch { pcr: 16, .. }) => {}
        other => panic!("expected PCR 16 mismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn tampered_expected_values_still_refused_by_tpm_policy() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = SwtpmProcess::start(&dir.path().join("host")).unwrap();
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    let mut sealed = tpm.seal("b1", &PCRS, b"secret").unwrap();
    tpm.extend_pcr(16, b"untrusted update").unwrap();
    // An attacker rewrites the record's expected values to match the host: the software
    // check passes, the TPM's own policy check still refuses.
    let now = tpm.read_pcrs(&[16]).unwrap();
    sealed.expected[0] = hex::encode(now[0]);
    assert!(matches!(
        tpm.unseal(&sealed),
        Err(TpmError::UnsealRefused(_))
    ));
}

#[test]
fn another_tpm_refuses_the_sealed_key() {
    let dir = tempfile::tempdir().unwrap();
    let first = SwtpmProcess::start(&dir.path().join("a")).unwrap();
    let sealed = HostTpm::connect(&first.tcti())
        .unwrap()
        .seal("b1", &PCRS, b"secret")
        .unwrap();
    let second = SwtpmProcess::start(&dir.path().join("b")).unwrap();
    let mut other = HostTpm::connect(&second.tcti()).unwrap();
    assert!(!other.attest(&sealed).unwrap().tpm_matches);
    assert!(matches!(other.unseal(&sealed), Err(TpmError::OtherTpm)));
}

#[test]
fn forged_identity_still_fails_to_load_on_another_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let first = SwtpmProcess::start(&dir.path().join("a")).unwrap();
    let mut sealed = HostTpm::connect(&first.tcti())
        .unwrap()
        .seal("b1", &PCRS, b"secret")
        .unwrap();
    let second = SwtpmProcess::start(&dir.path().join("b")).unwrap();
    let mut other = HostTpm::connect(&second.tcti()).unwrap();
    // Rewrite the recorded identity to the second TPM's: the TPM itself still refuses.
    let probe = other.seal("probe", &PCRS, b"x").unwrap();
    sealed.storage_key_name = probe.storage_key_name;
    assert!(matches!(
        other.unseal(&sealed),
        Err(TpmError::ForeignTpm(_))
    ));
}

#[test]
fn nv_counter_only_goes_up_and_survives_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = SwtpmProcess::start(&dir.path().join("host")).unwrap();
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    let (index, first) = tpm.define_counter(7).unwrap();
    assert_eq!(tpm.read_counter(index).unwrap(), first);
    assert_eq!(tpm.increment_counter(index).unwrap(), first + 1);
    // A second counter with the same preference gets another index.
    let (other, _) = tpm.define_counter(7).unwrap();
    assert_ne!(other, index);
    drop(tpm);
    let mut tpm = HostTpm::connect(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.read_counter(index).unwrap(), first + 1);
    assert!(
        tpm.read_counter(index + 100).is_err(),
        "an undefined counter reads"
    );
}
