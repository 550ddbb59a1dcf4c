//! guest-get-osinfo, guest-get-fsinfo and guest-shutdown.

use crate::fsfreeze;
use crate::protocol::CommandError;
use serde_json::{json, Map, Value};
use std::ffi::CStr;

/// `uname` and `/etc/os-release`, in guest-get-osinfo's field names. Fields the guest does
/// not know are left out, as qga does.
pub fn osinfo() -> Value {
    let mut info = Map::new();
    // SAFETY: utsname is plain data; uname fills it and we read NUL-terminated fields.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } == 0 {
        let field = |f: &[libc::c_char]| {
            // SAFETY: the kernel NUL-terminates every utsname field within its array.
            unsafe { CStr::from_ptr(f.as_ptr()) }
                .to_string_lossy()
                .into_owned()
        };
        info.insert("kernel-release".into(), json!(field(&uts.release)));
        info.insert("kernel-version".into(), json!(field(&uts.version)));
        info.insert("machine".into(), json!(field(&uts.machine)));
    }
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim_matches('"');
        let name = match key {
            "ID" => "id",
            "NAME" => "name",
            "PRETTY_NAME" => "pretty-name",
            "VERSION" => "version",
            "VERSION_ID" => "version-id",
            "VARIANT" => "variant",
            "VARIANT_ID" => "variant-id",
            _ => continue,
        };
        info.insert(name.into(), json!(value));
    }
    Value::Object(info)
}

/// The mounted block-device filesystems with their sizes.
pub fn fsinfo() -> Result<Value, CommandError> {
    let mounts = fsfreeze::mounts().map_err(|e| CommandError::generic(e.to_string()))?;
    let list: Vec<Value> = mounts
        .iter()
        .filter(|m| m.on_block_device())
        .map(|m| {
            let name = m.source.trim_start_matches("/dev/").to_string();
            let mut entry = json!({
                "name": name,
                "mountpoint": m.mountpoint.display().to_string(),
                "type": m.fstype,
                "disk": [{"dev": m.source, "bus-type": "virtio", "bus": 0, "target": 0, "unit": 0}],
            });
            if let Some((used, total)) = usage(&m.mountpoint) {
                entry["used-bytes"] = json!(used);
                entry["total-bytes"] = json!(total);
            }
            entry
        })
        .collect();
    Ok(Value::Array(list))
}

fn usage(mountpoint: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs is plain data that the call fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is writable.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    let frsize = st.f_frsize;
    let total = st.f_blocks * frsize;
    let used = (st.f_blocks - st.f_bfree) * frsize;
    Some((used, total))
}

/// Syncs and powers off, halts or reboots. Returns only on failure.
pub fn shutdown(mode: Option<&str>) -> CommandError {
    let how = match mode.unwrap_or("powerdown") {
        "powerdown" => libc::RB_POWER_OFF,
        "halt" => libc::RB_HALT_SYSTEM,
        "reboot" => libc::RB_AUTOBOOT,
        other => return CommandError::generic(format!("Invalid parameter 'mode': {other}")),
    };
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    // SAFETY: reboot with a valid command either does not return or fails with errno.
    unsafe { libc::reboot(how) };
    CommandError::generic(format!(
        "shutdown failed: {}",
        std::io::Error::last_os_error()
    ))
}
