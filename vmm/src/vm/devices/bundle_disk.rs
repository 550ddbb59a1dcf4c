//! A bundle's guest disk as a virtio-blk backend: every sector decrypted on read and
//! encrypted on write (XTS, plain64 tweak), so no plaintext reaches the file.

use sealvm_trust::bundle::payload::{Bundle, BundleError};
use sealvm_virtio_blk::BlockBackend;
use std::io;
use std::sync::{Arc, RwLock};

/// The guest disk of an open bundle. The bundle stays shared so the vTPM state can be
/// written back into it when the VM stops.
pub struct BundleDisk {
    bundle: Arc<RwLock<Bundle>>,
    capacity: u64,
    id: Vec<u8>,
}

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
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Bundle) -> Result<T, BundleError>) -> io::Result<T> {
        let bundle = self
            .bundle
            .read()
            .map_err(|_| io::Error::other("bundle lock poisoned"))?;
        f(&bundle).map_err(io::Error::other)
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
