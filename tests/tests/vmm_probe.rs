//! sealvm on real /dev/kvm, proven by the probe guest (images/probe-guest): PVH boot, ACPI
//! power-off, virtio-blk on a raw image (written, read back, flushed, with interrupts, and
//! malformed requests refused), a read-only disk, virtio-console over a unix socket, the
//! vhost-user-blk frontend against sealvm-blk and qemu-storage-daemon, a backend that goes
//! away, and the API socket.

use sealvm_testkit::{Background, SealvmVm, Workspace};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DONE: &str = "PROBE DONE";
const PROBE_SECTOR: u64 = 2048;

fn sealvm() -> PathBuf {
    Workspace::locate()
        .binary("sealvm")
        .expect("build sealvm first")
}

fn probe() -> PathBuf {
    Workspace::locate()
        .probe_guest()
        .expect("run cargo xtask images first")
}

fn args(extra: &[&str], cmdline: &str) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "--kernel".into(),
        probe().display().to_string(),
        "--memory".into(),
        "64M".into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// What the probe writes at sector 2048.
fn probe_pattern() -> Vec<u8> {
    let mut p: Vec<u8> = (0..4096u32)
        .map(|j| ((j * 7 + 0x5a) & 0xff) as u8)
        .collect();
    p[..16].copy_from_slice(b"SEALVM-PROBE-OK!");
    p
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let data = std::fs::read(path).unwrap();
    data[offset as usize..offset as usize + len].to_vec()
}

/// Waits for the probe to finish and asserts every check in `expected` passed and none failed.
fn assert_probe_passed(vm: &mut SealvmVm, expected: &[&str]) {
    let done = vm.wait_for(DONE, Duration::from_secs(60));
    let output = vm.output();
    assert!(done.is_some(), "the probe did not finish:\n{output}");
    assert!(
        done.unwrap().ends_with("fail=0"),
        "a check failed:\n{output}"
    );
    for check in expected {
        assert!(
            output.contains(&format!("PASS {check}")),
            "no PASS {check}:\n{output}"
        );
    }
}

fn wait_for_path(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn probe_passes_on_a_raw_disk_and_the_console_and_survives_malformed_requests() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let console = dir.path().join("console.sock");
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(
            &[
                "--disk",
                &format!("path={}", disk.display()),
                "--console",
                &format!("socket={}", console.display()),
            ],
            "probe.evil=1",
        ),
    )
    .unwrap();
    // The host side of the console: read the probe's hello, answer it.
    wait_for_path(&console);
    let mut stream = UnixStream::connect(&console).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut hello = Vec::new();
    let mut byte = [0u8; 1];
    while !hello.ends_with(b"\n") {
        stream.read_exact(&mut byte).unwrap();
        hello.push(byte[0]);
    }
    assert_eq!(hello, b"probe says hello over virtio-console\n");
    stream.write_all(b"host says hello\n").unwrap();

    assert_probe_passed(
        &mut vm,
        &[
            "boot",
            "blk-init",
            "blk-write",
            "blk-read",
            "blk-flush",
            "blk-get-id",
            "blk-interrupts",
            "blk-evil",
            "blk-after-evil",
            "console-tx",
            "console-rx",
        ],
    );
    assert!(vm.output().contains("INFO console-rx host says hello"));
    let status = vm.wait_exit(Duration::from_secs(10)).expect("sealvm exits");
    assert!(status.success(), "power-off ends sealvm cleanly");
    // What the guest wrote is in the image file, at the right place.
    assert_eq!(read_at(&disk, PROBE_SECTOR * 512, 4096), probe_pattern());
}

#[test]
fn a_read_only_disk_refuses_the_guest_s_writes() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("ro.raw");
    std::fs::write(&disk, vec![0x11u8; 4 << 20]).unwrap();
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(
            &["--disk", &format!("path={},readonly", disk.display())],
            "",
        ),
    )
    .unwrap();
    assert_probe_passed(&mut vm, &["blk-read", "blk-readonly"]);
    assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0x11));
}

#[test]
fn vhost_user_frontend_drives_sealvm_blk() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("vol.raw");
    std::fs::write(&volume, vec![0u8; 8 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let _backend =
        Background::sealvm_blk(&format!("vol={}", volume.display()), &socket, None).unwrap();
    // probe.evil=1: the malformed chains reach sealvm-blk itself through shared memory.
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(
            &["--disk", &format!("vhost-user={}", socket.display())],
            "probe.evil=1",
        ),
    )
    .unwrap();
    assert_probe_passed(
        &mut vm,
        &[
            "blk-write",
            "blk-read",
            "blk-flush",
            "blk-interrupts",
            "blk-evil",
            "blk-after-evil",
        ],
    );
    assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert_eq!(read_at(&volume, PROBE_SECTOR * 512, 4096), probe_pattern());
}

#[test]
fn vhost_user_frontend_drives_qemu_storage_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("qsd.raw");
    std::fs::write(&image, vec![0u8; 8 << 20]).unwrap();
    let socket = dir.path().join("qsd.sock");
    let _qsd = Background::qemu_storage_daemon(&image, &socket).unwrap();
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(&["--disk", &format!("vhost-user={}", socket.display())], ""),
    )
    .unwrap();
    assert_probe_passed(&mut vm, &["blk-write", "blk-read", "blk-flush"]);
    assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
    assert_eq!(read_at(&image, PROBE_SECTOR * 512, 4096), probe_pattern());
}

struct Api {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Api {
    fn connect(path: &Path) -> Self {
        wait_for_path(path);
        let writer = UnixStream::connect(path).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Api {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        }
    }

    /// Sends `request` and returns its `return` value; panics on an error answer.
    fn call(&mut self, request: Value) -> Value {
        let answer = self.raw(&request.to_string());
        assert!(
            answer.get("error").is_none(),
            "{request} was refused: {answer}"
        );
        answer["return"].clone()
    }

    /// Sends `text` and returns the whole answer line.
    fn raw(&mut self, text: &str) -> Value {
        writeln!(self.writer, "{text}").unwrap();
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

#[test]
fn api_socket_answers_info_counters_pause_resume_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();
    let api_path = dir.path().join("api.sock");
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(
            &[
                "--cpus",
                "2",
                "--disk",
                &format!("path={}", disk.display()),
                "--api-socket",
                &api_path.display().to_string(),
            ],
            "probe.linger=1",
        ),
    )
    .unwrap();
    assert_probe_passed(&mut vm, &["blk-write"]);
    let mut api = Api::connect(&api_path);

    let info = api.call(json!({"command": "info"}));
    assert_eq!(info["state"], "running");
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["memory"], 64 << 20);
    assert_eq!(info["devices"][0]["kind"], "block");

    let counters = api.call(json!({"command": "counters"}));
    let block = &counters["devices"][0]["counters"];
    // The probe's requests: write, read, flush, get-id.
    assert_eq!(block["requests"], 4, "{counters}");
    assert_eq!(block["write_bytes"], 4096);
    assert_eq!(block["read_bytes"], 4096);
    assert_eq!(block["flushes"], 1);
    assert!(
        counters["exits"]["io_out"].as_u64().unwrap() > 50,
        "COM1 output: {counters}"
    );
    assert!(
        counters["exits"]["mmio_write"].as_u64().unwrap() > 10,
        "{counters}"
    );

    assert_eq!(api.call(json!({"command": "pause"}))["state"], "paused");
    assert_eq!(api.call(json!({"command": "info"}))["state"], "paused");
    assert_eq!(api.call(json!({"command": "resume"}))["state"], "running");

    assert_eq!(api.raw("{not json")["code"], "bad-request");
    let unknown = api.raw(r#"{"command": "reboot-into-bios"}"#);
    assert_eq!(unknown["code"], "bad-request", "{unknown}");
    assert!(
        unknown["error"]
            .as_str()
            .unwrap()
            .contains("unknown variant"),
        "{unknown}"
    );

    assert_eq!(
        api.call(json!({"command": "shutdown"}))["state"],
        "stopping"
    );
    let status = vm.wait_exit(Duration::from_secs(20)).expect("sealvm exits");
    assert!(status.success());
}

#[test]
fn a_vhost_user_backend_that_goes_away_is_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let volume = dir.path().join("vol.raw");
    std::fs::write(&volume, vec![0u8; 8 << 20]).unwrap();
    let socket = dir.path().join("blk.sock");
    let api_path = dir.path().join("api.sock");
    let mut backend =
        Background::sealvm_blk(&format!("vol={}", volume.display()), &socket, None).unwrap();
    let mut vm = SealvmVm::start(
        &sealvm(),
        &args(
            &[
                "--disk",
                &format!("vhost-user={}", socket.display()),
                "--api-socket",
                &api_path.display().to_string(),
            ],
            "probe.linger=1",
        ),
    )
    .unwrap();
    assert_probe_passed(&mut vm, &["blk-write"]);
    let mut api = Api::connect(&api_path);
    assert_eq!(
        api.call(json!({"command": "counters"}))["devices"][0]["counters"]["backend_connected"],
        true
    );
    backend.kill();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counters = api.call(json!({"command": "counters"}));
        if counters["devices"][0]["counters"]["backend_connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "loss not noticed: {counters}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // sealvm itself lives on and still shuts down cleanly.
    assert_eq!(api.call(json!({"command": "info"}))["state"], "running");
    assert_eq!(
        api.call(json!({"command": "shutdown"}))["state"],
        "stopping"
    );
    assert!(vm.wait_exit(Duration::from_secs(20)).unwrap().success());
}

#[test]
fn a_toml_config_file_describes_the_same_vm_and_flags_override_it() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("cfg.raw");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let config = dir.path().join("vm.toml");
    std::fs::write(
        &config,
        format!(
            "kernel = {:?}\nmemory = {}\ncpus = 1\ncmdline = \"from-the-file\"\ndisks = [{:?}]\nserial = \"stdout\"\n",
            probe().display().to_string(),
            64u64 << 20,
            format!("path={},readonly", disk.display()),
        ),
    )
    .unwrap();
    let args: Vec<String> = vec![
        "--config".into(),
        config.display().to_string(),
        "--cmdline".into(),
        "from-the-flag".into(),
    ];
    let mut vm = SealvmVm::start(&sealvm(), &args).unwrap();
    assert_probe_passed(&mut vm, &["blk-read", "blk-readonly"]);
    let output = vm.output();
    assert!(
        output.contains("INFO cmdline from-the-flag sealvm.mmio=0xd0000000:5"),
        "{output}"
    );
    assert!(vm.wait_exit(Duration::from_secs(10)).unwrap().success());
}
