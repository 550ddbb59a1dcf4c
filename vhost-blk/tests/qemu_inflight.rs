//! Inflight tracking (INFLIGHT_SHMFD) with QEMU as the frontend: sealvm-blk is killed with
//! SIGKILL while a Linux guest writes to /dev/vda and restarted on the same socket and
//! journal; QEMU reconnects and hands the next sealvm-blk its inflight region, which serves
//! the requests left in flight again. The guest's writes all complete, read back in the
//! guest, and `pit restore --at latest` holds them. The device has two queues and the guest
//! two vCPUs, so both queues carry writes.

use sealvm_testkit::{Background, QemuGuest, QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Parallel writers in the guest, each on its own range of the disk.
const WRITERS: u64 = 4;
/// Bytes each writer writes, in 4 KiB direct writes (write-through: each is fdatasynced,
/// which takes a while on a busy disk).
const WRITER_BYTES: u64 = 256 << 10;
/// Kills tried before giving up on catching a request in flight.
const MAX_KILLS: usize = 6;

fn counters(api: &Path) -> Option<Value> {
    sealvm_blk::api::call(api, json!({"command": "counters"})).ok()
}

fn counter(value: &Value, pointer: &str) -> u64 {
    value.pointer(pointer).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs `spawn` with this process's stderr sent to `path`, so the child it starts (QEMU)
/// writes its messages there; the test's own stderr is restored before returning.
fn with_stderr_to<T>(path: &Path, spawn: impl FnOnce() -> T) -> T {
    let file = File::create(path).expect("create the QEMU log");
    // SAFETY: dup of fd 2, which is open for the whole test process; the copy is closed below.
    let saved = unsafe { libc::dup(2) };
    assert!(saved >= 0, "dup(2) failed");
    // SAFETY: both descriptors are open; fd 2 then refers to the log file.
    assert!(unsafe { libc::dup2(file.as_raw_fd(), 2) } >= 0);
    let spawned = spawn();
    // SAFETY: `saved` is the original stderr, still open; it goes back to fd 2 and the copy
    // is closed once.
    unsafe {
        libc::dup2(saved, 2);
        libc::close(saved);
    }
    spawned
}

fn md5(bytes: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("md5sum");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("write to md5sum");
    let out = child.wait_with_output().expect("md5sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn guest_md5s(guest: &QemuGuest, what: &str) -> Vec<String> {
    (0..WRITERS)
        .map(|i| {
            let command = match what {
                "data" => format!("md5sum /tmp/d{i}"),
                _ => format!(
                    "dd if=/dev/vda bs=4096 skip={} count={} iflag=direct 2>/dev/null | md5sum",
                    i * WRITER_BYTES / 4096,
                    WRITER_BYTES / 4096
                ),
            };
            let (out, status) = guest.run(&command).expect("md5sum in the guest");
            assert_eq!(status, 0, "{command}: {out}");
            out.split_whitespace()
                .find(|w| w.len() == 32 && w.chars().all(|c| c.is_ascii_hexdigit()))
                .unwrap_or_else(|| panic!("no md5 in {out:?}"))
                .to_string()
        })
        .collect()
}

#[test]
fn requests_in_flight_when_sealvm_blk_is_killed_are_served_by_the_next_one() {
    let workspace = Workspace::locate();
    let images = match workspace.linux_guest() {
        Ok(images) => images,
        Err(e) => {
            eprintln!("skipped: no Linux guest images ({e}); `cargo xtask images` builds them");
            return;
        }
    };
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: qemu-system-x86_64 is not installed (`cargo xtask setup`)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let base = dir.path().join("vol.raw");
    File::create(&base)
        .and_then(|f| f.set_len(64 << 20))
        .expect("base image");
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let api = dir.path().join("vol.api");
    // Two queues (one worker thread each) and two vCPUs, so the guest uses both.
    let spec = format!(
        "vol={},journal={},queues=2",
        base.display(),
        journal.display()
    );
    let serve = || Background::sealvm_blk(&spec, &socket, Some(&api)).expect("sealvm-blk serves");
    let mut server = serve();

    let qemu_log = dir.path().join("qemu.stderr");
    let guest = with_stderr_to(&qemu_log, || {
        QemuGuestBuilder::new(images)
            .shared_memory()
            .qemu_args([
                "-chardev".to_string(),
                format!("socket,id=vub0,path={},reconnect-ms=1000", socket.display()),
                "-device".to_string(),
                "vhost-user-blk-pci,chardev=vub0,num-queues=2".to_string(),
                "-smp".to_string(),
                "2".to_string(),
            ])
            .spawn()
            .expect("start QEMU")
    });
    guest.wait_ready().expect("guest ready");
    let (out, _) = guest.run("ls /sys/block/vda/mq | wc -l").expect("queues");
    assert_eq!(
        out.trim().lines().last(),
        Some("2"),
        "the guest does not use two queues: {out}"
    );

    // Write-through: every write is fdatasynced before it completes, so requests spend most
    // of their life inside sealvm-blk, where a kill catches them.
    let (out, status) = guest
        .run(&format!(
            "echo 'write through' > /sys/block/vda/cache_type && \
             for i in $(seq 0 {}); do head -c {WRITER_BYTES} /dev/urandom > /tmp/d$i; done; echo ok",
            WRITERS - 1
        ))
        .expect("prepare");
    assert_eq!(status, 0, "{out}");
    let expected = guest_md5s(&guest, "data");
    let (out, status) = guest
        .run(&format!(
            "(for i in $(seq 0 {}); do dd if=/tmp/d$i of=/dev/vda bs=4096 seek=$((i * {})) \
             oflag=direct 2>/tmp/w$i.log & done; wait; echo done > /tmp/writers-done) \
             >/dev/null 2>&1 & true",
            WRITERS - 1,
            WRITER_BYTES / 4096
        ))
        .expect("start the writers");
    assert_eq!(status, 0, "{out}");

    // Kill sealvm-blk while the writers run, until a kill catches requests in flight and the
    // next sealvm-blk serves them again.
    let mut resubmitted = 0;
    let mut kills = 0;
    while resubmitted == 0 && kills < MAX_KILLS {
        let deadline = Instant::now() + Duration::from_secs(60);
        let start_writes = counters(&api).map_or(0, |c| counter(&c, "/requests-by-kind/write"));
        // Let the reconnected frontend get some writes through first.
        loop {
            let writes = counters(&api).map_or(0, |c| counter(&c, "/requests-by-kind/write"));
            if writes >= start_writes + 8 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the guest's writes do not reach sealvm-blk (after {kills} kills)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server.kill();
        kills += 1;
        // The killed process's socket files stay; the next one is ready once it made new ones.
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&api);
        server = serve();
        // The new sealvm-blk serves whatever was in flight on the reconnected queue's first
        // kick; wait until it has served anything.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = counters(&api).unwrap_or_default();
            if counter(&c, "/requests") > 0 {
                resubmitted = counter(&c, "/inflight-resubmitted");
                break;
            }
            assert!(Instant::now() < deadline, "QEMU did not reconnect");
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("kill {kills}: the next sealvm-blk served {resubmitted} requests again");
    }
    assert!(
        resubmitted > 0,
        "{kills} kills of sealvm-blk during the guest's writes and no request was served again \
         from the inflight region"
    );

    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (out, _) = guest
            .run("cat /tmp/writers-done 2>/dev/null; cat /tmp/w*.log")
            .expect("poll");
        if out.contains("done") {
            assert!(!out.contains("error"), "a writer failed: {out}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest's writes did not complete: {out}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let on_disk = guest_md5s(&guest, "disk");
    assert_eq!(
        on_disk, expected,
        "the guest reads back other data than it wrote"
    );
    guest.shutdown().expect("guest shutdown");
    drop(server);

    // QEMU reports each disconnect: its GET_VRING_BASE to a backend that is gone fails
    // ("Failed to set msg fds.", "vhost VQ 0 ring restore failed: -22"), whatever the
    // backend offered (qemu-storage-daemon, which offers INFLIGHT_SHMFD too, killed under
    // the same guest, gets the same lines; so do QEMU's own vhost-user qtests). What
    // must not appear is an error on reconnect: starting vhost, setting up the rings or the
    // inflight region.
    let qemu_stderr = std::fs::read_to_string(&qemu_log).unwrap_or_default();
    println!("QEMU's stderr:\n{qemu_stderr}");
    let unexpected: Vec<&str> = qemu_stderr
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter(|line| {
            let disconnect = line.ends_with("Failed to set msg fds.")
                || (line.contains("vhost VQ ") && line.contains(" ring restore failed: -22"));
            !disconnect
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "QEMU reported errors beyond the disconnects: {unexpected:#?}"
    );
    let restore_failures = qemu_stderr.matches("ring restore failed").count();
    assert!(
        restore_failures <= 2 * kills,
        "{restore_failures} ring restore failures for {kills} kills of a two-queue device"
    );

    let restored = dir.path().join("restored.raw");
    let binary = workspace.binary("sealvm-blk").expect("sealvm-blk built");
    let out = Command::new(binary)
        .args(["pit", "restore", "--base"])
        .arg(&base)
        .arg("--journal")
        .arg(&journal)
        .args(["--at", "latest", "--to"])
        .arg(&restored)
        .output()
        .expect("pit restore");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = std::fs::read(&restored).expect("restored image");
    let restored_md5s: Vec<String> = (0..WRITERS)
        .map(|i| {
            let start = (i * WRITER_BYTES) as usize;
            md5(&image[start..start + WRITER_BYTES as usize])
        })
        .collect();
    assert_eq!(
        restored_md5s, expected,
        "the journal's latest point lacks what the guest wrote"
    );
}
