//! Trusted launch end to end on this host's /dev/kvm: `sealvm run --bundle` attests the host
//! (swtpm as its TPM), unseals, opens the bundle, boots the probe guest with the bundle's
//! encrypted disk and a TPM CRB device backed by the guest's own swtpm, and writes the vTPM
//! state back on power-off. The NV index the guest defines survives into the next launch;
//! what the guest writes to its disk is never plaintext in the bundle file.

use sealvm_testkit::SwtpmProcess;
use sealvm_testkit::{SealvmVm, Workspace};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Site {
    dir: tempfile::TempDir,
    host_tpm: SwtpmProcess,
    sealvm: PathBuf,
    probe: PathBuf,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let host_tpm = SwtpmProcess::start(&dir.path().join("host-tpm")).unwrap();
        let workspace = Workspace::locate();
        Site {
            sealvm: workspace.binary("sealvm").expect("build sealvm first"),
            probe: workspace
                .probe_guest()
                .expect("run cargo xtask images first"),
            dir,
            host_tpm,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sealvm_ok(&self, args: &[String]) {
        let out = Command::new(&self.sealvm).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "sealvm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn provision(&self) -> (PathBuf, PathBuf) {
        let helper = self.path("helper.img");
        let bundle = self.path("probe.svm");
        self.sealvm_ok(&["helper-partition".into(), "init".into(), s(&helper)]);
        self.sealvm_ok(&[
            "bundle".into(),
            "create".into(),
            s(&bundle),
            "--helper-disk".into(),
            s(&helper),
            "--tcti".into(),
            self.host_tpm.tcti(),
            "--pcrs".into(),
            "16,23".into(),
            "--kernel".into(),
            s(&self.probe),
            "--cmdline".into(),
            "probe.sealed=1".into(),
            "--memory".into(),
            "64M".into(),
            "--disk-size".into(),
            "8M".into(),
        ]);
        (bundle, helper)
    }

    fn launch(&self, bundle: &Path, helper: &Path) -> SealvmVm {
        let args = vec![
            "--bundle".into(),
            s(bundle),
            "--helper-disk".into(),
            s(helper),
            "--tcti".into(),
            self.host_tpm.tcti(),
            "--kernel".into(),
            s(&self.probe),
        ];
        SealvmVm::start(&self.sealvm, &args).unwrap()
    }
}

fn finish(vm: &mut SealvmVm, expected: &[&str]) -> String {
    let done = vm.wait_for("PROBE DONE", Duration::from_secs(60));
    let status = vm.wait_exit(Duration::from_secs(30));
    let output = vm.output();
    assert!(
        done.is_some_and(|d| d.ends_with("fail=0")),
        "probe failed:\n{output}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "sealvm failed:\n{output}"
    );
    for check in expected {
        assert!(
            output.contains(&format!("PASS {check}")),
            "no PASS {check}:\n{output}"
        );
    }
    output
}

#[test]
fn a_sealed_bundle_boots_with_its_disk_and_vtpm_and_the_vtpm_state_persists() {
    let site = Site::new();
    let (bundle, helper) = site.provision();

    let mut first = site.launch(&bundle, &helper);
    let output = finish(
        &mut first,
        &[
            "blk-write",
            "blk-read",
            "blk-flush",
            "tpm-locality",
            "tpm-crb-interface",
            "tpm-startup",
            "tpm-getrandom",
            "tpm-pcr-extend",
            "tpm-pcr-read",
            "tpm-nv-define",
            "tpm-nv-write",
            "tpm-nv-read",
        ],
    );
    assert!(
        output.contains("INFO cmdline probe.sealed=1"),
        "sealed cmdline: {output}"
    );
    assert!(!output.contains("tpm-nv-persisted"), "{output}");

    // At rest, the guest's data is ciphertext only.
    let file = std::fs::read(&bundle).unwrap();
    assert!(
        !file.windows(16).any(|w| w == b"SEALVM-PROBE-OK!"),
        "plaintext guest data in the bundle file"
    );
    // ... and the attested host reads it back decrypted.
    let exported = site.path("export.raw");
    site.sealvm_ok(&[
        "bundle".into(),
        "export".into(),
        s(&bundle),
        "--helper-disk".into(),
        s(&helper),
        "--tcti".into(),
        site.host_tpm.tcti(),
        "--output".into(),
        s(&exported),
    ]);
    let disk = std::fs::read(&exported).unwrap();
    assert_eq!(&disk[2048 * 512..2048 * 512 + 16], b"SEALVM-PROBE-OK!");

    // Second launch: the NV index the guest defined is still in its vTPM.
    let mut second = site.launch(&bundle, &helper);
    finish(&mut second, &["tpm-getrandom", "tpm-nv-persisted"]);

    // An unplanned host change: the next launch is refused before any guest code runs,
    // and the bundle is left as it was.
    let before = std::fs::read(&bundle).unwrap();
    sealvm_trust::tpm::HostTpm::connect(&site.host_tpm.tcti())
        .unwrap()
        .extend_pcr(16, b"unplanned change")
        .unwrap();
    let mut refused = site.launch(&bundle, &helper);
    let status = refused.wait_exit(Duration::from_secs(30)).unwrap();
    assert!(!status.success(), "launch on an untrusted host succeeded");
    assert!(
        !refused.output().contains("PROBE"),
        "guest code ran: {}",
        refused.output()
    );
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        before,
        "the refused launch changed the bundle"
    );
}

#[test]
fn a_bundle_refuses_a_kernel_other_than_the_sealed_one() {
    let site = Site::new();
    let (bundle, helper) = site.provision();
    let other = site.path("other-kernel");
    let mut data = std::fs::read(&site.probe).unwrap();
    data.push(0);
    std::fs::write(&other, data).unwrap();
    let out = Command::new(&site.sealvm)
        .args(["run", "--bundle"])
        .arg(&bundle)
        .arg("--helper-disk")
        .arg(&helper)
        .arg("--tcti")
        .arg(site.host_tpm.tcti())
        .arg("--kernel")
        .arg(&other)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("does not match the SHA-256"), "{stderr}");
    assert!(!stderr.contains("PROBE"), "no guest code may run: {stderr}");
}
