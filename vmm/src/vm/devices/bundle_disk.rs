//! A bundle's guest disk as a virtio-blk backend: every sector decrypted on read and
//! encrypted on write (XTS, plain64 tweak), so no plaintext reaches the file. In an
//! `--integrity` bundle a sector whose MAC fails is an I/O error to the guest (virtio-blk
//! IOERR), counted and logged as an alarm, never wrong data.

use sealvm_trust::bundle::payload::{Bundle, BundleError};
use sealvm_virtio_blk::BlockBackend;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// The guest disk of an open bundle. The bundle stays shared so the vTPM state can be
/// written back into it when the VM stops.
pub struct BundleDisk {
    bundle: Arc<RwLock<Bundle>>,
    capacity: u64,
    id: Vec<u8>,
    integrity_failures: AtomicU64,
}

/// Integrity alarms logged in full before the log is thinned to one per 1024.
const ALARMS_LOGGED: u64 = 16;

impl BundleDisk {
    /// Serves `bundle`'s disk.
    pub fn new(bundle: Arc<RwLock<Bundle>>) -> io::Result<Self> {
        let (capacity, id) = {
            let b = bundle
                .read()
                .map_err(|_| io::Error::other("bundle lock poisoned"))?;
            let mut id = b.id().into_bytes();
            id.truncate(sealvm_virtio_blk::DEVICE_ID_LEN);
            (b.disk_bytes(), id)
        };
        Ok(BundleDisk {
            bundle,
            capacity,
            id,
            integrity_failures: AtomicU64::new(0),
        })
    }

    /// How many reads failed their integrity check (`--integrity` bundles).
    pub fn integrity_failures(&self) -> u64 {
        self.integrity_failures.load(Ordering::Relaxed)
    }

    fn with<T>(&self, f: impl FnOnce(&Bundle) -> Result<T, BundleError>) -> io::Result<T> {
        let bundle = self
            .bundle
            .read()
            .map_err(|_| io::Error::other("bundle lock poisoned"))?;
        f(&bundle).map_err(|error| {
            if let BundleError::DiskIntegrity { sector } = error {
                let count = self.integrity_failures.fetch_add(1, Ordering::Relaxed) + 1;
                if count <= ALARMS_LOGGED || count % 1024 == 0 {
                    tracing::error!(
                        sector,
                        failures = count,
                        "ALARM: bundle disk sector failed its integrity check; the guest gets an I/O error"
                    );
                }
            }
            io::Error::other(error)
        })
    }
}

impl BlockBackend for BundleDisk {
    fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.with(|b| b.read_disk(offset, buf))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.with(|b| b.write_disk(offset, buf))
    }

    fn flush(&self) -> io::Result<()> {
        self.with(|b| b.sync())
    }

    fn device_id(&self) -> &[u8] {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sealvm_trust::bundle::payload::{CreateOptions, DiskSource, VmManifest};
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_tampered_sector_of_an_integrity_bundle_is_an_io_error_and_an_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.svm");
        let secret = b"0123456789abcdef0123456789abcdef";
        let manifest = VmManifest {
            vcpus: 1,
            memory_mib: 64,
            cmdline: String::new(),
            kernel_sha256: "00".repeat(32),
            initramfs_sha256: None,
        };
        let bundle = Bundle::create_with(
            &path,
            secret,
            &manifest,
            b"state",
            DiskSource::Empty(1 << 20),
            CreateOptions { integrity: true },
        )
        .unwrap();
        let disk = BundleDisk::new(Arc::new(RwLock::new(bundle))).unwrap();
        disk.write_at(0, &[0xab; 4096]).unwrap();
        drop(disk);
        // Disk sector 3 of the file: LUKS payload at 2 MiB, disk at 3 MiB inside it.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let at = (5 << 20) + 3 * 512 + 9;
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, at).unwrap();
        file.write_all_at(&[b[0] ^ 0x10], at).unwrap();
        let bundle = Bundle::open(&path, secret, true).unwrap();
        let disk = BundleDisk::new(Arc::new(RwLock::new(bundle))).unwrap();
        let mut buf = [0u8; 512];
        assert!(disk.read_at(3 * 512, &mut buf).is_err());
        assert_eq!(disk.integrity_failures(), 1);
        disk.read_at(2 * 512, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 512]);
        disk.read_at(4 * 512, &mut buf).unwrap();
        assert_eq!(buf, [0xab; 512]);
    }
}
