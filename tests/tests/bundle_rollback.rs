//! Rollback protection (issue 12, part 2.1): each launch advances a counter on the host TPM
//! and records it in the bundle's authenticated superblock; an older copy of the bundle is
//! refused before guest code runs; a crash between the two steps still launches next time;
//! `bundle accept-rollback` takes an old copy back on purpose. Boots the probe guest on
//! this host's /dev/kvm with swtpm as the host TPM.

use sealvm_testkit::{SwtpmProcess, Workspace};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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

    fn sealvm(&self, args: &[String], env: &[(&str, &str)]) -> Output {
        Command::new(&self.sealvm)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    }

    fn tpm_args(&self, helper: &Path) -> Vec<String> {
        vec![
            "--helper-disk".into(),
            s(helper),
            "--tcti".into(),
            self.host_tpm.tcti(),
        ]
    }

    fn provision(&self) -> (PathBuf, PathBuf) {
        let helper = self.path("helper.img");
        let bundle = self.path("probe.svm");
        let out = self.sealvm(&["helper-partition".into(), "init".into(), s(&helper)], &[]);
        assert!(out.status.success());
        let mut args = vec!["bundle".into(), "create".into(), s(&bundle)];
        args.extend(self.tpm_args(&helper));
        args.extend(
            [
                "--pcrs",
                "16,23",
                "--kernel",
                "",
                "--memory",
                "64M",
                "--disk-size",
                "8M",
            ]
            .map(String::from),
        );
        args[10] = s(&self.probe);
        let out = self.sealvm(&args, &[]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (bundle, helper)
    }

    fn launch(&self, bundle: &Path, helper: &Path, env: &[(&str, &str)]) -> Output {
        let mut args = vec!["run".into(), "--bundle".into(), s(bundle)];
        args.extend(self.tpm_args(helper));
        args.extend(["--kernel".into(), s(&self.probe)]);
        self.sealvm(&args, env)
    }

    fn inspect(&self, bundle: &Path, helper: &Path) -> serde_json::Value {
        let mut args = vec!["bundle".into(), "inspect".into(), s(bundle)];
        args.extend(self.tpm_args(helper));
        serde_json::from_slice(&self.sealvm(&args, &[]).stdout).unwrap()
    }
}

fn booted(out: &Output) -> bool {
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains("PROBE DONE")
}

#[test]
fn an_older_copy_of_a_bundle_is_refused_before_guest_code_runs() {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision();
    let first = site.launch(&bundle, &helper, &[]);
    assert!(booted(&first), "{}", String::from_utf8_lossy(&first.stderr));
    let copy = site.path("copy.svm");
    std::fs::copy(&bundle, &copy).unwrap();
    let second = site.launch(&bundle, &helper, &[]);
    assert!(
        booted(&second),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let newest = std::fs::read(&bundle).unwrap();

    // Put the copy back: refused, naming both generations, no guest code, file untouched.
    std::fs::copy(&copy, &bundle).unwrap();
    let inspected = site.inspect(&copy, &helper);
    assert_eq!(inspected["bundle_verified"], false, "{inspected}");
    assert!(
        inspected["failures"].to_string().contains("older copy"),
        "{inspected}"
    );
    let refused = site.launch(&bundle, &helper, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("this bundle is an older copy: generation"),
        "{stderr}"
    );
    assert!(stderr.contains("the host TPM says"), "{stderr}");
    assert!(
        !String::from_utf8_lossy(&refused.stdout).contains("PROBE"),
        "guest code ran"
    );
    assert_eq!(
        std::fs::read(&bundle).unwrap(),
        std::fs::read(&copy).unwrap()
    );

    // The newest copy launches again.
    std::fs::write(&bundle, &newest).unwrap();
    let third = site.launch(&bundle, &helper, &[]);
    assert!(booted(&third), "{}", String::from_utf8_lossy(&third.stderr));
}

#[test]
fn a_crash_between_bundle_write_and_counter_increment_still_launches() {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision();
    let before = site.inspect(&bundle, &helper)["rollback_generation"]
        .as_u64()
        .unwrap();
    let crashed = site.launch(&bundle, &helper, &[("SEALVM_TEST_CRASH_IN_ROLLBACK", "1")]);
    assert!(!crashed.status.success());
    assert!(
        String::from_utf8_lossy(&crashed.stderr).contains("test crash between the rollback steps"),
        "no crash hook (is sealvm a debug build?): {}",
        String::from_utf8_lossy(&crashed.stderr)
    );
    let copy_at_crash = site.path("at-crash.svm");
    std::fs::copy(&bundle, &copy_at_crash).unwrap();
    let next = site.launch(&bundle, &helper, &[]);
    assert!(
        booted(&next),
        "locked out after the crash: {}",
        String::from_utf8_lossy(&next.stderr)
    );
    let after = site.inspect(&bundle, &helper)["rollback_generation"]
        .as_u64()
        .unwrap();
    assert!(after >= before + 2, "generation {before} -> {after}");
    // The copy taken at the crash is older than that launch: refused.
    std::fs::copy(&copy_at_crash, &bundle).unwrap();
    let refused = site.launch(&bundle, &helper, &[]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("older copy"));
}

#[test]
fn accept_rollback_takes_an_older_copy_on_purpose() {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision();
    let copy = site.path("copy.svm");
    std::fs::copy(&bundle, &copy).unwrap();
    assert!(booted(&site.launch(&bundle, &helper, &[])));
    std::fs::copy(&copy, &bundle).unwrap();
    assert!(!site.launch(&bundle, &helper, &[]).status.success());
    let mut args = vec!["bundle".into(), "accept-rollback".into(), s(&bundle)];
    args.extend(site.tpm_args(&helper));
    let accepted = site.sealvm(&args, &[]);
    assert!(
        accepted.status.success(),
        "{}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    assert!(
        String::from_utf8_lossy(&accepted.stderr).contains("accepting an older copy"),
        "accept-rollback is not logged: {}",
        String::from_utf8_lossy(&accepted.stderr)
    );
    let relaunch = site.launch(&bundle, &helper, &[]);
    assert!(
        booted(&relaunch),
        "{}",
        String::from_utf8_lossy(&relaunch.stderr)
    );
}

#[test]
fn a_sealed_record_naming_another_counter_is_refused() {
    let Some(site) = Site::new() else { return };
    let (bundle, helper) = site.provision();
    let id = site.inspect(&bundle, &helper)["bundle_id"]
        .as_str()
        .unwrap()
        .to_string();
    // The helper partition is not authenticated: point the record at another counter (one
    // whose value an attacker could keep low). The bundle's authenticated superblock says
    // otherwise, and the launch is refused.
    let partition = sealvm_trust::helper_partition::SealedPartition::open(&helper, true).unwrap();
    let mut record = partition.get(&id).unwrap();
    record.rollback_counter = record.rollback_counter.map(|index| index + 1);
    partition.put(record).unwrap();
    drop(partition);
    let refused = site.launch(&bundle, &helper, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("rollback counter"), "{stderr}");
    assert!(!String::from_utf8_lossy(&refused.stdout).contains("PROBE"));
}
