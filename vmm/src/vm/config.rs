//! What a VM is made of: the `sealvm run` options, or the same in a TOML file.

use super::devices::serial::SerialTarget;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DiskConfig {
    /// A raw image served by sealvm's own virtio-blk.
    Raw {
        /// The image file.
        path: PathBuf,
        /// Refuse writes.
        readonly: bool,
    },
    /// A vhost-user-blk backend.
    VhostUser {
        /// The backend's socket.
        socket: PathBuf,
    },
}

impl TryFrom<String> for DiskConfig {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<DiskConfig> for String {
    fn from(disk: DiskConfig) -> String {
        match disk {
            DiskConfig::Raw { path, readonly } => format!(
                "path={}{}",
                path.display(),
                if readonly { ",readonly" } else { "" }
            ),
            DiskConfig::VhostUser { socket } => format!("vhost-user={}", socket.display()),
        }
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = String;
    /// `path=IMG[,readonly]` or `vhost-user=SOCKET`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let first = parts.next().unwrap_or_default();
        let rest: Vec<&str> = parts.collect();
        if let Some(socket) = first.strip_prefix("vhost-user=") {
            if let Some(extra) = rest.first() {
                return Err(format!("unknown option {extra:?} for a vhost-user disk"));
            }
            return Ok(DiskConfig::VhostUser {
                socket: socket.into(),
            });
        }
        let Some(path) = first.strip_prefix("path=") else {
            return Err(format!(
                "bad disk {s:?}: use path=IMAGE[,readonly] or vhost-user=SOCKET"
            ));
        };
        let mut readonly = false;
        for option in rest {
            match option {
                "readonly" | "readonly=on" | "ro" => readonly = true,
                "readonly=off" => readonly = false,
                other => return Err(format!("unknown disk option {other:?} in {s:?}")),
            }
        }
        Ok(DiskConfig::Raw {
            path: path.into(),
            readonly,
        })
    }
}

/// A VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel: bzImage, ELF vmlinux, or an ELF with a PVH note.
    pub kernel: PathBuf,
    /// Initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line (sealvm appends `sealvm.mmio=...`, its device map).
    #[serde(default)]
    pub cmdline: String,
    /// vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u8,
    /// Memory in bytes.
    #[serde(default = "default_memory")]
    pub memory: u64,
    /// Disks, in order.
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// COM1.
    #[serde(default = "default_serial")]
    pub serial: SerialTarget,
    /// The virtio-console port's unix socket.
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
    /// The API socket.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
}

fn default_cpus() -> u8 {
    1
}

fn default_memory() -> u64 {
    512 << 20
}

fn default_serial() -> SerialTarget {
    SerialTarget::Stdout
}

/// Most vCPUs (one MADT entry and APIC id each, below the IOAPIC's id space).
pub const MAX_CPUS: u8 = 32;

/// A configuration that cannot run.
#[derive(Debug, thiserror::Error)]
#[error("invalid VM configuration: {0}")]
pub struct ConfigError(pub String);

impl VmConfig {
    /// Checks what can be checked before touching KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return Err(ConfigError(format!(
                "--cpus {} is outside 1..={MAX_CPUS}",
                self.cpus
            )));
        }
        let devices = self.disks.len() + usize::from(self.console_socket.is_some());
        if devices > super::layout::MAX_VIRTIO_DEVICES {
            return Err(ConfigError(format!(
                "{devices} virtio devices; at most {} fit",
                super::layout::MAX_VIRTIO_DEVICES
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_like_cloud_hypervisor() {
        assert_eq!(
            "path=/a.img,readonly".parse::<DiskConfig>().unwrap(),
            DiskConfig::Raw {
                path: "/a.img".into(),
                readonly: true
            }
        );
        assert_eq!(
            "vhost-user=/s.sock".parse::<DiskConfig>().unwrap(),
            DiskConfig::VhostUser {
                socket: "/s.sock".into()
            }
        );
        assert!("/a.img".parse::<DiskConfig>().is_err());
        assert!("path=/a.img,direct".parse::<DiskConfig>().is_err());
    }

    #[test]
    fn toml_config_reads_and_rejects_unknown_keys() {
        let config: VmConfig = toml::from_str(
            r#"
            kernel = "/k"
            cpus = 2
            memory = 268435456
            cmdline = "console=ttyS0"
            disks = [ "path=/d.img,readonly", "vhost-user=/s" ]
            serial = "file=/tmp/console.log"
            "#,
        )
        .unwrap();
        assert_eq!(config.cpus, 2);
        assert_eq!(config.disks.len(), 2);
        assert!(toml::from_str::<VmConfig>("kernel = \"/k\"\nmemroy = 1").is_err());
    }
}
