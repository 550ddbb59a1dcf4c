//! `sealvm bundle`, `sealvm helper-partition` and `sealvm run --attest-only` as a user runs
//! them, with swtpm as the host TPM.

use sealvm_testkit::SwtpmProcess;
use sealvm_testkit::Workspace;
use sealvm_trust::tpm::HostTpm;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Host {
    dir: tempfile::TempDir,
    swtpm: SwtpmProcess,
    sealvm: PathBuf,
}

impl Host {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let swtpm = SwtpmProcess::start(&dir.path().join("host-tpm")).unwrap();
        let sealvm = Workspace::locate()
            .binary("sealvm")
            .expect("build sealvm first");
        Self { dir, swtpm, sealvm }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sealvm(&self, args: &[&str]) -> Output {
        Command::new(&self.sealvm).args(args).output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.sealvm(args);
        assert!(
            out.status.success(),
            "sealvm {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn refused(&self, args: &[&str]) -> String {
        let out = self.sealvm(args);
        assert!(
            !out.status.success(),
            "sealvm {args:?} unexpectedly succeeded"
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// helper-partition init + bundle create from a raw disk with a known pattern.
    fn provision(&self) -> (PathBuf, PathBuf, Vec<u8>) {
        let helper = self.path("helper.img");
        self.ok(&["helper-partition", "init", s(&helper)]);
        let kernel = self.path("vmlinuz");
        std::fs::write(&kernel, b"not really a kernel").unwrap();
        let disk: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 249) as u8).collect();
        let raw = self.path("disk.raw");
        std::fs::write(&raw, &disk).unwrap();
        let bundle = self.path("web1.svm");
        let tcti = self.swtpm.tcti();
        let id = self.ok(&[
            "bundle",
            "create",
            s(&bundle),
            "--helper-disk",
            s(&helper),
            "--tcti",
            &tcti,
            "--pcrs",
            "16,23",
            "--kernel",
            s(&kernel),
            "--cpus",
            "2",
            "--memory",
            "128M",
            "--disk",
            s(&raw),
        ]);
        assert_eq!(id.trim().len(), 36, "bundle id is the LUKS UUID: {id}");
        (bundle, helper, disk)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bundle_create_attest_inspect_export_round_trip() {
    let host = Host::new();
    let (bundle, helper, disk) = host.provision();
    let tcti = host.swtpm.tcti();

    let sgdisk = Command::new("sgdisk")
        .arg("-p")
        .arg(&helper)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&sgdisk.stdout).contains("sealvm-sealed"));
    let dump = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("xts-plain64"));

    let report: serde_json::Value = serde_json::from_str(&host.ok(&[
        "run",
        "--bundle",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--attest-only",
    ]))
    .unwrap();
    assert_eq!(report["trusted"], true);
    assert_eq!(report["pcrs"][0]["pcr"], 16);
    assert_eq!(report["pcrs"][1]["pcr"], 23);

    let inspect: serde_json::Value = serde_json::from_str(&host.ok(&[
        "bundle",
        "inspect",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
    ]))
    .unwrap();
    assert_eq!(inspect["cipher"], "aes-xts-plain64");
    assert_eq!(inspect["key_bits"], 256);
    assert_eq!(inspect["manifest"]["vcpus"], 2);
    assert_eq!(inspect["manifest"]["memory_mib"], 128);
    assert!(
        inspect["vtpm_state_bytes"].as_u64().unwrap() > 1000,
        "swtpm_setup state stored"
    );
    assert!(!inspect.to_string().contains("secret"));

    let out = host.path("export.raw");
    host.ok(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--output",
        s(&out),
    ]);
    assert!(
        std::fs::read(&out).unwrap() == disk,
        "export differs from the imported disk"
    );
}

#[test]
fn bundle_launch_refused_after_pcr_extend_and_on_another_tpm() {
    let host = Host::new();
    let (bundle, helper, _) = host.provision();
    let before = std::fs::read(&bundle).unwrap();

    let other = SwtpmProcess::start(&host.path("other-tpm")).unwrap();
    let err = host.refused(&[
        "run",
        "--bundle",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &other.tcti(),
        "--attest-only",
    ]);
    // A fresh TPM has the same (zero) PCR 16/23 values: the identity check refuses it.
    assert!(err.contains("TPM identity check failed"), "{err}");
    let out = host.sealvm(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &other.tcti(),
        "--output",
        s(&host.path("x.raw")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("TPM identity check failed"),
        "{stderr} / {err}"
    );

    HostTpm::connect(&host.swtpm.tcti())
        .unwrap()
        .extend_pcr(16, b"host update")
        .unwrap();
    let out = host.sealvm(&[
        "run",
        "--bundle",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &host.swtpm.tcti(),
        "--attest-only",
    ]);
    assert!(!out.status.success());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["trusted"], false);
    assert_eq!(report["pcrs"][0]["matches"], false);
    assert!(String::from_utf8_lossy(&out.stderr).contains("PCR [16]"));
    let err = host.refused(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &host.swtpm.tcti(),
        "--output",
        s(&host.path("y.raw")),
    ]);
    assert!(err.contains("PCR [16]"), "{err}");
    assert!(
        std::fs::read(&bundle).unwrap() == before,
        "refused launch modified the bundle"
    );
}

#[test]
fn bundle_reseal_to_new_pcrs_keeps_disk_and_drops_old_key() {
    let host = Host::new();
    let (bundle, helper, disk) = host.provision();
    let tcti = host.swtpm.tcti();
    // Planned host update: reseal to PCR 23 only, then extend 16; launch still works.
    host.ok(&[
        "bundle",
        "reseal",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--pcrs",
        "23",
    ]);
    HostTpm::connect(&tcti)
        .unwrap()
        .extend_pcr(16, b"planned update")
        .unwrap();
    let out = host.path("after.raw");
    host.ok(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--output",
        s(&out),
    ]);
    assert!(std::fs::read(&out).unwrap() == disk);
    let inspect: serde_json::Value = serde_json::from_str(&host.ok(&[
        "bundle",
        "inspect",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
    ]))
    .unwrap();
    assert_eq!(inspect["active_key_slots"].as_array().unwrap().len(), 1);
    assert_eq!(inspect["sealed_pcrs"], serde_json::json!([23]));
}

#[test]
fn bundle_launch_refused_without_helper_partition_or_when_tampered() {
    let host = Host::new();
    let (bundle, helper, _) = host.provision();
    let tcti = host.swtpm.tcti();
    let plain = host.path("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let err = host.refused(&[
        "run",
        "--bundle",
        s(&bundle),
        "--helper-disk",
        s(&plain),
        "--tcti",
        &tcti,
        "--attest-only",
    ]);
    assert!(err.contains("no `sealvm-sealed` partition"), "{err}");

    // Flip a byte of the manifest ciphertext (payload starts at 2 MiB, manifest at +4 KiB).
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bundle)
        .unwrap();
    let at = (2 << 20) + 4096 + 100;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 1], at).unwrap();
    let err = host.refused(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--output",
        s(&host.path("z.raw")),
    ]);
    assert!(
        err.contains("VM-state manifest failed its integrity check"),
        "{err}"
    );
}
