//! Disks and filesystems as qga describes them: guest-get-fsinfo, guest-get-disks,
//! guest-get-diskstats and guest-fstrim.
//!
//! A disk's address comes from its sysfs path, as qga reads it: the PCI function of the
//! controller (`pci-controller`, all -1 when the disk is not on PCI, such as virtio-mmio),
//! the bus type, and bus/target/unit (0 for virtio-blk). Udev is not needed: the serial is
//! read from sysfs.

use crate::fsfreeze::{self, Mount};
use crate::protocol::CommandError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The PCI drivers that end qga's walk up a disk's sysfs path: the controller.
const CONTROLLER_DRIVERS: &[&str] = &[
    "ata_piix",
    "sym53c8xx",
    "virtio-pci",
    "ahci",
    "nvme",
    "xhci_hcd",
    "ehci-pci",
];

/// A PCI address `DOMAIN:BUS:SLOT.FUNCTION` as in sysfs (`0000:00:03.0`).
fn parse_pci(component: &str) -> Option<[i64; 4]> {
    let (domain, rest) = component.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, function) = rest.split_once('.')?;
    let hex = |s: &str| i64::from_str_radix(s, 16).ok();
    Some([hex(domain)?, hex(bus)?, hex(slot)?, hex(function)?])
}

/// The `GuestDiskAddress` of the whole disk whose sysfs device path is `syspath`
/// (`/sys/devices/pci0000:00/0000:00:03.0/virtio1/block/vda`), with `dev` its device node.
pub fn disk_address(syspath: &Path, dev: &str) -> Value {
    let text = syspath.display().to_string();
    let mut pci = [-1i64; 4];
    let mut driver = String::new();
    if let Some(at) = text.find("/devices/pci") {
        let mut prefix = PathBuf::from(&text[..at + "/devices/".len()]);
        let mut components = text[at + "/devices/".len()..].split('/');
        if let Some(root) = components.next() {
            prefix.push(root);
        }
        for component in components {
            prefix.push(component);
            let Some(address) = parse_pci(component) else {
                break;
            };
            pci = address;
            driver = std::fs::read_link(prefix.join("driver"))
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            if CONTROLLER_DRIVERS.contains(&driver.as_str()) {
                break;
            }
        }
    }
    let bus_type = if driver == "virtio-pci" || (pci[0] < 0 && text.contains("/virtio")) {
        "virtio"
    } else if driver == "ahci" {
        "sata"
    } else if driver == "nvme" {
        "nvme"
    } else if driver == "ata_piix" {
        "ide"
    } else if driver == "xhci_hcd" || driver == "ehci-pci" {
        "usb"
    } else if driver == "sym53c8xx" {
        "scsi"
    } else {
        "unknown"
    };
    let mut address = json!({
        "pci-controller": {"domain": pci[0], "bus": pci[1], "slot": pci[2], "function": pci[3]},
        "bus-type": bus_type,
        "bus": 0,
        "target": 0,
        "unit": 0,
        "dev": dev,
    });
    let serial = std::fs::read_to_string(syspath.join("serial")).unwrap_or_default();
    let serial = serial.trim();
    if !serial.is_empty() {
        address["serial"] = json!(serial);
    }
    address
}

/// The sysfs device directory of a block device node's whole disk, and the disk's name.
/// `/dev/vda1` gives the directory of `vda`.
fn whole_disk(devnode: &str) -> Option<(PathBuf, String)> {
    let name = Path::new(devnode)
        .file_name()?
        .to_string_lossy()
        .into_owned();
    let class = std::fs::canonicalize(Path::new("/sys/class/block").join(&name)).ok()?;
    let disk = if class.join("partition").exists() {
        class.parent()?.to_path_buf()
    } else {
        class
    };
    let disk_name = disk.file_name()?.to_string_lossy().into_owned();
    Some((disk, disk_name))
}

/// The disks a device stands on: itself, or for device-mapper and md devices the disks
/// under its `slaves` (recursively).
fn underlying_disks(devnode: &str) -> Vec<Value> {
    let Some((disk, name)) = whole_disk(devnode) else {
        return Vec::new();
    };
    let slaves: Vec<String> = std::fs::read_dir(disk.join("slaves"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                .collect()
        })
        .unwrap_or_default();
    if slaves.is_empty() {
        return vec![disk_address(&disk, &format!("/dev/{name}"))];
    }
    slaves.iter().flat_map(|s| underlying_disks(s)).collect()
}

/// guest-get-fsinfo: the mounted block-device filesystems, their disks and sizes.
/// `total-bytes` is what an unprivileged user can use (used + available), as in qga.
pub fn fsinfo() -> Result<Value, CommandError> {
    let mounts = fsfreeze::mounts().map_err(|e| CommandError::generic(e.to_string()))?;
    let list: Vec<Value> = mounts
        .iter()
        .filter(|m| m.on_block_device())
        .map(|m| {
            let name = whole_device_name(m);
            let mut entry = json!({
                "name": name,
                "mountpoint": m.mountpoint.display().to_string(),
                "type": m.fstype,
                "disk": underlying_disks(&m.source),
            });
            if let Some(usage) = usage(&m.mountpoint) {
                entry["used-bytes"] = json!(usage.used);
                entry["total-bytes"] = json!(usage.total_unprivileged);
            }
            entry
        })
        .collect();
    Ok(Value::Array(list))
}

/// The kernel's name of a mount's device (`vda1`, `dm-0`), as qga reports it.
fn whole_device_name(mount: &Mount) -> String {
    std::fs::canonicalize(&mount.source)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| mount.source.trim_start_matches("/dev/").to_string())
}

/// A filesystem's space, in bytes.
struct Usage {
    used: u64,
    total_unprivileged: u64,
}

fn usage(mountpoint: &Path) -> Option<Usage> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is writable.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let used = st.f_blocks.saturating_sub(st.f_bfree);
    Some(Usage {
        used: used * st.f_frsize,
        total_unprivileged: (used + st.f_bavail) * st.f_frsize,
    })
}

/// guest-get-disks: every disk under /sys/block (virtual ones other than device-mapper
/// left out, as qga does) and each of its partitions.
pub fn disks() -> Result<Value, CommandError> {
    let entries = std::fs::read_dir("/sys/block")
        .map_err(|e| CommandError::generic(format!("cannot read /sys/block: {e}")))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut list = Vec::new();
    for name in names {
        let Ok(syspath) = std::fs::canonicalize(Path::new("/sys/block").join(&name)) else {
            continue;
        };
        let virtual_device = syspath.starts_with("/sys/devices/virtual");
        if virtual_device && !name.starts_with("dm-") {
            continue;
        }
        let dependencies: Vec<String> = std::fs::read_dir(syspath.join("slaves"))
            .map(|e| {
                e.filter_map(|e| e.ok())
                    .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        let dev = format!("/dev/{name}");
        let mut disk = json!({"name": dev, "partition": false, "dependencies": dependencies});
        if !virtual_device {
            disk["address"] = disk_address(&syspath, &dev);
        }
        if let Ok(alias) = std::fs::read_to_string(syspath.join("dm").join("name")) {
            disk["alias"] = json!(alias.trim());
        }
        list.push(disk);
        let mut partitions: Vec<String> = std::fs::read_dir(&syspath)
            .map(|e| {
                e.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("partition").exists())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        partitions.sort();
        for partition in partitions {
            list.push(json!({
                "name": format!("/dev/{partition}"),
                "partition": true,
                "dependencies": [dev],
            }));
        }
    }
    Ok(Value::Array(list))
}

/// The names of /proc/diskstats' counters after the device name, in order (kernel 5.5+
/// has all 17).
const DISKSTATS_FIELDS: [&str; 17] = [
    "read-ios",
    "read-merges",
    "read-sectors",
    "read-ticks",
    "write-ios",
    "write-merges",
    "write-sectors",
    "write-ticks",
    "ios-pgr",
    "total-ticks",
    "weight-ticks",
    "discard-ios",
    "discard-merges",
    "discard-sectors",
    "discard-ticks",
    "flush-ios",
    "flush-ticks",
];

/// guest-get-diskstats from /proc/diskstats.
pub fn diskstats() -> Result<Value, CommandError> {
    let text = std::fs::read_to_string("/proc/diskstats")
        .map_err(|e| CommandError::generic(format!("cannot read /proc/diskstats: {e}")))?;
    Ok(Value::Array(parse_diskstats(&text)))
}

/// Parses /proc/diskstats text; malformed lines are skipped.
pub fn parse_diskstats(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let major: u64 = fields.first()?.parse().ok()?;
            let minor: u64 = fields.get(1)?.parse().ok()?;
            let name = fields.get(2)?;
            let mut stats = serde_json::Map::new();
            for (key, value) in DISKSTATS_FIELDS.iter().zip(&fields[3..]) {
                stats.insert((*key).into(), json!(value.parse::<u64>().ok()?));
            }
            Some(json!({"name": name, "major": major, "minor": minor, "stats": stats}))
        })
        .collect()
}

/// Arguments of guest-fstrim.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FstrimArgs {
    /// Smallest free range worth discarding, in bytes.
    #[serde(default)]
    pub minimum: Option<u64>,
}

/// `struct fstrim_range` of FITRIM.
#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

/// `_IOWR('X', 121, struct fstrim_range)`.
const FITRIM: libc::c_ulong = 0xc018_5879;

/// guest-fstrim: FITRIM on every mounted block-device filesystem; each gets a result.
pub fn fstrim(args: FstrimArgs) -> Result<Value, CommandError> {
    use std::os::unix::io::AsRawFd;
    let mounts = fsfreeze::mounts().map_err(|e| CommandError::generic(e.to_string()))?;
    let mut paths = Vec::new();
    let mut seen: Vec<&Path> = Vec::new();
    for mount in mounts.iter().filter(|m| m.on_block_device()) {
        if seen.contains(&mount.mountpoint.as_path()) {
            continue;
        }
        seen.push(&mount.mountpoint);
        let path = mount.mountpoint.display().to_string();
        let mut range = FstrimRange {
            start: 0,
            len: u64::MAX,
            minlen: args.minimum.unwrap_or(0),
        };
        let result = std::fs::File::open(&mount.mountpoint).and_then(|dir| {
            // SAFETY: FITRIM reads and updates the fstrim_range we pass; `dir` keeps the
            // descriptor open for the call.
            let rc = unsafe { libc::ioctl(dir.as_raw_fd(), FITRIM, &mut range) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        paths.push(match result {
            Ok(()) => json!({"path": path, "trimmed": range.len, "minimum": range.minlen}),
            Err(e) => json!({"path": path, "error": e.to_string()}),
        });
    }
    Ok(json!({ "paths": paths }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_virtio_mmio_disk_has_no_pci_controller() {
        let address = disk_address(
            Path::new("/sys/devices/platform/LNRO0005:00/virtio0/block/vda"),
            "/dev/vda",
        );
        assert_eq!(
            address["pci-controller"],
            json!({"domain": -1, "bus": -1, "slot": -1, "function": -1})
        );
        assert_eq!(address["bus-type"], "virtio");
        assert_eq!(address["dev"], "/dev/vda");
    }

    #[test]
    fn pci_addresses_parse_from_sysfs_names() {
        assert_eq!(parse_pci("0000:00:1f.2"), Some([0, 0, 0x1f, 2]));
        assert_eq!(parse_pci("virtio1"), None);
        let address = disk_address(
            Path::new("/sys/devices/pci0000:00/0000:00:03.0/virtio1/block/vda"),
            "/dev/vda",
        );
        assert_eq!(
            address["pci-controller"],
            json!({"domain": 0, "bus": 0, "slot": 3, "function": 0})
        );
    }

    #[test]
    fn diskstats_lines_parse_with_every_counter_the_kernel_has() {
        let text = " 254       0 vda 120 3 4000 50 7 0 56 9 0 80 60 0 0 0 0 2 1\n\
                    7 0 loop0 1 2 3\n";
        let stats = parse_diskstats(text);
        assert_eq!(stats[0]["name"], "vda");
        assert_eq!(stats[0]["major"], 254);
        assert_eq!(stats[0]["stats"]["read-sectors"], 4000);
        assert_eq!(stats[0]["stats"]["flush-ticks"], 1);
        assert_eq!(stats[1]["stats"].as_object().unwrap().len(), 3);
    }
}
