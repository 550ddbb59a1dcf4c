//! What the bundle_security and bundle_signals tests share: a site with swtpm as the host
//! TPM and the probe guest, `sealvm run --bundle` with its output in files, and lookups of
//! swtpm processes and their state directories in /proc.
#![allow(dead_code)] // each test crate uses part of it

use sealvm_testkit::{SwtpmProcess, Workspace};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

pub struct Site {
    pub dir: tempfile::TempDir,
    pub host_tpm: SwtpmProcess,
    pub sealvm: PathBuf,
    pub probe: PathBuf,
}

impl Site {
    /// The site, or `None` (with the reason printed) when the probe guest or /dev/kvm is
    /// missing.
    pub fn new() -> Option<Self> {
        let workspace = Workspace::locate();
        let probe = match workspace.probe_guest() {
            Ok(probe) => probe,
            Err(error) => {
                eprintln!("SKIP: {error} (run `cargo xtask images`)");
                return None;
            }
        };
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            eprintln!("SKIP: /dev/kvm is not usable here");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let host_tpm = SwtpmProcess::start(&dir.path().join("host-tpm")).unwrap();
        Some(Site {
            sealvm: workspace.binary("sealvm").expect("build sealvm first"),
            probe,
            dir,
            host_tpm,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn sealvm_ok(&self, args: &[String]) -> String {
        let out = Command::new(&self.sealvm).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "sealvm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn tpm_args(&self, helper: &Path) -> Vec<String> {
        vec![
            "--helper-disk".into(),
            s(helper),
            "--tcti".into(),
            self.host_tpm.tcti(),
        ]
    }

    /// helper-partition init + bundle create for `kernel` (the probe guest by default).
    pub fn provision(&self, kernel: &Path) -> (PathBuf, PathBuf) {
        let helper = self.path("helper.img");
        let bundle = self.path("probe.svm");
        self.sealvm_ok(&["helper-partition".into(), "init".into(), s(&helper)]);
        let mut args = vec!["bundle".into(), "create".into(), s(&bundle)];
        args.extend(self.tpm_args(&helper));
        args.extend([
            "--pcrs".into(),
            "16,23".into(),
            "--kernel".into(),
            s(kernel),
            "--memory".into(),
            "64M".into(),
            "--disk-size".into(),
            "8M".into(),
        ]);
        self.sealvm_ok(&args);
        (bundle, helper)
    }

    /// `sealvm run --bundle` with stdout (COM1) and stderr in files.
    pub fn launch(&self, bundle: &Path, helper: &Path, kernel: &Path, extra: &[&str]) -> Launch {
        self.launch_with_env(bundle, helper, kernel, extra, &[])
    }

    pub fn launch_with_env(
        &self,
        bundle: &Path,
        helper: &Path,
        kernel: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Launch {
        let stdout = self.path("launch.out");
        let stderr = self.path("launch.err");
        let mut command = Command::new(&self.sealvm);
        command
            .args(["run", "--bundle"])
            .arg(bundle)
            .args(self.tpm_args(helper))
            .arg("--kernel")
            .arg(kernel)
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        Launch {
            child: command.spawn().unwrap(),
            stdout,
            stderr,
        }
    }

    pub fn vtpm_generation(&self, bundle: &Path, helper: &Path) -> u64 {
        let mut args = vec!["bundle".into(), "inspect".into(), s(bundle)];
        args.extend(self.tpm_args(helper));
        let json: serde_json::Value = serde_json::from_str(&self.sealvm_ok(&args)).unwrap();
        json["vtpm_generation"].as_u64().unwrap()
    }
}

pub struct Launch {
    pub child: Child,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Launch {
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    pub fn wait_for(&self, text: &str, in_stderr: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let output = if in_stderr {
                self.stderr()
            } else {
                self.stdout()
            };
            if output.contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "sealvm did not exit: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    pub fn signal(&self, signo: i32) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signo) }, 0);
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The pids of `swtpm` processes whose parent is `parent`.
pub fn swtpm_children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = &stat[stat.find('(').unwrap_or(0) + 1..close];
        let ppid: u32 = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if comm == "swtpm" && ppid == parent {
            found.push(pid);
        }
    }
    found
}

/// `needle` occurs in `haystack` (glibc's memmem: the files searched are tens of MiB and a
/// debug-build `windows()` scan takes many seconds).
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // SAFETY: both pointers and lengths describe live slices for the duration of the call;
    // memmem only reads them.
    !unsafe {
        libc::memmem(
            haystack.as_ptr().cast(),
            haystack.len(),
            needle.as_ptr().cast(),
            needle.len(),
        )
    }
    .is_null()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rfind(')').and_then(|c| stat[c + 2..].chars().next());
            state != Some('Z')
        })
        .unwrap_or(false)
}

/// The state directory swtpm `pid` serves from (its `--tpmstate dir=` argument).
pub fn swtpm_state_dir(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .find_map(|arg| arg.strip_prefix("dir="))
        .map(|value| PathBuf::from(value.split(',').next().unwrap_or(value)))
}

/// The vTPM scratch directories of process `pid`.
pub fn scratch_dirs_of(pid: u32) -> Vec<PathBuf> {
    let prefix = format!("sealvm-vtpm-{pid}-");
    std::fs::read_dir("/dev/shm")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
