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
fn bundle_export_writes_the_decrypted_disk_0600_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let host = Host::new();
    let (bundle, helper, _) = host.provision();
    let out = host.path("export.raw");
    let status = Command::new(&host.sealvm)
        .args(["bundle", "export", s(&bundle), "--helper-disk", s(&helper)])
        .args(["--tcti", &host.swtpm.tcti(), "--output", s(&out)])
        .status()
        .unwrap();
    assert!(status.success());
    // The test runs with umask 022 (or laxer): the old export left 0644.
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "exported plaintext disk has mode {mode:o}");
    // And it still refuses to overwrite.
    let again = host.refused(&[
        "bundle",
        "export",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &host.swtpm.tcti(),
        "--output",
        s(&out),
    ]);
    assert!(again.contains("exists"), "{again}");
}

/// Flips one byte of `path` at `at`.
fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

#[test]
fn attest_only_unseals_and_verifies_the_bundle_and_refuses_tampering() {
    let host = Host::new();
    let (bundle, helper, _) = host.provision();
    let tcti = host.swtpm.tcti();
    let attest_only = |host: &Host| {
        host.sealvm(&[
            "run",
            "--bundle",
            s(&bundle),
            "--helper-disk",
            s(&helper),
            "--tcti",
            &tcti,
            "--attest-only",
        ])
    };
    let out = attest_only(&host);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["trusted"], true);
    assert_eq!(json["bundle_verified"], true);

    let original = std::fs::read(&bundle).unwrap();
    let payload = 2u64 << 20;
    // Places a host-only check never looked at (the old --attest-only exited 0 for them).
    let places: [(&str, &[u64]); 5] = [
        ("LUKS master-key digest", &[112]),
        ("LUKS key-slot material", &[4096 + 100]),
        ("payload superblock", &[payload + 100]),
        ("manifest", &[payload + 4096 + 100]),
        (
            "vTPM state (both slots)",
            &[payload + (1 << 20) + 100, payload + (2 << 20) + 100],
        ),
    ];
    for (name, offsets) in places {
        for &at in offsets {
            flip(&bundle, at);
        }
        let out = attest_only(&host);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "--attest-only accepted a tampered {name}: {stdout}"
        );
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{name}: no report: {stdout}"));
        assert_eq!(json["trusted"], true, "{name}");
        assert_eq!(json["bundle_verified"], false, "{name}");
        std::fs::write(&bundle, &original).unwrap();
    }
    // A wrong kernel is refused when one is given.
    let other = host.path("other-kernel");
    std::fs::write(&other, b"another kernel").unwrap();
    let err = host.refused(&[
        "run",
        "--bundle",
        s(&bundle),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &tcti,
        "--attest-only",
        "--kernel",
        s(&other),
    ]);
    assert!(err.contains("does not match the SHA-256"), "{err}");
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        original,
        "--attest-only wrote the bundle"
    );
}

#[test]
fn bundle_inspect_names_what_it_could_not_check_and_exits_non_zero() {
    let host = Host::new();
    let (bundle, helper, _) = host.provision();
    let tcti = host.swtpm.tcti();
    let inspect = |bundle: &Path, helper: &Path| {
        let out = host.sealvm(&[
            "bundle",
            "inspect",
            s(bundle),
            "--helper-disk",
            s(helper),
            "--tcti",
            &tcti,
        ]);
        (
            out.status.success(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, json, _) = inspect(&bundle, &helper);
    assert!(ok);
    assert_eq!(json.unwrap()["bundle_verified"], true);

    // Helper disks that cannot be checked: missing, garbage, no partition.
    let garbage = host.path("garbage.img");
    std::fs::write(
        &garbage,
        (0..(4u32 << 20))
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let plain = host.path("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    for bad in [host.path("does-not-exist.img"), garbage, plain] {
        let (ok, json, stderr) = inspect(&bundle, &bad);
        assert!(!ok, "inspect exited 0 with helper {}", bad.display());
        assert!(stderr.contains("helper partition"), "{stderr}");
        assert_eq!(json.unwrap()["host_trusted"], serde_json::Value::Null);
    }

    // A LUKS file sealvm did not make: no sealed record.
    let foreign = host.path("foreign.luks");
    let made = Command::new("qemu-img")
        .args(["create", "-f", "luks", "--object", "secret,id=s0,data=x"])
        .args(["-o", "key-secret=s0,cipher-alg=aes-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10"])
        .arg(&foreign)
        .arg("1M")
        .output();
    match made {
        Ok(out) if out.status.success() => {
            let (ok, _, stderr) = inspect(&foreign, &helper);
            assert!(!ok, "inspect exited 0 on a foreign LUKS file");
            assert!(stderr.contains("sealed record"), "{stderr}");
        }
        _ => eprintln!("SKIP (foreign LUKS case): qemu-img cannot create a LUKS file here"),
    }

    // A truncated and a damaged bundle on a trusted host: the host is trusted, the bundle
    // is not verified, and the exit says so.
    let original = std::fs::read(&bundle).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&bundle)
        .unwrap()
        .set_len((2 << 20) + 8192)
        .unwrap();
    let (ok, json, stderr) = inspect(&bundle, &helper);
    let json = json.unwrap();
    assert!(!ok, "inspect exited 0 on a truncated bundle");
    assert_eq!(json["host_trusted"], true, "{json}");
    assert_eq!(json["bundle_verified"], false, "{json}");
    assert!(stderr.contains("bundle"), "{stderr}");
    std::fs::write(&bundle, &original).unwrap();
    flip(&bundle, (2 << 20) + 4096 + 100);
    let (ok, json, stderr) = inspect(&bundle, &helper);
    let json = json.unwrap();
    assert!(!ok);
    assert_eq!(json["host_trusted"], true, "{json}");
    assert_eq!(json["bundle_verified"], false, "{json}");
    assert!(
        stderr.contains("manifest failed its integrity check"),
        "{stderr}"
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
