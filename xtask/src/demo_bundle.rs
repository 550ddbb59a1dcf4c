//! The trusted-launch part of `cargo xtask demo`: provision a sealed bundle on a swtpm
//! "host TPM", show the inspection and attestation report, then change PCR 16 and show the
//! refusal. Booting the bundle is the VMM's part and joins the demo when it lands.

use crate::images;
use anyhow::{Context, Result};
use sealvm_testkit::command::{run, step};
use sealvm_testkit::SwtpmProcess;
use sealvm_testkit::Workspace;
use std::process::Command;

/// Runs the sealed-bundle demo with the Linux guest's kernel and initramfs.
pub fn run_demo(workspace: &Workspace, built: &images::Built) -> Result<()> {
    step("demo: building sealvm");
    run(Command::new("cargo")
        .current_dir(workspace.root())
        .args(["build", "--quiet", "-p", "sealvm"]))?;
    let sealvm = workspace.binary("sealvm")?;
    let dir = tempfile::tempdir()?;
    let host_tpm = SwtpmProcess::start(&dir.path().join("host-tpm"))?;
    let tcti = host_tpm.tcti();
    let helper = dir.path().join("helper.img");
    let bundle = dir.path().join("web1.svm");
    let path = |p: &std::path::Path| p.display().to_string();
    let sealvm_cmd = |args: &[String]| {
        let mut c = Command::new(&sealvm);
        c.args(args);
        c
    };
    step("demo: sealvm helper-partition init helper.img");
    run(&mut sealvm_cmd(&[
        "helper-partition".into(),
        "init".into(),
        path(&helper),
    ]))?;
    step("demo: sealvm bundle create web1.svm for the probe guest (sealed to PCRs 16,23 of the swtpm host TPM)");
    let mut create: Vec<String> = ["bundle", "create"].map(String::from).to_vec();
    create.extend([
        path(&bundle),
        "--helper-disk".into(),
        path(&helper),
        "--tcti".into(),
        tcti.clone(),
    ]);
    create.extend(
        [
            "--pcrs",
            "16,23",
            "--disk-size",
            "16M",
            "--memory",
            "64M",
            "--cmdline",
            "console=ttyS0",
        ]
        .map(String::from),
    );
    create.extend(["--kernel".into(), path(&built.probe_guest)]);
    run(&mut sealvm_cmd(&create))?;
    let tpm_args = [
        "--helper-disk".to_string(),
        path(&helper),
        "--tcti".into(),
        tcti.clone(),
    ];
    step("demo: sealvm bundle inspect web1.svm");
    let mut inspect = vec!["bundle".into(), "inspect".into(), path(&bundle)];
    inspect.extend(tpm_args.clone());
    run(&mut sealvm_cmd(&inspect))?;
    let mut attest = vec![
        "run".into(),
        "--bundle".into(),
        path(&bundle),
        "--attest-only".into(),
    ];
    attest.extend(tpm_args.clone());
    step("demo: sealvm run --attest-only on the trusted host");
    run(&mut sealvm_cmd(&attest))?;
    step("demo: sealvm run --bundle web1.svm: attest, unseal, boot with the encrypted disk and the guest's vTPM");
    let mut launch = vec!["--bundle".into(), path(&bundle)];
    launch.extend(tpm_args);
    launch.extend(["--kernel".into(), path(&built.probe_guest)]);
    let mut vm = sealvm_testkit::SealvmVm::start(&sealvm, &launch)?;
    let done = vm.wait_for("PROBE DONE", std::time::Duration::from_secs(60));
    let status = vm.wait_exit(std::time::Duration::from_secs(30));
    for line in vm
        .output()
        .lines()
        .filter(|l| l.starts_with("PASS") || l.starts_with("FAIL") || l.starts_with("PROBE"))
    {
        println!("    guest: {line}");
    }
    anyhow::ensure!(
        done.is_some_and(|d| d.ends_with("fail=0")) && status.is_some_and(|s| s.success()),
        "the sealed guest did not pass its checks"
    );
    step("demo: extending host PCR 16 (an unplanned host change)");
    // tpm2-tools, as an operator would; the digest is SHA-256("unplanned change").
    run(Command::new("tpm2_pcrextend")
        .env("TPM2TOOLS_TCTI", &tcti)
        .arg(format!("16:sha256={}", sha256_hex(b"unplanned change"))))
    .context("tpm2_pcrextend on the host swtpm")?;
    step("demo: sealvm run --attest-only now refuses");
    let status = sealvm_cmd(&attest).status()?;
    anyhow::ensure!(!status.success(), "an untrusted host was not refused");
    step("demo: launch refused, as it should be");
    Ok(())
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(data)
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
