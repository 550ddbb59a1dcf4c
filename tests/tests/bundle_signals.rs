//! `sealvm run` under SIGTERM, SIGINT and SIGKILL (issue 12, part 1.3): a terminating
//! signal stops the guest as a power-off does and writes the vTPM back; nothing outlives
//! sealvm (its swtpm dies with it, even under SIGKILL) and no scratch is left (after SIGKILL,
//! the next start removes it). Boots the probe guest on this host's /dev/kvm.

mod bundle_site;

use bundle_site::{alive, swtpm_children, swtpm_state_dir, Launch, Site};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
