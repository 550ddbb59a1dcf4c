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

/// A TCP proxy in front of swtpm's data and control ports that records every byte of the
/// data channel in both directions: what a wiretap on the host's TPM interface sees.
struct WiretapProxy {
    port: u16,
    captured: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl WiretapProxy {
    fn start(target_port: u16) -> Self {
        use std::net::{TcpListener, TcpStream};
        let port = sealvm_testkit::swtpm::free_port_pair().unwrap();
        let captured = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        for (listen, target, record) in [
            (port, target_port, true),
            (port + 1, target_port + 1, false),
        ] {
            let listener = TcpListener::bind(("127.0.0.1", listen)).unwrap();
            let captured = captured.clone();
            std::thread::spawn(move || {
                for client in listener.incoming().flatten() {
                    let server = TcpStream::connect(("127.0.0.1", target)).unwrap();
                    for (mut from, mut to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        let captured = captured.clone();
                        std::thread::spawn(move || {
                            use std::io::{Read, Write};
                            let mut buf = [0u8; 4096];
                            while let Ok(n) = from.read(&mut buf) {
                                if n == 0 || to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                                if record {
                                    captured.lock().unwrap().extend_from_slice(&buf[..n]);
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            });
        }
        WiretapProxy { port, captured }
    }

    fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    fn contains(&self, needle: &[u8]) -> bool {
        self.captured
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }
}

#[test]
fn the_sealed_secret_never_crosses_the_tpm_interface_in_the_clear() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().unwrap();
    let swtpm = SwtpmProcess::start(&dir.path().join("host")).unwrap();
    let port: u16 = swtpm.tcti().rsplit('=').next().unwrap().parse().unwrap();
    let wiretap = WiretapProxy::start(port);
    let secret = b"5ea1ed5ec4e7c0ffee5ea1ed5ec4e7c0ffee5ea1ed5ec4e7c0ffee5ea1ed5ec4";
    let mut tpm = HostTpm::connect(&wiretap.tcti()).unwrap();
    let sealed = tpm.seal("b1", &PCRS, secret).unwrap();
    drop(tpm);
    let mut tpm = HostTpm::connect(&wiretap.tcti()).unwrap();
    let unsealed = tpm.unseal(&sealed).unwrap();
    assert_eq!(&unsealed[..], secret);
    // The tap works: a PCR extend's digest, sent without parameter encryption, is seen.
    tpm.extend_pcr(23, b"marker").unwrap();
    drop(tpm);
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(
        wiretap.contains(&sha2::Sha256::digest(b"marker")),
        "the wiretap saw nothing (test is vacuous)"
    );
    // Neither the whole secret nor any 12-byte piece of it crossed in the clear.
    assert!(
        !wiretap.contains(secret),
        "the secret crossed the TPM interface in the clear"
    );
    for piece in secret.chunks(12) {
        assert!(
            !wiretap.contains(piece),
            "a piece of the secret crossed in the clear"
        );
    }
}
