//! LUKS1 interop with the real tools: cryptsetup reads sealvm's header, QEMU decrypts
//! sealvm's payload, and sealvm opens QEMU's containers.

use super::luks1::{self, LuksError};
use super::volume::EncryptedVolume;
use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::Command;

const SECRET: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";

fn create(path: &Path, payload: u64) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap()
        .tap(|f| {
            luks1::format(f, SECRET.as_bytes(), payload).unwrap();
        })
}

trait Tap: Sized {
    fn tap(self, f: impl FnOnce(&Self)) -> Self {
        f(&self);
        self
    }
}
impl Tap for File {}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 512) as u8).collect()
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn format_unlock_round_trip_and_wrong_secret_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let (header, key, slot) = luks1::unlock(&file, SECRET.as_bytes()).unwrap();
    assert_eq!(slot, 0);
    assert_eq!(key.len(), 32);
    let volume = EncryptedVolume::new(file, &header, &key).unwrap();
    assert_eq!(volume.sectors(), 2048);
    let data = pattern(8192);
    volume.write_sectors(100, &data).unwrap();
    let mut back = vec![0u8; 8192];
    volume.read_sectors(100, &mut back).unwrap();
    assert_eq!(back, data);
    // The file holds ciphertext only.
    let raw = std::fs::read(&path).unwrap();
    let at = header.payload_offset_bytes() as usize + 100 * 512;
    assert_ne!(&raw[at..at + 8192], &data[..]);
    assert!(volume.read_sectors(2047, &mut back).is_err());

    let file = File::open(&path).unwrap();
    assert!(matches!(
        luks1::unlock(&file, b"wrong"),
        Err(LuksError::WrongSecret)
    ));
}

#[test]
fn reslot_keeps_master_key_and_drops_old_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let (mut header, key, _) = luks1::unlock(&file, SECRET.as_bytes()).unwrap();
    luks1::set_key_slot(&file, &mut header, &key, 1, b"new-secret").unwrap();
    luks1::kill_key_slot(&file, &mut header, 0).unwrap();
    let (_, key2, slot) = luks1::unlock(&file, b"new-secret").unwrap();
    assert_eq!((slot, &key2[..]), (1, &key[..]));
    assert!(matches!(
        luks1::unlock(&file, SECRET.as_bytes()),
        Err(LuksError::WrongSecret)
    ));
}

#[test]
fn cryptsetup_luksdump_reads_sealvm_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let header = luks1::read_header(&file).unwrap();
    let dump = run(Command::new("cryptsetup").arg("luksDump").arg(&path));
    assert!(dump.contains("Version:       \t1"), "{dump}");
    assert!(dump.contains("Cipher name:   \taes"), "{dump}");
    assert!(dump.contains("Cipher mode:   \txts-plain64"), "{dump}");
    assert!(dump.contains("Hash spec:     \tsha256"), "{dump}");
    assert!(dump.contains("MK bits:       \t256"), "{dump}");
    assert!(dump.contains("Payload offset:\t4096"), "{dump}");
    assert!(dump.contains(&header.uuid), "{dump}");
    assert!(dump.contains("Key Slot 0: ENABLED"), "{dump}");
    assert!(dump.contains("Key Slot 1: DISABLED"), "{dump}");
}

#[test]
fn qemu_img_decrypts_sealvm_payload() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let (header, key, _) = luks1::unlock(&file, SECRET.as_bytes()).unwrap();
    let volume = EncryptedVolume::new(file, &header, &key).unwrap();
    let data = pattern(1 << 20);
    volume.write_sectors(0, &data).unwrap();
    volume.sync().unwrap();
    let out = dir.path().join("out.raw");
    run(Command::new("qemu-img")
        .arg("convert")
        .arg("--object")
        .arg(format!("secret,id=s0,data={SECRET}"))
        .arg("--image-opts")
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            path.display()
        ))
        .arg("-O")
        .arg("raw")
        .arg(&out));
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img decrypted different bytes"
    );
}

fn sealvm_reads_qemu_img_luks(cipher_alg: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.luks");
    let object = format!("secret,id=s0,data={SECRET}");
    run(Command::new("qemu-img")
        .args(["create", "-f", "luks", "--object", &object])
        .arg("-o")
        .arg(format!("key-secret=s0,cipher-alg={cipher_alg},cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256,iter-time=10"))
        .arg(&path)
        .arg("1M"));
    run(Command::new("qemu-io")
        .args(["--object", &object, "--image-opts"])
        .arg(format!(
            "driver=luks,key-secret=s0,file.filename={}",
            path.display()
        ))
        .args([
            "-c",
            "write -P 0xa5 4096 8192",
            "-c",
            "write -P 0x3c 65536 512",
        ]));
    let file = File::open(&path).unwrap();
    let (header, key, _) = luks1::unlock(&file, SECRET.as_bytes()).unwrap();
    let volume = EncryptedVolume::new(file, &header, &key).unwrap();
    let mut buf = vec![0u8; 8192];
    volume.read_sectors(8, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0xa5));
    let mut one = vec![0u8; 512];
    volume.read_sectors(128, &mut one).unwrap();
    assert!(one.iter().all(|&b| b == 0x3c));
}

#[test]
fn sealvm_opens_qemu_img_luks_xts_aes_128() {
    sealvm_reads_qemu_img_luks("aes-128");
}

#[test]
fn sealvm_opens_qemu_img_luks_xts_aes_256() {
    sealvm_reads_qemu_img_luks("aes-256");
}

#[test]
fn mutated_headers_error_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let header = luks1::read_header(&file).unwrap();
    let pristine = header.to_bytes();
    assert_eq!(luks1::Header::parse(&pristine).unwrap(), header);
    // Every single-byte corruption of the header either parses or errors; none panics.
    for at in 0..pristine.len() {
        for value in [0x00u8, 0xff, 0x41] {
            let mut bytes = pristine;
            bytes[at] = value;
            let _ = luks1::Header::parse(&bytes);
        }
    }
    let mut bad = pristine;
    bad[0] = b'X';
    assert!(matches!(
        luks1::Header::parse(&bad),
        Err(LuksError::BadMagic)
    ));
    let mut bad = pristine;
    bad[7] = 2;
    assert!(matches!(
        luks1::Header::parse(&bad),
        Err(LuksError::UnsupportedVersion(2))
    ));
    let mut bad = pristine;
    bad[72..78].copy_from_slice(b"sha1\0\0");
    assert!(matches!(
        luks1::Header::parse(&bad),
        Err(LuksError::UnsupportedHash(_))
    ));
    assert!(matches!(
        luks1::Header::parse(&pristine[..100]),
        Err(LuksError::Truncated { .. })
    ));
}

#[test]
fn huge_pbkdf2_iteration_counts_are_refused_before_any_key_derivation() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.svm");
    let file = create(&path, 1 << 20);
    let original = luks1::read_header(&file).unwrap();
    // Slot 0's iterations (offset 208 + 4) and then the master-key digest's (164), each
    // set to 2^24: the refusal must come from the header check, at once.
    for (at, name) in [(212u64, "key slot"), (164, "master-key digest")] {
        file.write_all_at(&original.to_bytes(), 0).unwrap();
        file.write_all_at(&(1u32 << 24).to_be_bytes(), at).unwrap();
        let start = std::time::Instant::now();
        let result = luks1::unlock(&file, SECRET.as_bytes());
        assert!(
            matches!(result, Err(LuksError::Malformed(_))),
            "{name}: 2^24 iterations not refused"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{name}: refusal took {:?}",
            start.elapsed()
        );
    }
    file.write_all_at(&original.to_bytes(), 0).unwrap();
    assert!(luks1::unlock(&file, SECRET.as_bytes()).is_ok());
}
