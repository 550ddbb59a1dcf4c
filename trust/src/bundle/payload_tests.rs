//! Bundle payload: round trip, tamper detection per region, crash-atomic vTPM write-back.

use super::luks1::LuksError;
use super::payload::{Bundle, BundleError, DiskSource, Region, VmManifest, WriteStep};
use std::os::unix::fs::FileExt;
use std::path::Path;

const SECRET: &[u8] = b"9c0ffee0000000000000000000000000000000000000000000000000000000c9";

fn manifest() -> VmManifest {
    VmManifest {
        vcpus: 2,
        memory_mib: 256,
        cmdline: "console=ttyS0".into(),
        kernel_sha256: "ab".repeat(32),
        initramfs_sha256: None,
    }
}

fn create(path: &Path) -> Bundle {
    Bundle::create(
        path,
        SECRET,
        &manifest(),
        b"vtpm-state-v1",
        DiskSource::Empty(2 << 20),
    )
    .unwrap()
}

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn create_open_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let bundle = create(&path);
    let id = bundle.id();
    let data: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    bundle.write_disk(8192, &data).unwrap();
    bundle.sync().unwrap();
    drop(bundle);
    let bundle = Bundle::open(&path, SECRET, false).unwrap();
    assert_eq!(bundle.id(), id);
    assert_eq!(bundle.manifest().unwrap(), manifest());
    assert_eq!(&bundle.vtpm_state().unwrap()[..], b"vtpm-state-v1");
    assert_eq!(bundle.disk_bytes(), 2 << 20);
    let mut back = vec![0u8; 4096];
    bundle.read_disk(8192, &mut back).unwrap();
    assert_eq!(back, data);
    assert!(bundle.read_disk(2 << 20, &mut back).is_err());
}

#[test]
fn raw_disk_is_imported() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("disk.raw");
    let content: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&raw, &content).unwrap();
    let path = dir.path().join("b.svm");
    let bundle = Bundle::create(&path, SECRET, &manifest(), b"s", DiskSource::Raw(&raw)).unwrap();
    assert_eq!(bundle.disk_bytes(), 2 << 20);
    let mut back = vec![0u8; 2 << 20];
    bundle.read_disk(0, &mut back).unwrap();
    assert_eq!(&back[..content.len()], &content[..]);
    assert!(back[content.len()..].iter().all(|&b| b == 0));
}

fn open_err(path: &Path) -> BundleError {
    let bundle = match Bundle::open(path, SECRET, false) {
        Err(e) => return e,
        Ok(b) => b,
    };
    if let Err(e) = bundle.manifest() {
        return e;
    }
    match bundle.vtpm_state() {
        Err(e) => e,
        Ok(_) => panic!("tampered bundle opened cleanly"),
    }
}

#[test]
fn tampering_any_region_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let payload = create(&path).luks_header().payload_offset_bytes();
    let pristine = std::fs::read(&path).unwrap();
    let cases = [
        (payload + 40, Some(Region::Superblock)),
        (payload + 4096 + 60, Some(Region::Manifest)),
        (payload + (1 << 20) + 50, Some(Region::VtpmState)),
        (112, None),          // master-key digest in the LUKS header
        (8 * 512 + 77, None), // key slot 0 material
    ];
    for (at, region) in cases {
        std::fs::write(&path, &pristine).unwrap();
        flip(&path, at);
        match (open_err(&path), region) {
            (BundleError::Integrity(got), Some(want)) => assert_eq!(got, want, "byte {at}"),
            (BundleError::Luks(LuksError::WrongSecret), None) => {}
            (other, _) => panic!("byte {at}: unexpected {other:?}"),
        }
    }
}

#[test]
fn truncated_bundle_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    create(&path);
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(3000).unwrap();
    assert!(matches!(
        Bundle::open(&path, SECRET, false),
        Err(BundleError::Luks(LuksError::Truncated { .. }))
    ));
}

#[test]
fn vtpm_write_back_crash_leaves_old_or_new() {
    let steps = [
        WriteStep::SlotWrite,
        WriteStep::SlotSync,
        WriteStep::SuperblockWrite,
        WriteStep::SuperblockSync,
    ];
    for crash_at in steps {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.svm");
        let mut bundle = create(&path);
        bundle.write_vtpm_state(b"generation-two").unwrap();
        let stopped = bundle
            .write_vtpm_state_until(b"generation-three", |step| {
                if step == crash_at {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            })
            .unwrap();
        assert_eq!(stopped, Some(crash_at));
        drop(bundle);
        let reopened = Bundle::open(&path, SECRET, true).unwrap();
        let state = reopened.vtpm_state().unwrap();
        // Only a crash after the superblock write (before its sync) may show the new state.
        if crash_at == WriteStep::SuperblockSync {
            assert!(&state[..] == b"generation-three" || &state[..] == b"generation-two");
        } else {
            assert_eq!(&state[..], b"generation-two", "crash at {crash_at:?}");
        }
        let mut reopened = reopened;
        reopened.write_vtpm_state(b"after-recovery").unwrap();
        let again = Bundle::open(&path, SECRET, false).unwrap();
        assert_eq!(&again.vtpm_state().unwrap()[..], b"after-recovery");
    }
}

#[test]
fn qemu_img_sees_guest_disk_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let bundle = create(&path);
    let data: Vec<u8> = (0..65536).map(|i| (i * 13 % 256) as u8).collect();
    bundle.write_disk(0, &data).unwrap();
    bundle.sync().unwrap();
    let out = dir.path().join("out.raw");
    let status = std::process::Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!(
            "secret,id=s0,data={}",
            std::str::from_utf8(SECRET).unwrap()
        ))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            path.display()
        ))
        .args(["-O", "raw"])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let plain = std::fs::read(&out).unwrap();
    let at = Bundle::disk_offset_in_payload() as usize;
    assert_eq!(&plain[at..at + data.len()], &data[..]);
}

#[test]
fn rollback_mark_is_authenticated_and_survives_vtpm_write_back() {
    use super::payload::RollbackMark;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let mut bundle = create(&path);
    assert_eq!(bundle.rollback_mark(), None);
    let mark = RollbackMark {
        counter_index: 0x015e_a123,
        generation: 41,
    };
    bundle.write_rollback_mark(mark).unwrap();
    bundle.write_vtpm_state(b"after the mark").unwrap();
    drop(bundle);
    let reopened = Bundle::open(&path, SECRET, false).unwrap();
    assert_eq!(reopened.rollback_mark(), Some(mark));
    drop(reopened);
    // The mark is inside the superblock's HMAC: an older generation written over it by
    // someone without the key is tampering.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let at = (2 << 20) + 104;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ 1], at).unwrap();
    assert!(matches!(
        Bundle::open(&path, SECRET, false),
        Err(BundleError::Integrity(Region::Superblock))
    ));
}

#[test]
fn a_bundle_has_one_writer_at_a_time_and_readers_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    drop(create(&path));
    let writer = Bundle::open(&path, SECRET, true).unwrap();
    assert!(matches!(
        Bundle::open(&path, SECRET, true),
        Err(BundleError::InUse { .. })
    ));
    assert!(
        Bundle::open(&path, SECRET, false).is_ok(),
        "a reader was refused"
    );
    drop(writer);
    assert!(Bundle::open(&path, SECRET, true).is_ok());
}
