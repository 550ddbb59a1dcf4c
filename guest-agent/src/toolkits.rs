//! Application toolkits: what makes a snapshot application-consistent rather than merely
//! crash-consistent. A toolkit has detect rules (a running process, a listening socket, a
//! file), a quiesce script run before the filesystems freeze, and a resume script run after
//! they thaw. Scripts run as the application's own OS user when the toolkit names one (the
//! built-in PostgreSQL toolkit runs as `postgres`, which Debian's default `peer`
//! authentication requires), as `runuser -u USER --` would run them.
//!
//! Built-in toolkits cover PostgreSQL, MySQL/MariaDB, SQLite, Redis and MongoDB. User
//! toolkits live in `/etc/sealvm-agent/toolkits.d/NAME/` as three files: `detect` (one rule a
//! line: `process NAME`, `socket PORT`, `socket /PATH`, `file /PATH`; `#` starts a comment;
//! any matching rule detects), and executable `quiesce` and `resume` scripts, and optionally
//! a `user` file naming the OS user the scripts run as. A user toolkit with the same name as
//! a built-in replaces it.

use serde::Serialize;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where user toolkits live.
pub const USER_TOOLKITS_DIR: &str = "/etc/sealvm-agent/toolkits.d";

/// How long a quiesce or resume script may run before it is killed and counted as failed.
pub const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The most script output kept for an answer.
const OUTPUT_LIMIT: usize = 4096;

/// One way to tell an application runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum DetectRule {
    /// A live process (not a zombie) with this command name (`/proc/PID/comm`).
    Process(String),
    /// A listening TCP port.
    Port(u16),
    /// A unix socket at this path.
    Socket(PathBuf),
    /// A file or directory at this path.
    File(PathBuf),
}

impl DetectRule {
    /// Parses one line of a `detect` file.
    pub fn parse(line: &str) -> Option<DetectRule> {
        let (kind, value) = line.trim().split_once(char::is_whitespace)?;
        let value = value.trim();
        match kind {
            "process" => Some(DetectRule::Process(value.to_string())),
            "socket" if value.starts_with('/') => Some(DetectRule::Socket(value.into())),
            "socket" => value.parse().ok().map(DetectRule::Port),
            "file" => Some(DetectRule::File(value.into())),
            _ => None,
        }
    }

    /// True when the rule matches `system`.
    pub fn matches(&self, system: &SystemView) -> bool {
        match self {
            DetectRule::Process(name) => system.processes.contains(name),
            DetectRule::Port(port) => system.listening_ports.contains(port),
            DetectRule::Socket(path) => system
                .unix_sockets
                .contains(path.to_string_lossy().as_ref()),
            DetectRule::File(path) => path.exists(),
        }
    }
}

/// What detect rules look at, read once per freeze (the freeze waits for it): running
/// process names, listening TCP ports and bound unix sockets.
#[derive(Debug, Default)]
pub struct SystemView {
    processes: HashSet<String>,
    listening_ports: HashSet<u16>,
    unix_sockets: HashSet<String>,
}

impl SystemView {
    /// Reads /proc now.
    pub fn read() -> Self {
        let processes = std::fs::read_dir("/proc")
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .bytes()
                            .all(|b| b.is_ascii_digit())
                    })
                    // A zombie is an application that is gone: it has nothing to quiesce.
                    .filter(|e| {
                        std::fs::read_to_string(e.path().join("stat"))
                            .is_ok_and(|stat| !is_zombie_stat(&stat))
                    })
                    .filter_map(|e| std::fs::read_to_string(e.path().join("comm")).ok())
                    .map(|comm| comm.trim().to_string())
                    .collect()
            })
            .unwrap_or_default();
        let listening_ports = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|table| std::fs::read_to_string(table).ok())
            .flat_map(|text| listening_ports(&text))
            .collect();
        let unix_sockets = std::fs::read_to_string("/proc/net/unix")
            .map(|text| {
                text.lines()
                    .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        SystemView {
            processes,
            listening_ports,
            unix_sockets,
        }
    }
}

/// True when a /proc/PID/stat line says the process is a zombie (or dead): the state is
/// the field after the parenthesised command name, which may itself hold spaces and `)`.
pub fn is_zombie_stat(stat: &str) -> bool {
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state == "Z" || state == "X")
}

/// A script a toolkit runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Script {
    /// Shell text run with `/bin/sh -c`.
    Inline(String),
    /// An executable file.
    File(PathBuf),
}

/// An application toolkit.
#[derive(Debug, Clone, Serialize)]
pub struct Toolkit {
    /// Its name, such as `postgresql`.
    pub name: String,
    /// `builtin` or the directory it was read from.
    pub source: String,
    /// Any matching rule detects the application.
    pub detect: Vec<DetectRule>,
    /// Run before the freeze.
    pub quiesce: Script,
    /// Run after the thaw.
    pub resume: Script,
    /// The OS user the scripts run as (root, the agent's own user, when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// A script that failed, for the freeze's error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("toolkit {toolkit}: {phase} script {outcome}; output: {output}")]
pub struct ScriptFailure {
    /// The toolkit.
    pub toolkit: String,
    /// `quiesce` or `resume`.
    pub phase: &'static str,
    /// `exited with status N`, `timed out after N s` or `could not start: ...`.
    pub outcome: String,
    /// What it printed (stdout and stderr), cut to a few KiB.
    pub output: String,
}

impl Toolkit {
    /// True when any detect rule matches `system`.
    pub fn detected(&self, system: &SystemView) -> bool {
        self.detect.iter().any(|rule| rule.matches(system))
    }

    /// Runs the quiesce script.
    pub fn quiesce(&self, timeout: Duration) -> Result<(), ScriptFailure> {
        run_script(
            &self.name,
            "quiesce",
            &self.quiesce,
            self.user.as_deref(),
            timeout,
        )
    }

    /// Runs the resume script.
    pub fn resume(&self, timeout: Duration) -> Result<(), ScriptFailure> {
        run_script(
            &self.name,
            "resume",
            &self.resume,
            self.user.as_deref(),
            timeout,
        )
    }
}

/// The built-in toolkits.
pub fn builtin() -> Vec<Toolkit> {
    let inline = |s: &str| Script::Inline(s.to_string());
    let toolkit = |name: &str, detect: Vec<DetectRule>, quiesce: &str, resume: &str| Toolkit {
        name: name.into(),
        source: "builtin".into(),
        detect,
        quiesce: inline(quiesce),
        resume: inline(resume),
        user: None,
    };
    vec![
        Toolkit {
            // As the postgres OS user: Debian's default `local all postgres peer` refuses
            // root.
            user: Some("postgres".into()),
            ..toolkit(
                "postgresql",
                vec![DetectRule::Process("postgres".into()), DetectRule::Port(5432)],
                // A CHECKPOINT writes every dirty page, so the frozen image holds little WAL
                // to replay. Not none: writes go on between the CHECKPOINT and the freeze,
                // so a restored image still starts with crash recovery (WAL replay), only a
                // short one, and its data is consistent.
                "psql -v ON_ERROR_STOP=1 -U postgres -c CHECKPOINT",
                "true",
            )
        },
        toolkit(
            "mysql",
            vec![
                DetectRule::Process("mysqld".into()),
                DetectRule::Process("mariadbd".into()),
            ],
            // The read lock lives as long as its session: keep one open until resume.
            "mkdir -p /run/sealvm-agent && (echo 'FLUSH TABLES WITH READ LOCK; SELECT SLEEP(86400);' | mysql >/dev/null 2>&1 & echo $! > /run/sealvm-agent/mysql.pid) && sleep 1 && kill -0 $(cat /run/sealvm-agent/mysql.pid)",
            "kill $(cat /run/sealvm-agent/mysql.pid) 2>/dev/null; rm -f /run/sealvm-agent/mysql.pid",
        ),
        toolkit(
            "sqlite",
            vec![DetectRule::File("/etc/sealvm-agent/sqlite-databases".into())],
            // Fold each listed database's WAL into the main file so the image opens without
            // recovery.
            "set -e; while read -r db; do [ -n \"$db\" ] && sqlite3 \"$db\" 'PRAGMA wal_checkpoint(TRUNCATE);' >/dev/null; done < /etc/sealvm-agent/sqlite-databases",
            "true",
        ),
        toolkit(
            "redis",
            vec![DetectRule::Process("redis-server".into()), DetectRule::Port(6379)],
            "redis-cli SAVE | grep -q OK",
            "true",
        ),
        toolkit(
            "mongodb",
            vec![DetectRule::Process("mongod".into()), DetectRule::Port(27017)],
            "mongosh --quiet --eval 'db.fsyncLock()'",
            "mongosh --quiet --eval 'db.fsyncUnlock()'",
        ),
    ]
}

/// Reads user toolkits from `dir`; a directory missing a file is skipped with a warning.
pub fn user(dir: &Path) -> Vec<Toolkit> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<Toolkit> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .filter_map(|path| {
            let name = path.file_name()?.to_string_lossy().into_owned();
            let detect = match std::fs::read_to_string(path.join("detect")) {
                Ok(text) => text
                    .lines()
                    .map(|l| l.split('#').next().unwrap_or("").trim())
                    .filter(|l| !l.is_empty())
                    .filter_map(DetectRule::parse)
                    .collect(),
                Err(_) => {
                    tracing::warn!(toolkit = %name, "user toolkit has no detect file; skipped");
                    return None;
                }
            };
            let quiesce = path.join("quiesce");
            let resume = path.join("resume");
            if !quiesce.is_file() || !resume.is_file() {
                tracing::warn!(toolkit = %name, "user toolkit lacks a quiesce or resume script; skipped");
                return None;
            }
            let user = std::fs::read_to_string(path.join("user"))
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|user| !user.is_empty());
            Some(Toolkit {
                name,
                source: path.display().to_string(),
                detect,
                quiesce: Script::File(quiesce),
                resume: Script::File(resume),
                user,
            })
        })
        .collect();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Built-in toolkits, then user toolkits from `dir` (replacing built-ins of the same name).
pub fn all(dir: &Path) -> Vec<Toolkit> {
    let mut toolkits = builtin();
    for toolkit in user(dir) {
        toolkits.retain(|t| t.name != toolkit.name);
        toolkits.push(toolkit);
    }
    toolkits
}

fn run_script(
    toolkit: &str,
    phase: &'static str,
    script: &Script,
    user: Option<&str>,
    timeout: Duration,
) -> Result<(), ScriptFailure> {
    let fail = |outcome: String, output: String| ScriptFailure {
        toolkit: toolkit.into(),
        phase,
        outcome,
        output,
    };
    let mut command = match script {
        Script::Inline(text) => {
            let mut c = Command::new("/bin/sh");
            c.arg("-c").arg(text);
            c
        }
        Script::File(path) => Command::new(path),
    };
    if let Some(user) = user {
        // As `runuser -u USER --`: the user's ids (supplementary groups dropped), its
        // environment names, and its home as the working directory.
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
        let Some(account) = crate::accounts::find_account(&passwd, user) else {
            return Err(fail(
                format!("could not start: no user {user} in /etc/passwd"),
                String::new(),
            ));
        };
        use std::os::unix::process::CommandExt;
        let dir = if account.home.is_dir() {
            account.home.clone()
        } else {
            PathBuf::from("/")
        };
        command
            .uid(account.uid)
            .gid(account.gid)
            .current_dir(dir)
            .env("HOME", &account.home)
            .env("USER", user)
            .env("LOGNAME", user);
    }
    // Output goes to a pipe we drain after exit; scripts print little. stderr joins stdout.
    let (reader, writer) = match pipe() {
        Ok(pair) => pair,
        Err(e) => return Err(fail(format!("could not start: {e}"), String::new())),
    };
    let writer_err = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => return Err(fail(format!("could not start: {e}"), String::new())),
    };
    // Its own process group, so a timeout kills the script's children too (they would
    // otherwise hold the output pipe open).
    use std::os::unix::process::CommandExt;
    let mut child = match command
        .process_group(0)
        .env("SEALVM_TOOLKIT", toolkit)
        .env("SEALVM_PHASE", phase)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(writer_err)
        .spawn()
    {
        Ok(child) => child,
        Err(e) => return Err(fail(format!("could not start: {e}"), String::new())),
    };
    drop(command);
    let collector = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = reader.take(1 << 20).read_to_end(&mut out);
        out
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                    // SAFETY: kill only sends a signal; -pid names the group the script leads.
                    unsafe { libc::kill(-pid, libc::SIGKILL) };
                }
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    let output = collector.join().unwrap_or_default();
    let mut output = String::from_utf8_lossy(&output).trim().to_string();
    if output.len() > OUTPUT_LIMIT {
        let mut cut = OUTPUT_LIMIT;
        while !output.is_char_boundary(cut) {
            cut -= 1;
        }
        output.truncate(cut);
    }
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(fail(format!("exited with {s}"), output)),
        None => Err(fail(
            format!("timed out after {} s", timeout.as_secs()),
            output,
        )),
    }
}

/// A pipe with both ends close-on-exec: (read end, write end).
pub(crate) fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::unix::io::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the two-element array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by pipe2 and are owned by nothing else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// The local ports in LISTEN state (0A) in a /proc/net/tcp table.
fn listening_ports(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local = fields.get(1)?;
            if *fields.get(3)? != "0A" {
                return None;
            }
            u16::from_str_radix(local.rsplit(':').next()?, 16).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detect_rules_parse() {
        assert_eq!(
            DetectRule::parse("process postgres"),
            Some(DetectRule::Process("postgres".into()))
        );
        assert_eq!(
            DetectRule::parse("socket 5432"),
            Some(DetectRule::Port(5432))
        );
        assert_eq!(
            DetectRule::parse("socket /run/x.sock"),
            Some(DetectRule::Socket("/run/x.sock".into()))
        );
        assert_eq!(
            DetectRule::parse("file /etc/x"),
            Some(DetectRule::File("/etc/x".into()))
        );
        assert_eq!(DetectRule::parse("socket notaport"), None);
        assert_eq!(DetectRule::parse("bogus x"), None);
    }

    #[test]
    fn listening_ports_come_from_listen_rows_only() {
        let table = "  sl  local_address rem_address   st\n\
                     0: 00000000:1538 00000000:0000 0A\n\
                     1: 0100007F:0050 0100007F:9999 01\n";
        assert_eq!(listening_ports(table), vec![0x1538]);
    }

    #[test]
    fn failing_script_reports_status_and_output() {
        let err = run_script(
            "t",
            "quiesce",
            &Script::Inline("echo nope; exit 3".into()),
            None,
            SCRIPT_TIMEOUT,
        )
        .unwrap_err();
        assert!(err.outcome.contains('3'), "{err}");
        assert_eq!(err.output, "nope");
        run_script(
            "t",
            "resume",
            &Script::Inline("true".into()),
            None,
            SCRIPT_TIMEOUT,
        )
        .unwrap();
    }

    #[test]
    fn a_hanging_script_is_killed_at_its_timeout() {
        let err = run_script(
            "t",
            "quiesce",
            &Script::Inline("sleep 30".into()),
            None,
            Duration::from_millis(200),
        )
        .unwrap_err();
        assert!(err.outcome.contains("timed out"), "{err}");
    }

    #[test]
    fn user_toolkits_are_read_and_replace_builtins() {
        let dir = tempfile::tempdir().unwrap();
        let kit = dir.path().join("redis");
        std::fs::create_dir(&kit).unwrap();
        std::fs::write(kit.join("detect"), "# mine\nfile /\n").unwrap();
        std::fs::write(kit.join("quiesce"), "#!/bin/sh\n").unwrap();
        std::fs::write(kit.join("resume"), "#!/bin/sh\n").unwrap();
        std::fs::create_dir(dir.path().join("incomplete")).unwrap();
        let all = all(dir.path());
        let redis: Vec<_> = all.iter().filter(|t| t.name == "redis").collect();
        assert_eq!(redis.len(), 1);
        assert_eq!(redis[0].detect, vec![DetectRule::File("/".into())]);
        assert!(redis[0].detected(&SystemView::read()));
        assert!(!all.iter().any(|t| t.name == "incomplete"));
        assert_eq!(all.len(), builtin().len());
    }

    #[test]
    fn zombies_do_not_count_as_running() {
        assert!(is_zombie_stat("123 (postgres) Z 1 123 123 0 -1"));
        assert!(is_zombie_stat("9 (a) b) c) Z 1"));
        assert!(!is_zombie_stat("123 (postgres) S 1 123 123 0 -1"));
        assert!(!is_zombie_stat("garbage"));
    }

    #[test]
    fn scripts_run_as_the_toolkit_user() {
        // SAFETY: geteuid only reads the process's effective user id.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: scripts_run_as_the_toolkit_user needs root to change user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("id");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        run_script(
            "t",
            "quiesce",
            &Script::Inline(format!(
                "id -u > {}; echo $USER >> {}",
                out.display(),
                out.display()
            )),
            Some("nobody"),
            SCRIPT_TIMEOUT,
        )
        .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            ["65534", "nobody"]
        );
        let missing = run_script(
            "t",
            "quiesce",
            &Script::Inline("true".into()),
            Some("no-such-user-here"),
            SCRIPT_TIMEOUT,
        )
        .unwrap_err();
        assert!(missing.outcome.contains("no user"), "{missing}");
    }
}
