//! `sealvm run` refusing bad input with a clear error before any guest code runs: a missing
//! or malformed kernel, too much memory, a disk image another process holds, a vhost-user
//! backend that is not there, malformed flags and config files.

use sealvm_testkit::Workspace;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sealvm(args: &[&str]) -> Output {
    let binary = Workspace::locate()
        .binary("sealvm")
        .expect("build sealvm first");
    Command::new(binary).arg("run").args(args).output().unwrap()
}

fn fails_with(args: &[&str], expected: &str) {
    let out = sealvm(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "sealvm run {args:?} should fail");
    assert!(
        stderr.contains(expected),
        "sealvm run {args:?}: expected {expected:?} in: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn junk_kernel(dir: &Path) -> PathBuf {
    let path = dir.join("junk-kernel");
    std::fs::write(&path, vec![0x42u8; 16384]).unwrap();
    path
}

#[test]
fn missing_and_malformed_kernels_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    fails_with(&[], "nothing to boot");
    fails_with(
        &["--kernel", s(&dir.path().join("nope"))],
        "cannot open kernel",
    );
    let junk = junk_kernel(dir.path());
    fails_with(
        &["--kernel", s(&junk), "--memory", "64M"],
        "is not a loadable ELF (vmlinux, PVH) nor a bzImage",
    );
}

#[test]
fn memory_outside_the_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = junk_kernel(dir.path());
    fails_with(
        &["--kernel", s(&junk), "--memory", "64G"],
        "outside what sealvm supports",
    );
    fails_with(&["--kernel", s(&junk), "--memory", "lots"], "bad size");
    fails_with(
        &["--kernel", s(&junk), "--cpus", "0"],
        "--cpus 0 is outside",
    );
}

#[test]
fn a_disk_image_held_by_another_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = junk_kernel(dir.path());
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // This test process holds the image's lock, as a running VM would.
    let holder = std::fs::File::open(&image).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&holder);
    // SAFETY: flock only reads the descriptor number, which `holder` keeps open.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let disk = format!("path={}", image.display());
    fails_with(
        &["--kernel", s(&junk), "--memory", "64M", "--disk", &disk],
        "in use by another process",
    );
    drop(holder);
    fails_with(
        &[
            "--kernel",
            s(&junk),
            "--memory",
            "64M",
            "--disk",
            &format!("path={}", dir.path().join("missing.raw").display()),
        ],
        "cannot open disk image",
    );
}

#[test]
fn a_missing_vhost_user_backend_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = junk_kernel(dir.path());
    let socket = dir.path().join("no-backend.sock");
    let disk = format!("vhost-user={}", socket.display());
    fails_with(
        &["--kernel", s(&junk), "--memory", "64M", "--disk", &disk],
        "vhost-user backend at",
    );
}

#[test]
fn malformed_flags_and_config_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let junk = junk_kernel(dir.path());
    fails_with(&["--kernel", s(&junk), "--disk", "/a.img"], "path=IMAGE");
    fails_with(
        &["--kernel", s(&junk), "--serial", "tty"],
        "bad serial target",
    );
    fails_with(
        &["--kernel", s(&junk), "--console", "/x.sock"],
        "socket=PATH",
    );
    let config = dir.path().join("vm.toml");
    std::fs::write(&config, "kernel = \"/k\"\nmemroy = 5\n").unwrap();
    fails_with(&["--config", s(&config)], "unknown field");
}
