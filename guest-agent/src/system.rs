//! What the guest says about itself: guest-get-osinfo, -host-name, -timezone, -users, and
//! guest-get-time / guest-set-time.

use crate::protocol::CommandError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::ffi::CStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

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

/// guest-get-host-name: `{"host-name": ...}` from gethostname(2).
pub fn host_name() -> Result<Value, CommandError> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        return Err(CommandError::generic(format!(
            "cannot get the host name: {}",
            std::io::Error::last_os_error()
        )));
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(json!({"host-name": String::from_utf8_lossy(&buf[..end])}))
}

/// guest-get-timezone: the local zone's abbreviation and its offset east of UTC, seconds.
pub fn timezone() -> Value {
    let now: libc::time_t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as libc::time_t);
    // SAFETY: tm is plain data that localtime_r fills.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `now` and writes `tm` (it loads the zone itself).
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    let mut answer = json!({"offset": if ok { tm.tm_gmtoff } else { 0 }});
    if ok && !tm.tm_zone.is_null() {
        // SAFETY: localtime_r points tm_zone at a NUL-terminated name that lives as long
        // as the process's time zone data.
        let zone = unsafe { CStr::from_ptr(tm.tm_zone) }.to_string_lossy();
        answer["zone"] = json!(zone);
    }
    answer
}

/// Where login records are kept (utmp(5)).
pub const UTMP_PATH: &str = "/var/run/utmp";

/// guest-get-users: each logged-in user once, with the earliest login time in fractional
/// seconds since the epoch, read from the utmp file. No utmp file means nobody is logged in.
pub fn users() -> Value {
    let records = std::fs::read(UTMP_PATH).unwrap_or_default();
    Value::Array(parse_utmp(&records))
}

/// The size of one `struct utmp` record on Linux x86_64 and most 64-bit ABIs.
const UTMP_RECORD: usize = 384;
/// `ut_type` of a login session.
const USER_PROCESS: i16 = 7;

/// The users of the USER_PROCESS records in utmp bytes, each once with its earliest login.
pub fn parse_utmp(bytes: &[u8]) -> Vec<Value> {
    let mut users: Vec<(String, f64)> = Vec::new();
    for record in bytes.chunks_exact(UTMP_RECORD) {
        let kind = i16::from_le_bytes([record[0], record[1]]);
        if kind != USER_PROCESS {
            continue;
        }
        let name = &record[44..76];
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        let user = String::from_utf8_lossy(&name[..end]).into_owned();
        let field = |at: usize| {
            i32::from_le_bytes([record[at], record[at + 1], record[at + 2], record[at + 3]])
        };
        let login = f64::from(field(340)) + f64::from(field(344)) / 1e6;
        match users.iter_mut().find(|(u, _)| *u == user) {
            Some((_, earliest)) => *earliest = earliest.min(login),
            None => users.push((user, login)),
        }
    }
    users
        .into_iter()
        .map(|(user, login)| json!({"user": user, "login-time": login}))
        .collect()
}

/// guest-get-time: nanoseconds since the epoch.
pub fn time() -> Result<Value, CommandError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| CommandError::generic(format!("Failed to get time: {e}")))?;
    Ok(json!(now.as_nanos() as i64))
}

/// Arguments of guest-set-time.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetTimeArgs {
    /// Nanoseconds since the epoch; absent means "from the hardware clock".
    #[serde(default)]
    pub time: Option<i64>,
}

/// guest-set-time, as qga does it: with a time, set the system clock and then the hardware
/// clock from it (`hwclock -w`); without, set the system clock from the hardware clock
/// (`hwclock -s`).
pub fn set_time(args: SetTimeArgs) -> Result<Value, CommandError> {
    if let Some(ns) = args.time {
        let secs = ns.div_euclid(1_000_000_000);
        // qga accepts years 1970 to 2069.
        const YEAR_2070: i64 = 3_155_760_000;
        if !(0..YEAR_2070).contains(&secs) {
            return Err(CommandError::generic("Invalid time"));
        }
        let tv = libc::timeval {
            tv_sec: secs as libc::time_t,
            tv_usec: (ns.rem_euclid(1_000_000_000) / 1000) as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval; a null timezone is allowed.
        if unsafe { libc::settimeofday(&tv, std::ptr::null()) } != 0 {
            return Err(CommandError::generic(format!(
                "Failed to set time to guest: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    let hwclock = find_program("hwclock")
        .ok_or_else(|| CommandError::generic("cannot find 'hwclock' to sync the hardware clock"))?;
    let flag = if args.time.is_some() { "-w" } else { "-s" };
    let status = Command::new(&hwclock)
        .arg(flag)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| CommandError::generic(format!("failed to run hwclock: {e}")))?;
    if !status.success() {
        return Err(CommandError::generic(
            "hwclock failed to set hardware clock to system time",
        ));
    }
    Ok(json!({}))
}

/// The directories searched for the system programs the agent runs (shutdown, hwclock,
/// chpasswd): the usual sbin places first, as qga's fixed paths are, then the rest.
const PROGRAM_DIRS: &[&str] = &["/sbin", "/usr/sbin", "/bin", "/usr/bin"];

/// The first executable `name` in [`PROGRAM_DIRS`].
pub fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    PROGRAM_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| {
            path.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: i16, user: &str, sec: i32, usec: i32) -> Vec<u8> {
        let mut r = vec![0u8; UTMP_RECORD];
        r[..2].copy_from_slice(&kind.to_le_bytes());
        r[44..44 + user.len()].copy_from_slice(user.as_bytes());
        r[340..344].copy_from_slice(&sec.to_le_bytes());
        r[344..348].copy_from_slice(&usec.to_le_bytes());
        r
    }

    #[test]
    fn utmp_users_are_listed_once_with_their_earliest_login() {
        let mut bytes = record(USER_PROCESS, "alice", 200, 500_000);
        bytes.extend(record(USER_PROCESS, "alice", 100, 0));
        bytes.extend(record(8, "gone", 50, 0));
        bytes.extend(record(USER_PROCESS, "bob", 300, 0));
        bytes.extend([1, 2, 3]);
        assert_eq!(
            parse_utmp(&bytes),
            vec![
                json!({"user": "alice", "login-time": 100.0}),
                json!({"user": "bob", "login-time": 300.0})
            ]
        );
    }

    #[test]
    fn host_name_time_and_timezone_answer() {
        assert!(host_name().unwrap()["host-name"].is_string());
        assert!(time().unwrap().as_i64().unwrap() > 1_600_000_000_000_000_000);
        assert!(timezone()["offset"].is_i64());
        let refused = set_time(SetTimeArgs {
            time: Some(-5_000_000_000),
        });
        assert_eq!(refused.unwrap_err().desc, "Invalid time");
    }
}
