//! Freezing and thawing mounted filesystems with the FIFREEZE and FITHAW ioctls, as
//! qemu-guest-agent's guest-fsfreeze-* commands do.
//!
//! Only filesystems on a block device (`/dev/...`) are candidates; virtual filesystems
//! (proc, sysfs, tmpfs, ramfs, devtmpfs, ...) are skipped, and a filesystem whose driver does
//! not support freezing (EOPNOTSUPP) is skipped too. Filesystems are frozen in reverse mount
//! order (children before parents) and thawed in mount order.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// `_IOWR('X', 119, int)`.
const FIFREEZE: libc::c_ulong = 0xc004_5877;
/// `_IOWR('X', 120, int)`.
const FITHAW: libc::c_ulong = 0xc004_5878;

/// Errors freezing or thawing.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// The mount table could not be read.
    #[error("cannot read the mount table")]
    MountTable(#[source] io::Error),
    /// A mountpoint asked for is not a mounted filesystem.
    #[error("{0} is not a mounted filesystem")]
    NotMounted(PathBuf),
    /// A filesystem could not be frozen.
    #[error("failed to freeze {mountpoint}")]
    Freeze {
        /// The filesystem.
        mountpoint: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The device or source, such as `/dev/vda`.
    pub source: String,
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// Filesystem type, such as `ext4`.
    pub fstype: String,
}

impl Mount {
    /// True for a filesystem on a block device, the kind FIFREEZE applies to.
    pub fn on_block_device(&self) -> bool {
        self.source.starts_with("/dev/")
            && !matches!(
                self.fstype.as_str(),
                "devtmpfs" | "tmpfs" | "ramfs" | "proc" | "sysfs" | "devpts" | "cgroup" | "cgroup2"
            )
    }
}

/// The mounted filesystems, in mount order.
pub fn mounts() -> Result<Vec<Mount>, FreezeError> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").map_err(FreezeError::MountTable)?;
    Ok(parse_mountinfo(&text))
}

/// Parses the text of /proc/self/mountinfo; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mountpoint = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let source = right.next()?;
            Some(Mount {
                source: unescape(source),
                mountpoint: PathBuf::from(unescape(mountpoint)),
                fstype: fstype.to_string(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for space) the kernel uses in mountinfo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Which filesystems to freeze: all on block devices, or those at `only`.
pub fn candidates(only: Option<&[String]>) -> Result<Vec<PathBuf>, FreezeError> {
    let all = mounts()?;
    let mut chosen: Vec<PathBuf> = Vec::new();
    match only {
        None => {
            for mount in all.iter().filter(|m| m.on_block_device()) {
                if !chosen.contains(&mount.mountpoint) {
                    chosen.push(mount.mountpoint.clone());
                }
            }
        }
        Some(list) => {
            for wanted in list {
                let path = PathBuf::from(wanted);
                if !all.iter().any(|m| m.mountpoint == path) {
                    return Err(FreezeError::NotMounted(path));
                }
                if !chosen.contains(&path) {
                    chosen.push(path);
                }
            }
        }
    }
    Ok(chosen)
}

/// Freezes `mountpoints` (in reverse order); returns those actually frozen, in mount order.
/// On a failure, every filesystem frozen so far is thawed again before the error returns.
pub fn freeze(mountpoints: &[PathBuf]) -> Result<Vec<PathBuf>, FreezeError> {
    let mut frozen = Vec::new();
    for mountpoint in mountpoints.iter().rev() {
        match ioctl(mountpoint, FIFREEZE) {
            Ok(()) => frozen.push(mountpoint.clone()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
            Err(source) => {
                frozen.reverse();
                thaw(&frozen);
                return Err(FreezeError::Freeze {
                    mountpoint: mountpoint.clone(),
                    source,
                });
            }
        }
    }
    frozen.reverse();
    Ok(frozen)
}

/// Thaws `mountpoints` in order; returns how many were thawed. A filesystem that was not
/// frozen (EINVAL) or is gone is skipped.
pub fn thaw(mountpoints: &[PathBuf]) -> usize {
    mountpoints
        .iter()
        .filter(|m| ioctl(m, FITHAW).is_ok())
        .count()
}

/// Thaws every block-device filesystem that is frozen, whoever froze it; returns the count.
pub fn thaw_all() -> Result<usize, FreezeError> {
    Ok(thaw(&candidates(None)?))
}

fn ioctl(mountpoint: &Path, request: libc::c_ulong) -> io::Result<()> {
    let dir = File::open(mountpoint)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE/FITHAW take an int argument the kernel does not write past; `dir`
    // keeps the descriptor open for the call.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, &mut arg) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "22 1 0:20 / / rw - rootfs rootfs rw\n\
                    30 22 254:0 / /mnt/my\\040disk rw,relatime - ext4 /dev/vda rw\n\
                    bogus line\n";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[1].mountpoint, PathBuf::from("/mnt/my disk"));
        assert_eq!(mounts[1].source, "/dev/vda");
        assert!(mounts[1].on_block_device());
        assert!(!mounts[0].on_block_device());
    }
}
