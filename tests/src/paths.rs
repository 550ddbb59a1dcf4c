//! Where the workspace, its built binaries and the guest images live.

use std::path::{Path, PathBuf};

/// Errors finding the workspace's build outputs.
#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    /// A guest image file is missing: the images were not built.
    #[error("guest image {path} is missing; run `cargo xtask images` first")]
    ImageMissing {
        /// The file that was looked for.
        path: PathBuf,
    },
    /// A workspace binary is missing: it was not built.
    #[error("binary {path} is missing; run `cargo build --workspace --bins` first")]
    BinaryMissing {
        /// The file that was looked for.
        path: PathBuf,
    },
}

/// The sealvm workspace on disk.
#[derive(Debug, Clone)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// The workspace this crate was built in.
    pub fn locate() -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("the testkit lives one folder below the workspace root")
            .to_path_buf();
        Workspace { root }
    }

    /// The workspace root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Cargo's target folder (honours `CARGO_TARGET_DIR`).
    pub fn target_dir(&self) -> PathBuf {
        match std::env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => {
                let dir = PathBuf::from(dir);
                if dir.is_absolute() {
                    dir
                } else {
                    self.root.join(dir)
                }
            }
            None => self.root.join("target"),
        }
    }

    /// The git-ignored folder `cargo xtask images` builds into.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images").join("build")
    }

    /// The built Linux guest: kernel and initramfs.
    pub fn linux_guest(&self) -> Result<GuestImages, PathsError> {
        let dir = self.images_dir().join("linux-guest");
        let images = GuestImages {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        };
        for path in [&images.kernel, &images.initramfs] {
            if !path.is_file() {
                return Err(PathsError::ImageMissing { path: path.clone() });
            }
        }
        Ok(images)
    }

    /// The built probe guest (`images/build/probe-guest/probe.elf`).
    pub fn probe_guest(&self) -> Result<PathBuf, PathsError> {
        let path = self.images_dir().join("probe-guest").join("probe.elf");
        if path.is_file() {
            Ok(path)
        } else {
            Err(PathsError::ImageMissing { path })
        }
    }

    /// A workspace binary from the debug profile, such as `sealvm-blk`.
    pub fn binary(&self, name: &str) -> Result<PathBuf, PathsError> {
        let path = self.target_dir().join("debug").join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(PathsError::BinaryMissing { path })
        }
    }
}

/// The files of a bootable Linux guest.
#[derive(Debug, Clone)]
pub struct GuestImages {
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The gzip-compressed newc initramfs.
    pub initramfs: PathBuf,
}
