//! The guest's vTPM: restored from the bundle on an attested host, changed, written back on
//! stop, and still changed at the next launch; its state is useless without the bundle key.

use sealvm_testkit::SwtpmProcess;
use sealvm_testkit::Workspace;
use sealvm_trust::launch;
use sealvm_trust::tpm::vtpm::Vtpm;
use std::path::Path;
use std::process::Command;

const NV_INDEX: &str = "0x1500016";

fn tpm2(tool: &str, tcti: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(["-T", tcti])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bundle_vtpm_nv_index_survives_relaunch_and_needs_bundle_key() {
    let dir = tempfile::tempdir().unwrap();
    let host_tpm = SwtpmProcess::start(&dir.path().join("host-tpm")).unwrap();
    let sealvm = Workspace::locate()
        .binary("sealvm")
        .expect("build sealvm first");
    let helper = dir.path().join("helper.img");
    let bundle_path = dir.path().join("vm.svm");
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(&sealvm).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&["helper-partition", "init", s(&helper)]);
    run(&[
        "bundle",
        "create",
        s(&bundle_path),
        "--helper-disk",
        s(&helper),
        "--tcti",
        &host_tpm.tcti(),
        "--pcrs",
        "16,23",
        "--kernel",
        s(&kernel),
        "--disk-size",
        "1M",
    ]);

    // First launch: define an NV index in the guest's vTPM, stop, write back.
    let mut opened =
        launch::attest_and_open(&bundle_path, &helper, &host_tpm.tcti(), true).unwrap();
    let generation = opened.bundle.vtpm_generation();
    let vtpm = Vtpm::start(&opened.vtpm_state, &opened.vtpm_key_hex(), true).unwrap();
    let tcti = vtpm.tcti().unwrap();
    let (ok, _) = tpm2(
        "tpm2_nvdefine",
        &tcti,
        &[
            NV_INDEX,
            "-C",
            "o",
            "-s",
            "32",
            "-a",
            "ownerread|ownerwrite",
        ],
    );
    assert!(ok, "tpm2_nvdefine failed");
    vtpm.stop_and_write_back(&mut opened.bundle).unwrap();
    assert_eq!(opened.bundle.vtpm_generation(), generation + 1);
    drop(opened);

    // Second launch: the index is still there.
    let opened = launch::attest_and_open(&bundle_path, &helper, &host_tpm.tcti(), true).unwrap();
    let vtpm = Vtpm::start(&opened.vtpm_state, &opened.vtpm_key_hex(), true).unwrap();
    let (ok, handles) = tpm2("tpm2_getcap", &vtpm.tcti().unwrap(), &["handles-nv-index"]);
    assert!(
        ok && handles.to_lowercase().contains(NV_INDEX),
        "NV index lost: {handles}"
    );
    drop(vtpm);

    // The stored state does not start under any other key: it is encrypted at rest.
    assert!(Vtpm::start(&opened.vtpm_state, &"00".repeat(16), true).is_err());
}
