//! Trusted launch against a local attacker on the host (issue 12, part 1): the vTPM's key
//! and state are unreadable by other users and never in a file; a kernel swapped after the
//! digest check is never booted; SIGTERM, SIGINT and SIGKILL of `sealvm run` leave no
//! decrypted vTPM serving and no scratch behind. Each starts the real `sealvm` binary with
//! swtpm as the host TPM; the launches boot the probe guest on this host's /dev/kvm.

use sealvm_testkit::{SwtpmProcess, Workspace};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn s(p: &Path) -> String {
    p.display().to_string()
}

struct Site {
    dir: tempfile::TempDir,
    host_tpm: SwtpmProcess,
    sealvm: PathBuf,
    probe: PathBuf,
}

impl Site {
    /// The site, or `None` (with the reason printed) when the probe guest or /dev/kvm is
    /// missing.
    fn new() -> Option<Self> {
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

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sealvm_ok(&self, args: &[String]) -> String {
        let out = Command::new(&self.sealvm).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "sealvm {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn tpm_args(&self, helper: &Path) -> Vec<String> {
        vec![
            "--helper-disk".into(),
            s(helper),
            "--tcti".into(),
            self.host_tpm.tcti(),
        ]
    }

    /// helper-partition init + bundle create for `kernel` (the probe guest by default).
    fn provision(&self, kernel: &Path) -> (PathBuf, PathBuf) {
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
    fn launch(&self, bundle: &Path, helper: &Path, kernel: &Path, extra: &[&str]) -> Launch {
        self.launch_with_env(bundle, helper, kernel, extra, &[])
    }

    fn launch_with_env(
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

    fn vtpm_generation(&self, bundle: &Path, helper: &Path) -> u64 {
        let mut args = vec!["bundle".into(), "inspect".into(), s(bundle)];
        args.extend(self.tpm_args(helper));
        let json: serde_json::Value = serde_json::from_str(&self.sealvm_ok(&args)).unwrap();
        json["vtpm_generation"].as_u64().unwrap()
    }
}

struct Launch {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Launch {
    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
    fn wait_for(&self, text: &str, in_stderr: bool, timeout: Duration) -> bool {
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
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
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
    fn signal(&self, signo: i32) {
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
fn swtpm_children(parent: u32) -> Vec<u32> {
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
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
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
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rfind(')').and_then(|c| stat[c + 2..].chars().next());
            state != Some('Z')
        })
        .unwrap_or(false)
}

/// The state directory swtpm `pid` serves from (its `--tpmstate dir=` argument).
fn swtpm_state_dir(pid: u32) -> Option<PathBuf> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .find_map(|arg| arg.strip_prefix("dir="))
        .map(|value| PathBuf::from(value.split(',').next().unwrap_or(value)))
}

/// The vTPM scratch directories of process `pid`.
fn scratch_dirs_of(pid: u32) -> Vec<PathBuf> {
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

/// Another local user trying to read every vTPM scratch directory and file while sealvm
/// runs, as the attacker in the issue did (`nobody`, through setpriv).
struct UnprivilegedWatcher {
    child: Child,
}

impl UnprivilegedWatcher {
    fn start() -> Option<Self> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIP (unprivileged watcher): the test must run as root to become nobody");
            return None;
        }
        let script = r#"
            while :; do
              for d in /dev/shm/sealvm-vtpm-*; do
                [ -e "$d" ] || continue
                echo "SAW $d"
                ls -a "$d" >/dev/null 2>&1 && echo "LISTED $d"
                for f in "$d"/* "$d"/.owner "$d"/.lock "$d"/key "$d"/tpm2-00.permall; do
                  [ -f "$f" ] && cat "$f" >/dev/null 2>&1 && echo "READ $f"
                done
              done
              sleep 0.02
            done"#;
        // At the lowest priority: the watcher spins, and on a small machine it must not
        // starve the sealvm it watches.
        let child = Command::new("nice")
            .args([
                "-n",
                "19",
                "setpriv",
                "--reuid=65534",
                // Group root: the state files' group bits must not matter either.
                "--regid=0",
                "--clear-groups",
                "sh",
                "-c",
                script,
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(child) => Some(Self { child }),
            Err(error) => {
                eprintln!("SKIP (unprivileged watcher): cannot run setpriv: {error}");
                None
            }
        }
    }

    /// Stops the watcher; returns what it saw.
    fn finish(mut self) -> String {
        let _ = self.child.kill();
        let out = self.child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The test's own (root) view of the scratch directories: every mode and every byte.
struct RootWatcher {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(PathBuf, u32, Vec<u8>)>>,
}

impl RootWatcher {
    fn start() -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let Ok(entries) = std::fs::read_dir("/dev/shm") else {
                    break;
                };
                for dir in entries.flatten() {
                    if !dir
                        .file_name()
                        .to_string_lossy()
                        .starts_with("sealvm-vtpm-")
                    {
                        continue;
                    }
                    if let Ok(meta) = dir.metadata() {
                        seen.push((dir.path(), meta.mode(), Vec::new()));
                    }
                    for file in std::fs::read_dir(dir.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                    {
                        let Ok(meta) = file.metadata() else { continue };
                        let bytes = if meta.is_file() {
                            std::fs::read(file.path()).unwrap_or_default()
                        } else {
                            Vec::new()
                        };
                        seen.push((file.path(), meta.mode(), bytes));
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            seen
        });
        RootWatcher { stop, thread }
    }

    fn finish(self) -> Vec<(PathBuf, u32, Vec<u8>)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

#[test]
fn vtpm_key_and_state_are_private_and_the_key_is_in_no_file() {
    let Some(site) = Site::new() else { return };
    // Scratch directories already there (another sealvm, or an old one's leftovers) are
    // not this test's business.
    let preexisting: Vec<PathBuf> = std::fs::read_dir("/dev/shm")
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    let ours = |path: &str| {
        !preexisting
            .iter()
            .any(|p| path.starts_with(&*p.to_string_lossy()))
    };
    let Some(watcher) = UnprivilegedWatcher::start() else {
        return;
    };
    let root = RootWatcher::start();
    let (bundle, helper) = site.provision(&site.probe);
    let mut launch = site.launch(&bundle, &helper, &site.probe, &[]);
    assert!(
        launch.wait_for("PROBE DONE", false, Duration::from_secs(60)),
        "probe did not finish: {}{}",
        launch.stdout(),
        launch.stderr()
    );
    assert!(
        launch.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        launch.stderr()
    );
    let other_user: String = watcher
        .finish()
        .lines()
        .filter(|line| line.split_once(' ').is_some_and(|(_, path)| ours(path)))
        .map(|line| format!("{line}\n"))
        .collect();
    let seen: Vec<_> = root
        .finish()
        .into_iter()
        .filter(|(path, _, _)| ours(&path.to_string_lossy()))
        .collect();

    assert!(
        other_user.contains("SAW /dev/shm/sealvm-vtpm-"),
        "the unprivileged watcher never saw a scratch directory (test is vacuous)"
    );
    assert!(
        !other_user.contains("LISTED") && !other_user.contains("READ"),
        "another user read vTPM scratch:\n{}",
        other_user
            .lines()
            .filter(|l| !l.starts_with("SAW"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(!seen.is_empty(), "the root watcher saw nothing");
    for (path, mode, _) in &seen {
        if path.is_dir() || path.parent() == Some(Path::new("/dev/shm")) {
            assert_eq!(mode & 0o777, 0o700, "{} is not 0700", path.display());
        } else {
            // swtpm_setup 0.7 fchmods its state file to 0640 whatever the umask; the 0700
            // directory is the boundary (the watcher above runs with gid 0 to prove it).
            assert_eq!(
                mode & 0o007,
                0,
                "{} has mode {:o}: others have access",
                path.display(),
                mode & 0o7777
            );
        }
    }
    // No file created during create or launch holds the vTPM key, in hex or binary.
    let opened =
        sealvm_trust::launch::attest_and_open(&bundle, &helper, &site.host_tpm.tcti(), false)
            .unwrap();
    let key_hex = opened.vtpm_key_hex();
    let key_raw = opened.bundle.vtpm_encryption_key()[..16].to_vec();
    let key_upper = key_hex.to_ascii_uppercase();
    let holds_key = |bytes: &[u8]| {
        [key_hex.as_bytes(), key_upper.as_bytes(), &key_raw[..]]
            .iter()
            .any(|needle| contains(bytes, needle))
    };
    for (path, _, bytes) in &seen {
        assert!(!holds_key(bytes), "{} holds the vTPM key", path.display());
    }
    for entry in std::fs::read_dir(site.dir.path()).unwrap().flatten() {
        if entry.path().is_file() {
            let bytes = std::fs::read(entry.path()).unwrap();
            assert!(
                !holds_key(&bytes),
                "{} holds the vTPM key",
                entry.path().display()
            );
        }
    }
    assert!(
        scratch_dirs_of(launch.child.id()).is_empty(),
        "scratch left after the launch"
    );
}

#[test]
fn a_kernel_swapped_after_the_digest_check_is_never_booted() {
    let Some(site) = Site::new() else { return };
    // The kernel path the operator gives is a symlink the attacker controls.
    let genuine = site.path("genuine.elf");
    std::fs::copy(&site.probe, &genuine).unwrap();
    let patched = site.path("patched.elf");
    let mut bytes = std::fs::read(&site.probe).unwrap();
    let at = bytes
        .windows(10)
        .position(|w| w == b"PROBE DONE")
        .expect("the probe prints PROBE DONE");
    bytes[at..at + 10].copy_from_slice(b"PWNED DONE");
    std::fs::write(&patched, &bytes).unwrap();
    let link = site.path("vmlinuz");
    std::os::unix::fs::symlink(&genuine, &link).unwrap();
    let (bundle, helper) = site.provision(&link);

    // The pause (a debug-build test hook) holds sealvm between the check and the boot long
    // enough to swap the link every time instead of by luck.
    let mut launch = site.launch_with_env(
        &bundle,
        &helper,
        &link,
        &[],
        &[("SEALVM_TEST_PAUSE_AFTER_BOOT_VERIFY_MS", "1500")],
    );
    assert!(
        launch.wait_for(
            "test pause after the boot-file check",
            true,
            Duration::from_secs(60)
        ),
        "no pause hook (is sealvm a debug build?): {}",
        launch.stderr()
    );
    let swap = site.path("vmlinuz.new");
    std::os::unix::fs::symlink(&patched, &swap).unwrap();
    std::fs::rename(&swap, &link).unwrap();
    launch.wait_for("DONE", false, Duration::from_secs(60));
    let status = launch.wait_exit(Duration::from_secs(30));
    let console = launch.stdout();
    assert!(
        !console.contains("PWNED"),
        "the swapped kernel booted with the bundle's disk and vTPM:\n{console}"
    );
    assert!(
        console.contains("PROBE DONE") && status.success(),
        "the verified kernel did not boot: {console}{}",
        launch.stderr()
    );
}

/// Launches with the probe lingering, delivers `signo` once the probe is done, and returns
/// the launch, its swtpm pid and its scratch directories (seen while it ran).
fn launch_and_signal(
    site: &Site,
    bundle: &Path,
    helper: &Path,
    signo: i32,
) -> (Launch, u32, Vec<PathBuf>) {
    let launch = site.launch(
        bundle,
        helper,
        &site.probe,
        &["--cmdline", "probe.linger=1"],
    );
    assert!(
        launch.wait_for("PROBE DONE", false, Duration::from_secs(60)),
        "probe did not finish: {}{}",
        launch.stdout(),
        launch.stderr()
    );
    let swtpm = swtpm_children(launch.child.id());
    assert_eq!(swtpm.len(), 1, "expected one swtpm child");
    let scratch: Vec<PathBuf> = swtpm_state_dir(swtpm[0]).into_iter().collect();
    assert_eq!(scratch.len(), 1, "swtpm names no state directory");
    assert!(
        scratch[0].is_dir(),
        "{} is not a directory",
        scratch[0].display()
    );
    launch.signal(signo);
    (launch, swtpm[0], scratch)
}

fn gone_within(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn terminating_signal_stops_guest_and_writes_back(signo: i32, name: &str) {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision(&site.probe);
    let generation_before = site.vtpm_generation(&bundle, &helper);
    let (mut launch, swtpm, scratch) = launch_and_signal(&site, &bundle, &helper, signo);
    let status = launch.wait_exit(Duration::from_secs(30));
    let stderr = launch.stderr();
    assert!(
        status.success(),
        "sealvm after {name}: {status:?}\n{stderr}"
    );
    assert!(stderr.contains(&format!("stopped by {name}")), "{stderr}");
    assert!(stderr.contains("vTPM state was written back"), "{stderr}");
    assert!(
        gone_within(swtpm, Duration::from_secs(5)),
        "swtpm still serving after {name}"
    );
    for dir in &scratch {
        assert!(!dir.exists(), "{} left after {name}", dir.display());
    }
    assert!(
        site.vtpm_generation(&bundle, &helper) > generation_before,
        "the vTPM state was not written back on {name}"
    );
}

#[test]
fn sigterm_stops_the_guest_writes_the_vtpm_back_and_leaves_nothing_behind() {
    terminating_signal_stops_guest_and_writes_back(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_stops_the_guest_writes_the_vtpm_back_and_leaves_nothing_behind() {
    terminating_signal_stops_guest_and_writes_back(libc::SIGINT, "SIGINT");
}

#[test]
fn sigkill_leaves_no_swtpm_and_the_next_start_removes_the_scratch() {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision(&site.probe);
    let (mut launch, swtpm, scratch) = launch_and_signal(&site, &bundle, &helper, libc::SIGKILL);
    launch.wait_exit(Duration::from_secs(30));
    assert!(
        gone_within(swtpm, Duration::from_secs(5)),
        "swtpm kept serving the decrypted vTPM after sealvm was killed"
    );
    // A SIGKILLed process cannot clean up; its scratch (encrypted state only) is removed by
    // the next sealvm that makes a scratch directory.
    drop(launch);
    let mut next = site.launch(&bundle, &helper, &site.probe, &[]);
    assert!(
        next.wait_exit(Duration::from_secs(60)).success(),
        "relaunch after SIGKILL: {}",
        next.stderr()
    );
    assert!(next.stdout().contains("PROBE DONE"), "{}", next.stdout());
    for dir in &scratch {
        assert!(!dir.exists(), "{} left after the next start", dir.display());
    }
}

#[test]
fn sigterm_stops_a_plain_run_as_a_power_off() {
    let Some(site) = Site::new() else { return };
    let disk = site.path("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let stdout = site.path("plain.out");
    let stderr = site.path("plain.err");
    let child = Command::new(&site.sealvm)
        .args([
            "run",
            "--memory",
            "64M",
            "--cmdline",
            "probe.linger=1",
            "--kernel",
        ])
        .arg(&site.probe)
        .arg("--disk")
        .arg(format!("path={}", disk.display()))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut run = Launch {
        child,
        stdout,
        stderr,
    };
    assert!(
        run.wait_for("PROBE DONE", false, Duration::from_secs(60)),
        "{}",
        run.stdout()
    );
    run.signal(libc::SIGTERM);
    let status = run.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status:?}: {}", run.stderr());
    assert!(
        run.stderr().contains("stopped by SIGTERM"),
        "{}",
        run.stderr()
    );
}
