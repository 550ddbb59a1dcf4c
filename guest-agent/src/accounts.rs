//! Accounts: guest-set-user-password (through the guest's `chpasswd`, as qga does) and the
//! guest-ssh-*-authorized-keys commands on `~USER/.ssh/authorized_keys`.
//!
//! Users are looked up in /etc/passwd directly: the agent is linked statically, and a
//! static binary cannot load NSS modules.

use crate::protocol::CommandError;
use crate::system::find_program;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::Write;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Arguments of guest-set-user-password.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPasswordArgs {
    /// The account.
    pub username: String,
    /// The password (or crypt() hash when `crypted`), base64.
    pub password: String,
    /// The password is already a crypt() hash.
    pub crypted: bool,
}

/// guest-set-user-password: feeds `USER:PASSWORD` to `chpasswd` (`-e` for a hash).
pub fn set_user_password(args: SetPasswordArgs) -> Result<Value, CommandError> {
    let raw = BASE64
        .decode(&args.password)
        .map_err(|e| CommandError::generic(format!("password is not base64: {e}")))?;
    if raw.contains(&b'\n') || raw.contains(&0) {
        return Err(CommandError::generic(
            "forbidden characters in raw password",
        ));
    }
    if args.username.contains(['\n', ':']) {
        return Err(CommandError::generic("forbidden characters in username"));
    }
    let chpasswd = find_program("chpasswd")
        .ok_or_else(|| CommandError::generic("cannot find 'chpasswd' program in PATH"))?;
    let mut command = Command::new(chpasswd);
    if args.crypted {
        command.arg("-e");
    }
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| CommandError::generic(format!("failed to run chpasswd: {e}")))?;
    let mut line = format!("{}:", args.username).into_bytes();
    line.extend(&raw);
    line.push(b'\n');
    if let Some(mut stdin) = child.stdin.take() {
        // A failed write shows as chpasswd's failure below.
        let _ = stdin.write_all(&line);
    }
    let status = child
        .wait()
        .map_err(|e| CommandError::generic(format!("failed to wait for chpasswd: {e}")))?;
    if !status.success() {
        return Err(CommandError::generic(
            "child process has failed to set user password",
        ));
    }
    Ok(json!({}))
}

/// An account from /etc/passwd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Numeric user id.
    pub uid: u32,
    /// Numeric group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// Looks `username` up in passwd(5) text.
pub fn find_account(passwd: &str, username: &str) -> Option<Account> {
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != username {
            return None;
        }
        Some(Account {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: PathBuf::from(fields[5]),
        })
    })
}

fn account(username: &str) -> Result<Account, CommandError> {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    find_account(&passwd, username).ok_or_else(|| {
        CommandError::generic(format!("failed to get passwd entry for user '{username}'"))
    })
}

/// Arguments of guest-ssh-get-authorized-keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetKeysArgs {
    /// The account.
    pub username: String,
}

/// Arguments of guest-ssh-add-authorized-keys and guest-ssh-remove-authorized-keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysArgs {
    /// The account.
    pub username: String,
    /// Keys in authorized_keys format.
    pub keys: Vec<String>,
    /// Replace the file's keys instead of adding (add only).
    #[serde(default)]
    pub reset: Option<bool>,
}

fn keys_path(account: &Account) -> PathBuf {
    account.home.join(".ssh").join("authorized_keys")
}

/// The key lines of an authorized_keys text (comments and blank lines left out).
fn key_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

fn check_keys(keys: &[String]) -> Result<(), CommandError> {
    for key in keys {
        if key.trim().is_empty() || key.contains(['\n', '\r']) {
            return Err(CommandError::generic(format!(
                "invalid OpenSSH public key: '{key}'"
            )));
        }
    }
    Ok(())
}

/// guest-ssh-get-authorized-keys.
pub fn get_authorized_keys(args: GetKeysArgs) -> Result<Value, CommandError> {
    let account = account(&args.username)?;
    let path = keys_path(&account);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| CommandError::generic(format!("failed to read '{}': {e}", path.display())))?;
    Ok(json!({ "keys": key_lines(&text) }))
}

/// guest-ssh-add-authorized-keys: appends the keys not already there (or, with `reset`,
/// writes only these), creating `~/.ssh` (0700) and the file (0600) owned by the user.
pub fn add_authorized_keys(args: KeysArgs) -> Result<Value, CommandError> {
    check_keys(&args.keys)?;
    let account = account(&args.username)?;
    let path = keys_path(&account);
    let mut keys = if args.reset.unwrap_or(false) {
        Vec::new()
    } else {
        key_lines(&std::fs::read_to_string(&path).unwrap_or_default())
    };
    for key in &args.keys {
        if !keys.contains(key) {
            keys.push(key.clone());
        }
    }
    write_keys(&account, &path, &keys)?;
    Ok(json!({}))
}

/// guest-ssh-remove-authorized-keys: a key already missing is not an error.
pub fn remove_authorized_keys(args: KeysArgs) -> Result<Value, CommandError> {
    check_keys(&args.keys)?;
    let account = account(&args.username)?;
    let path = keys_path(&account);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(json!({}));
    };
    let keys: Vec<String> = key_lines(&text)
        .into_iter()
        .filter(|k| !args.keys.contains(k))
        .collect();
    write_keys(&account, &path, &keys)?;
    Ok(json!({}))
}

fn write_keys(
    account: &Account,
    path: &std::path::Path,
    keys: &[String],
) -> Result<(), CommandError> {
    let fail = |what: &str, e: std::io::Error| {
        CommandError::generic(format!("failed to {what} '{}': {e}", path.display()))
    };
    let dir = path.parent().unwrap_or(path);
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| fail("create the directory of", e))?;
        std::os::unix::fs::chown(dir, Some(account.uid), Some(account.gid))
            .map_err(|e| fail("chown the directory of", e))?;
    }
    let mut text = keys.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    // Written beside the old file and renamed over it, owned by the account before it
    // appears, so sshd never reads a half-written or root-owned file.
    sealvm_os::durable::replace_stream(path, 0o600, |file| {
        file.write_all(text.as_bytes())?;
        std::os::unix::fs::fchown(&*file, Some(account.uid), Some(account.gid))
    })
    .map_err(|e| {
        CommandError::generic(format!(
            "failed to replace '{}' ({:?} failed): {}",
            path.display(),
            e.step,
            e.source
        ))
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwd_lines_give_the_account() {
        let passwd = "root:x:0:0:root:/root:/bin/sh\nbroken\napp:x:1000:1001::/home/app:/bin/sh\n";
        assert_eq!(
            find_account(passwd, "app"),
            Some(Account {
                uid: 1000,
                gid: 1001,
                home: "/home/app".into()
            })
        );
        assert_eq!(find_account(passwd, "nobody"), None);
    }

    /// This process's own account, with its home in `home`.
    fn own_account(home: &std::path::Path) -> Account {
        // SAFETY: getuid/getgid only read the process's ids.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Account {
            uid,
            gid,
            home: home.to_path_buf(),
        }
    }

    #[test]
    fn authorized_keys_are_added_once_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let account = own_account(dir.path());
        let path = keys_path(&account);
        write_keys(&account, &path, &["ssh-ed25519 AAAA one".into()]).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            key_lines(&format!("# c\n{text}\n")),
            ["ssh-ed25519 AAAA one"]
        );
        assert!(check_keys(&["a\nb".into()]).is_err());
    }

    /// A directory fsync cannot be made to fail for real, so this arms the failpoint seam
    /// of `sealvm_os::durable` (feature `failpoints`, on for this crate's tests).
    #[test]
    fn a_failed_directory_sync_of_authorized_keys_is_an_error() {
        use sealvm_os::durable::{failpoint, Step};
        let dir = tempfile::tempdir().unwrap();
        let account = own_account(dir.path());
        let path = keys_path(&account);
        failpoint::fail_next(Step::SyncDir);
        let result = write_keys(&account, &path, &["ssh-ed25519 AAAA one".into()]);
        failpoint::clear();
        let error = result.expect_err("a lost directory sync was reported as success");
        assert!(format!("{error:?}").contains("SyncDir failed"), "{error:?}");
    }
}
