//! Trusted launch against a local attacker on the host (issue 12, part 1): the vTPM's key
//! and state are unreadable by other users and never in a file; a kernel swapped after the
//! digest check is never booted (signals are in bundle_signals.rs). Each starts the real
//! `sealvm` binary with swtpm as the host TPM; the launches boot the probe guest on this
//! host's /dev/kvm.

mod bundle_site;

use bundle_site::{contains, scratch_dirs_of, Site};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
