//! `bundle create --integrity` end to end: cryptsetup still reads the container, the probe
//! guest boots and uses the tamper-evident disk, and a sector flipped in the file is
//! refused (an error naming the sector), never returned as wrong data.

use sealvm_testkit::{SwtpmProcess, Workspace};
use std::path::Path;
use std::process::{Command, Output};

fn s(p: &Path) -> String {
    p.display().to_string()
}

#[test]
fn an_integrity_bundle_boots_and_a_flipped_sector_is_refused_not_returned() {
    let workspace = Workspace::locate();
    let probe = match workspace.probe_guest() {
        Ok(probe) => probe,
        Err(error) => return eprintln!("SKIP: {error} (run `cargo xtask images`)"),
    };
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return eprintln!("SKIP: /dev/kvm is not usable here");
    }
    let sealvm = workspace.binary("sealvm").expect("build sealvm first");
    let dir = tempfile::tempdir().unwrap();
    let host_tpm = SwtpmProcess::start(&dir.path().join("host-tpm")).unwrap();
    let helper = dir.path().join("helper.img");
    let bundle = dir.path().join("i.svm");
    let run = |args: &[String]| -> Output { Command::new(&sealvm).args(args).output().unwrap() };
    let tpm = vec![
        "--helper-disk".into(),
        s(&helper),
        "--tcti".into(),
        host_tpm.tcti(),
    ];
    assert!(run(&["helper-partition".into(), "init".into(), s(&helper)])
        .status
        .success());
    let mut create: Vec<String> = vec!["bundle".into(), "create".into(), s(&bundle)];
    create.extend(tpm.clone());
    create.extend(
        [
            "--pcrs",
            "16,23",
            "--memory",
            "64M",
            "--disk-size",
            "8M",
            "--integrity",
            "--kernel",
        ]
        .map(String::from),
    );
    create.push(s(&probe));
    let out = run(&create);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = Command::new("cryptsetup")
        .arg("luksDump")
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&dump.stdout).contains("xts-plain64"));

    let mut launch: Vec<String> = vec!["run".into(), "--bundle".into(), s(&bundle)];
    launch.extend(tpm.clone());
    launch.extend(["--kernel".into(), s(&probe)]);
    let out = run(&launch);
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        console.contains("PASS blk-read") && console.contains("fail=0"),
        "{console}"
    );

    let mut inspect: Vec<String> = vec!["bundle".into(), "inspect".into(), s(&bundle)];
    inspect.extend(tpm.clone());
    let json: serde_json::Value = serde_json::from_slice(&run(&inspect).stdout).unwrap();
    assert_eq!(json["disk_integrity"], true, "{json}");

    // Flip one byte of the sector the probe wrote (disk sector 2048; the disk starts 3 MiB
    // into the LUKS payload, which starts at 2 MiB).
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&bundle)
        .unwrap();
    let at = (5 << 20) + 2048 * 512 + 3;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    let mut export: Vec<String> = vec!["bundle".into(), "export".into(), s(&bundle)];
    export.extend(tpm);
    export.extend(["--output".into(), s(&dir.path().join("out.raw"))]);
    let out = run(&export);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a tampered disk exported");
    assert!(
        stderr.contains("sector 2048 failed its integrity check"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("out.raw").exists(),
        "a partial export was left"
    );
}
