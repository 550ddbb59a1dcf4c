//! Measurements for `cargo xtask bench` (run in release): XTS throughput on 4 KiB requests
//! and the trusted-launch steps against swtpm. Prints one JSON object on stdout.

use sealvm_testkit::SwtpmProcess;
use sealvm_trust::bundle::payload::{Bundle, DiskSource, VmManifest};
use sealvm_trust::bundle::xts::SectorCipher;
use sealvm_trust::helper_partition::SealedPartition;
use sealvm_trust::launch;
use sealvm_trust::tpm::HostTpm;
use std::time::{Duration, Instant};

fn throughput(mut op: impl FnMut(&mut [u8], u64)) -> f64 {
    let mut buf = vec![0x5au8; 4096];
    // Warm up, then run 4 KiB requests for at least a second, as `openssl speed` does, so
    // a busy machine's scheduling noise averages out the same way for both.
    for i in 0..1024 {
        op(&mut buf, i * 8);
    }
    let start = Instant::now();
    let mut requests = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..4096 {
            op(&mut buf, requests * 8);
            requests += 1;
        }
    }
    (requests * 4096) as f64 / start.elapsed().as_secs_f64() / (1 << 20) as f64
}

/// 4 KiB guest-disk writes and reads through a bundle on /dev/shm (memory, so the cipher
/// and the MAC are what is measured), plain and `--integrity`: [plain write, plain read,
/// integrity write, integrity read] in MiB/s.
fn disk_throughput() -> anyhow::Result<[f64; 4]> {
    use sealvm_trust::bundle::payload::CreateOptions;
    let dir = tempfile::Builder::new().tempdir_in("/dev/shm")?;
    let manifest = VmManifest {
        vcpus: 1,
        memory_mib: 64,
        cmdline: String::new(),
        kernel_sha256: "00".repeat(32),
        initramfs_sha256: None,
    };
    let mut out = [0.0; 4];
    for (i, integrity) in [false, true].into_iter().enumerate() {
        let path = dir.path().join(format!("disk-{i}.svm"));
        let bundle = Bundle::create_with(
            &path,
            b"0123456789abcdef0123456789abcdef",
            &manifest,
            b"state",
            DiskSource::Empty(64 << 20),
            CreateOptions { integrity },
        )?;
        let requests = (64u64 << 20) / 4096;
        out[2 * i] = throughput(|b, s| {
            bundle
                .write_disk((s / 8 % requests) * 4096, b)
                .expect("in range")
        });
        out[2 * i + 1] = throughput(|b, s| {
            bundle
                .read_disk((s / 8 % requests) * 4096, b)
                .expect("in range")
        });
    }
    Ok(out)
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() -> anyhow::Result<()> {
    let cipher = SectorCipher::new(&[7u8; 32])?;
    let encrypt = throughput(|b, s| cipher.encrypt_sectors(b, s).expect("aligned"));
    let decrypt = throughput(|b, s| cipher.decrypt_sectors(b, s).expect("aligned"));
    let [plain_write, plain_read, integrity_write, integrity_read] = disk_throughput()?;

    let dir = tempfile::tempdir()?;
    let swtpm = SwtpmProcess::start(&dir.path().join("host-tpm"))?;
    let helper = dir.path().join("helper.img");
    let partition = SealedPartition::init(&helper, 4 << 20, 16 << 20)?;
    let bundle_path = dir.path().join("b.svm");
    let secret = "ab".repeat(32);
    let manifest = VmManifest {
        vcpus: 1,
        memory_mib: 128,
        cmdline: String::new(),
        kernel_sha256: "00".repeat(32),
        initramfs_sha256: None,
    };
    let bundle = Bundle::create(
        &bundle_path,
        secret.as_bytes(),
        &manifest,
        &[1; 4096],
        DiskSource::Empty(1 << 20),
    )?;
    let sealed =
        HostTpm::connect(&swtpm.tcti())?.seal(&bundle.id(), &[16, 23], secret.as_bytes())?;
    partition.put(sealed)?;
    drop(bundle);
    let (mut attest, mut unseal, mut open, mut total) = (vec![], vec![], vec![], vec![]);
    for _ in 0..7 {
        let start = Instant::now();
        let opened = launch::attest_and_open(&bundle_path, &helper, &swtpm.tcti(), false)?;
        total.push(start.elapsed());
        attest.push(opened.timings.attest);
        unseal.push(opened.timings.unseal);
        open.push(opened.timings.open);
    }
    // The guest's vTPM: swtpm started on a manufactured state, until it answers a command.
    let opened = launch::attest_and_open(&bundle_path, &helper, &swtpm.tcti(), false)?;
    let key = opened.vtpm_key_hex();
    let state = sealvm_trust::provision::manufacture_vtpm(&key)?;
    let mut vtpm_start = vec![];
    for _ in 0..7 {
        let start = Instant::now();
        let vtpm = sealvm_trust::tpm::vtpm::Vtpm::start(&state, &key, false)?;
        vtpm_start.push(start.elapsed());
        drop(vtpm);
    }
    println!(
        "{}",
        serde_json::json!({
            "vtpm_start_ms": median(vtpm_start),
            "xts_encrypt_mib_s": encrypt,
            "xts_decrypt_mib_s": decrypt,
            "disk_write_mib_s": plain_write,
            "disk_read_mib_s": plain_read,
            "integrity_write_mib_s": integrity_write,
            "integrity_read_mib_s": integrity_read,
            "attest_ms": median(attest),
            "unseal_ms": median(unseal),
            "open_ms": median(open),
            "attest_unseal_open_ms": median(total),
        })
    );
    Ok(())
}
