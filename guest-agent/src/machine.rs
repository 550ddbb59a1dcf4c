//! Processors and memory: guest-get-vcpus / guest-set-vcpus, guest-get-memory-blocks /
//! guest-set-memory-blocks / guest-get-memory-block-info, and guest-get-cpustats, read
//! from and written to sysfs and /proc as qga does.

use crate::protocol::CommandError;
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";

/// The numbered entries `PREFIXN` of a sysfs directory, sorted by number.
fn numbered(dir: &Path, prefix: &str) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix(prefix)?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// guest-get-vcpus: each logical processor, online or not, and whether it can go offline
/// (a processor without an `online` file, such as cpu0, cannot).
pub fn vcpus() -> Result<Value, CommandError> {
    let cpus = numbered(Path::new(CPU_DIR), "cpu");
    if cpus.is_empty() {
        return Err(CommandError::generic(format!("cannot read {CPU_DIR}")));
    }
    Ok(Value::Array(
        cpus.into_iter()
            .map(|(id, path)| {
                let online = read_trimmed(&path.join("online"));
                json!({
                    "logical-id": id,
                    "online": online.as_deref() != Some("0"),
                    "can-offline": online.is_some(),
                })
            })
            .collect(),
    ))
}

/// One entry of guest-set-vcpus.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LogicalProcessor {
    /// The processor's number.
    pub logical_id: u64,
    /// The state wanted.
    pub online: bool,
    /// Ignored on input.
    #[serde(default)]
    pub can_offline: Option<bool>,
}

/// Arguments of guest-set-vcpus.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetVcpusArgs {
    /// Processed in order.
    pub vcpus: Vec<LogicalProcessor>,
}

/// guest-set-vcpus: applies entries in order; returns how many succeeded, or the first
/// entry's error when none did.
pub fn set_vcpus(args: SetVcpusArgs) -> Result<Value, CommandError> {
    let mut done = 0usize;
    for cpu in &args.vcpus {
        let online_file = Path::new(CPU_DIR)
            .join(format!("cpu{}", cpu.logical_id))
            .join("online");
        let result = if !online_file.parent().is_some_and(Path::exists) {
            Err(format!("logical processor #{} not found", cpu.logical_id))
        } else if !online_file.exists() {
            if cpu.online {
                Ok(())
            } else {
                Err(format!(
                    "logical processor #{} can't be offlined",
                    cpu.logical_id
                ))
            }
        } else {
            std::fs::write(&online_file, if cpu.online { "1" } else { "0" }).map_err(|e| {
                format!(
                    "cannot set logical processor #{} online state: {e}",
                    cpu.logical_id
                )
            })
        };
        match result {
            Ok(()) => done += 1,
            Err(e) if done == 0 => return Err(CommandError::generic(e)),
            Err(_) => break,
        }
    }
    Ok(json!(done))
}

/// guest-get-memory-blocks: each hot-pluggable memory block and its state.
pub fn memory_blocks() -> Result<Value, CommandError> {
    let blocks = numbered(Path::new(MEMORY_DIR), "memory");
    if blocks.is_empty() && !Path::new(MEMORY_DIR).exists() {
        return Err(CommandError::generic(format!(
            "cannot read {MEMORY_DIR}: memory hotplug is not supported"
        )));
    }
    Ok(Value::Array(
        blocks
            .into_iter()
            .map(|(index, path)| {
                let state = read_trimmed(&path.join("state")).unwrap_or_default();
                let removable = read_trimmed(&path.join("removable"));
                json!({
                    "phys-index": index,
                    "online": state != "offline",
                    "can-offline": removable.as_deref() == Some("1"),
                })
            })
            .collect(),
    ))
}

/// One entry of guest-set-memory-blocks.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MemoryBlock {
    /// The block's number.
    pub phys_index: u64,
    /// The state wanted.
    pub online: bool,
    /// Ignored on input.
    #[serde(default)]
    pub can_offline: Option<bool>,
}

/// Arguments of guest-set-memory-blocks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SetMemoryBlocksArgs {
    /// Processed in order.
    pub mem_blks: Vec<MemoryBlock>,
}

/// guest-set-memory-blocks: one response per entry.
pub fn set_memory_blocks(args: SetMemoryBlocksArgs) -> Value {
    Value::Array(
        args.mem_blks
            .iter()
            .map(|block| {
                let dir = Path::new(MEMORY_DIR).join(format!("memory{}", block.phys_index));
                let wanted = if block.online { "online" } else { "offline" };
                if !dir.exists() {
                    return json!({"phys-index": block.phys_index, "response": "not-found"});
                }
                if read_trimmed(&dir.join("state")).as_deref() == Some(wanted) {
                    return json!({"phys-index": block.phys_index, "response": "success"});
                }
                match std::fs::write(dir.join("state"), wanted) {
                    Ok(()) => json!({"phys-index": block.phys_index, "response": "success"}),
                    Err(e) => json!({
                        "phys-index": block.phys_index,
                        "response": "operation-failed",
                        "error-code": e.raw_os_error().unwrap_or(0),
                    }),
                }
            })
            .collect(),
    )
}

/// guest-get-memory-block-info: the size of one memory block, in bytes.
pub fn memory_block_info() -> Result<Value, CommandError> {
    let text = read_trimmed(&Path::new(MEMORY_DIR).join("block_size_bytes")).ok_or_else(|| {
        CommandError::generic(format!(
            "cannot read {MEMORY_DIR}/block_size_bytes: memory hotplug is not supported"
        ))
    })?;
    let size = u64::from_str_radix(&text, 16)
        .map_err(|e| CommandError::generic(format!("malformed block_size_bytes '{text}': {e}")))?;
    Ok(json!({ "size": size }))
}

/// The names of /proc/stat's per-CPU counters, in order.
const CPUSTAT_FIELDS: [&str; 10] = [
    "user",
    "nice",
    "system",
    "idle",
    "iowait",
    "irq",
    "softirq",
    "steal",
    "guest",
    "guestnice",
];

/// guest-get-cpustats: each CPU's times from /proc/stat, in milliseconds.
pub fn cpustats() -> Result<Value, CommandError> {
    let text = std::fs::read_to_string("/proc/stat")
        .map_err(|e| CommandError::generic(format!("cannot read /proc/stat: {e}")))?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(Value::Array(parse_cpustats(&text, ticks.max(1) as u64)))
}

/// Parses /proc/stat's `cpuN` lines (not the `cpu` total) into qga's `GuestCpuStats`.
pub fn parse_cpustats(text: &str, ticks_per_second: u64) -> Vec<Value> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let cpu: i64 = fields.next()?.strip_prefix("cpu")?.parse().ok()?;
            let mut entry = json!({"type": "linux", "cpu": cpu});
            for (key, value) in CPUSTAT_FIELDS.iter().zip(fields) {
                let ticks: u64 = value.parse().ok()?;
                entry[*key] = json!(ticks * 1000 / ticks_per_second);
            }
            Some(entry)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpustats_are_per_cpu_in_milliseconds() {
        let text = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 1 2 300 4 0 0 0 0 0\nintr 5\n";
        let stats = parse_cpustats(text, 100);
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0]["cpu"], 0);
        assert_eq!(stats[0]["user"], 50);
        assert_eq!(stats[0]["idle"], 3000);
        assert_eq!(stats[0]["type"], "linux");
    }

    #[test]
    fn this_machine_has_a_processor_online() {
        let cpus = vcpus().unwrap();
        assert!(cpus.as_array().unwrap().iter().any(|c| c["online"] == true));
        assert_eq!(
            set_vcpus(SetVcpusArgs { vcpus: Vec::new() }).unwrap(),
            json!(0)
        );
    }
}
