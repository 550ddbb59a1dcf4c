//! `cargo xtask images`: build the guest images into images/build/ (git-ignored).
//!
//! Each image records a digest of its inputs beside its outputs; when the inputs did not
//! change and the outputs are there, nothing is rebuilt.

mod kernel;
mod linux_guest;
mod probe_guest;

use anyhow::{Context, Result};
use sealvm_testkit::{GuestImages, Workspace};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Every image `cargo xtask images` builds.
pub struct Built {
    /// The Linux guest: Debian cloud kernel and busybox initramfs with sealvm-agent.
    pub linux_guest: GuestImages,
    /// The probe guest: a PVH ELF sealvm boots on real KVM.
    pub probe_guest: PathBuf,
}

/// Builds every guest image that is out of date.
pub fn build_all(workspace: &Workspace) -> Result<Built> {
    let linux_guest = linux_guest::build(workspace)?;
    let probe_guest = probe_guest::build(workspace)?;
    Ok(Built {
        linux_guest,
        probe_guest,
    })
}

/// Digests the inputs of one image, in order.
#[derive(Default)]
pub struct InputDigest(Sha256);

impl InputDigest {
    /// Adds a named input given as bytes.
    pub fn bytes(&mut self, name: &str, data: &[u8]) {
        self.0.update((name.len() as u64).to_le_bytes());
        self.0.update(name.as_bytes());
        self.0.update((data.len() as u64).to_le_bytes());
        self.0.update(data);
    }

    /// Adds a named input read from a file.
    pub fn file(&mut self, name: &str, path: &Path) -> Result<()> {
        let data =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        self.bytes(name, &data);
        Ok(())
    }

    /// The hex digest.
    pub fn finish(self) -> String {
        self.0
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// The stamp that records which inputs an image folder was built from.
pub struct Stamp {
    path: PathBuf,
}

impl Stamp {
    /// The stamp of the image built in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Stamp {
            path: dir.join("inputs.sha256"),
        }
    }

    /// True when the image was built from exactly `digest` and all `outputs` exist.
    pub fn is_current(&self, digest: &str, outputs: &[&Path]) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|recorded| recorded.trim() == digest)
            && outputs.iter().all(|output| output.is_file())
    }

    /// Records `digest` after a successful build.
    pub fn record(&self, digest: &str) -> Result<()> {
        std::fs::write(&self.path, format!("{digest}\n"))
            .with_context(|| format!("cannot write {}", self.path.display()))
    }
}
