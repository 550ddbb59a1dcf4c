//! sealvm-agent inside the Linux guest under QEMU, reached through QEMU's virtio-serial
//! chardev socket exactly as libvirt reaches qemu-guest-agent.

use base64::Engine;
use sealvm_agent::{AgentClient, ClientError};
use sealvm_testkit::{QemuGuest, QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(30);

struct Guest {
    guest: QemuGuest,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Boots the guest with the agent channel and, when `ext4` is set, an ext4 disk mounted at
/// /mnt.
fn boot(ext4: bool, kernel_args: &[&str]) -> Guest {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut builder = QemuGuestBuilder::new(images).agent_channel(&socket);
    for arg in kernel_args {
        builder = builder.kernel_arg(*arg);
    }
    if ext4 {
        let disk = dir.path().join("data.ext4");
        make_ext4(&disk);
        builder = builder.raw_disk(&disk);
    }
    let guest = builder.spawn().expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let transcript = guest.console().transcript();
    assert!(
        transcript.contains("agent started on /dev/vport"),
        "{transcript}"
    );
    if ext4 {
        let (out, status) = guest.run("mount -t ext4 /dev/vda /mnt").unwrap();
        assert_eq!(status, 0, "mount failed: {out}");
    }
    Guest {
        guest,
        socket,
        _dir: dir,
    }
}

fn make_ext4(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(path)
        .output()
        .expect("mkfs.ext4");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn connect(guest: &Guest) -> AgentClient {
    AgentClient::connect(&guest.socket, TIMEOUT).expect("agent answers guest-sync-delimited")
}

fn freeze_status(client: &mut AgentClient) -> String {
    client
        .execute("guest-fsfreeze-status", None, TIMEOUT)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn exec(client: &mut AgentClient, script: &str) -> (i64, String) {
    let started = client
        .execute(
            "guest-exec",
            Some(json!({"path": "/bin/sh", "arg": ["-c", script], "capture-output": true})),
            TIMEOUT,
        )
        .unwrap();
    let pid = started["pid"].as_u64().unwrap();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = client
            .execute("guest-exec-status", Some(json!({"pid": pid})), TIMEOUT)
            .unwrap();
        if status["exited"] == json!(true) {
            let out = base64::engine::general_purpose::STANDARD
                .decode(status["out-data"].as_str().unwrap_or(""))
                .unwrap();
            return (
                status["exitcode"].as_i64().unwrap(),
                String::from_utf8(out).unwrap(),
            );
        }
        assert!(Instant::now() < deadline, "guest-exec never finished");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn agent_answers_ping_info_osinfo_and_exec_in_the_guest() {
    let g = boot(false, &[]);
    let mut client = connect(&g);
    assert_eq!(
        client.execute("guest-ping", None, TIMEOUT).unwrap(),
        json!({})
    );
    let info = client.execute("guest-info", None, TIMEOUT).unwrap();
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let (uname, _) = g.guest.run("uname -r").unwrap();
    let osinfo = client.execute("guest-get-osinfo", None, TIMEOUT).unwrap();
    assert_eq!(osinfo["kernel-release"], json!(uname.trim()));
    assert_eq!(osinfo["machine"], "x86_64");
    let (code, out) = exec(&mut client, "echo hello-from-guest; echo $((6*7)); exit 5");
    assert_eq!(code, 5);
    assert_eq!(out, "hello-from-guest\n42\n");
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert!(heartbeat["uptime-seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(heartbeat["frozen"], false);
    g.guest.shutdown().unwrap();
}

#[test]
fn freeze_blocks_a_writer_on_ext4_until_thaw() {
    let g = boot(true, &[]);
    let mut client = connect(&g);
    let fsinfo = client.execute("guest-get-fsinfo", None, TIMEOUT).unwrap();
    let mnt = fsinfo
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["mountpoint"] == "/mnt");
    assert_eq!(mnt.expect("/mnt in fsinfo")["type"], "ext4");

    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    assert_eq!(freeze_status(&mut client), "frozen");
    // The writer's completion line is spelled differently in the echoed command, so only
    // its output can match.
    let console = g.guest.console();
    let mark = console.transcript().len();
    console
        .send("(echo frozen-write > /mnt/file; echo WRITER-\"DONE\") &\n")
        .unwrap();
    let blocked = console.wait_for_after(mark, "WRITER-DONE", Duration::from_secs(3));
    assert!(
        blocked.is_err(),
        "the write completed while the filesystem was frozen"
    );
    let second = client.execute("guest-fsfreeze-freeze", None, TIMEOUT);
    assert!(
        matches!(second, Err(ClientError::Command { .. })),
        "double freeze accepted"
    );

    assert_eq!(
        client
            .execute("guest-fsfreeze-thaw", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    console
        .wait_for_after(mark, "WRITER-DONE", TIMEOUT)
        .expect("writer finishes after thaw");
    assert_eq!(freeze_status(&mut client), "thawed");
    let (out, _) = g.guest.run("cat /mnt/file").unwrap();
    assert_eq!(out.trim(), "frozen-write");
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert_eq!(heartbeat["last-freeze"]["result"], "thawed");
    assert_eq!(heartbeat["last-freeze"]["filesystems"], 1);
    g.guest.shutdown().unwrap();
}

#[test]
fn a_freeze_left_alone_thaws_itself() {
    let g = boot(true, &["sealvm.agent_freeze_timeout=3"]);
    let mut client = connect(&g);
    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    assert_eq!(freeze_status(&mut client), "frozen");
    let deadline = Instant::now() + TIMEOUT;
    while freeze_status(&mut client) == "frozen" {
        assert!(Instant::now() < deadline, "auto-thaw never fired");
        std::thread::sleep(Duration::from_millis(250));
    }
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert_eq!(heartbeat["last-freeze"]["result"], "auto-thawed");
    let (_, status) = g.guest.run("echo ok > /mnt/after").unwrap();
    assert_eq!(status, 0);
    g.guest.shutdown().unwrap();
}

#[test]
fn a_freeze_outlives_the_client_that_asked_for_it() {
    let g = boot(true, &[]);
    let mut client = connect(&g);
    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    drop(client);
    // qemu-ga-client and scripts connect once per command: the next one still sees the
    // freeze, and may not run what writes.
    std::thread::sleep(Duration::from_secs(1));
    let mut client = connect(&g);
    assert_eq!(freeze_status(&mut client), "frozen");
    match client.execute(
        "guest-exec",
        Some(json!({"path": "/bin/touch", "arg": ["/mnt/while-frozen"]})),
        TIMEOUT,
    ) {
        Err(ClientError::Command { class, desc, .. }) => {
            assert_eq!(class, "CommandNotFound", "{desc}");
            assert!(desc.contains("disabled"), "{desc}");
        }
        other => panic!("guest-exec while frozen: {other:?}"),
    }
    assert_eq!(
        client
            .execute("guest-fsfreeze-thaw", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert_eq!(heartbeat["last-freeze"]["result"], "thawed");
    g.guest.shutdown().unwrap();
}

#[test]
fn toolkits_quiesce_as_their_user_and_a_failing_one_leaves_the_freeze_crash_consistent() {
    let g = boot(true, &[]);
    // Two user toolkits, run in name order: one that records its phases (as the OS user
    // `nobody`), then one whose quiesce fails.
    let setup = "(set -e; d=/etc/sealvm-agent/toolkits.d; mkdir -p $d/recorder $d/zz-broken; \
        echo 'file /mnt' > $d/recorder/detect; echo nobody > $d/recorder/user; chmod 1777 /tmp; \
        printf '#!/bin/sh\\necho quiesced-as-$(id -u) > /tmp/recorder.quiesce\\n' > $d/recorder/quiesce; \
        printf '#!/bin/sh\\necho resumed > /tmp/recorder.resume\\n' > $d/recorder/resume; \
        echo 'file /tmp/break-me' > $d/zz-broken/detect; \
        printf '#!/bin/sh\\necho database-busy\\nexit 4\\n' > $d/zz-broken/quiesce; \
        printf '#!/bin/sh\\n' > $d/zz-broken/resume; \
        chmod +x $d/*/quiesce $d/*/resume)";
    let (out, status) = g.guest.run(setup).unwrap();
    assert_eq!(status, 0, "{out}");
    let mut client = connect(&g);

    let listed = client.execute("sealvm-toolkits", None, TIMEOUT).unwrap();
    let find = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(find(&listed, "recorder")["detected"], true);
    assert_eq!(find(&listed, "zz-broken")["detected"], false);
    assert_eq!(find(&listed, "postgresql")["detected"], false);

    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    let (out, _) = g
        .guest
        .run("cat /tmp/recorder.quiesce; ls /tmp/recorder.resume 2>&1")
        .unwrap();
    assert!(out.starts_with("quiesced-as-65534"), "{out}");
    assert!(out.contains("No such file"), "resumed before thaw: {out}");
    client
        .execute("guest-fsfreeze-thaw", None, TIMEOUT)
        .unwrap();
    let (out, _) = g.guest.run("cat /tmp/recorder.resume").unwrap();
    assert_eq!(out.trim(), "resumed");
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert_eq!(heartbeat["last-freeze"]["toolkits"], json!(["recorder"]));

    g.guest
        .run("touch /tmp/break-me; rm -f /tmp/recorder.*")
        .unwrap();
    // As qemu-ga, the freeze does not depend on the applications: it goes on, and says
    // the image is crash-consistent only, and why.
    assert_eq!(
        client
            .execute("guest-fsfreeze-freeze", None, TIMEOUT)
            .unwrap(),
        json!(1)
    );
    assert_eq!(freeze_status(&mut client), "frozen");
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    let current = &heartbeat["current-freeze"];
    assert_eq!(current["application-consistent"], false, "{heartbeat}");
    assert_eq!(current["toolkits"], json!(["recorder"]));
    let broken = find(&current["toolkit-results"], "zz-broken");
    assert_eq!(broken["result"], "failed");
    let error = broken["error"].as_str().unwrap();
    assert!(
        error.contains("quiesce") && error.contains("database-busy"),
        "{error}"
    );
    client
        .execute("guest-fsfreeze-thaw", None, TIMEOUT)
        .unwrap();
    let (out, _) = g.guest.run("ls /tmp/recorder.* | sort").unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["/tmp/recorder.quiesce", "/tmp/recorder.resume"],
        "the toolkit that quiesced was not resumed"
    );
    let heartbeat = client.execute("sealvm-heartbeat", None, TIMEOUT).unwrap();
    assert_eq!(heartbeat["last-freeze"]["result"], "thawed");
    assert_eq!(heartbeat["last-freeze"]["application-consistent"], false);
    let (_, status) = g.guest.run("echo ok > /mnt/after").unwrap();
    assert_eq!(status, 0, "filesystem left frozen");
    g.guest.shutdown().unwrap();
}

#[test]
fn guest_shutdown_stops_services_in_order_then_powers_off() {
    let dir = tempfile::tempdir().unwrap();
    let images = Workspace::locate().linux_guest().expect("guest images");
    let socket = dir.path().join("agent.sock");
    let disk = dir.path().join("data.ext4");
    make_ext4(&disk);
    let mut guest = QemuGuestBuilder::new(images)
        .agent_channel(&socket)
        .raw_disk(&disk)
        .spawn()
        .expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let (out, status) = guest.run("mount -t ext4 /dev/vda /mnt").unwrap();
    assert_eq!(status, 0, "mount failed: {out}");
    // A service that records being stopped, as a database flushes on SIGTERM.
    let (out, status) = guest
        .run(
            "setsid sh -c 'trap \"echo stopped-by-term > /mnt/service.log; exit 0\" TERM; \
             echo running > /mnt/service.log; while :; do sleep 1; done' </dev/null >/dev/null 2>&1 & \
             sleep 1; cat /mnt/service.log",
        )
        .unwrap();
    assert_eq!((out.trim(), status), ("running", 0));
    let mut client = AgentClient::connect(&socket, TIMEOUT).expect("agent answers");
    let refused = client.execute("guest-shutdown", Some(json!({"mode": "explode"})), TIMEOUT);
    assert!(
        matches!(refused, Err(ClientError::Command { .. })),
        "{refused:?}"
    );
    // qemu-guest-agent sends no answer to a successful guest-shutdown.
    let answer = client
        .execute(
            "guest-shutdown",
            Some(json!({"mode": "powerdown"})),
            Duration::from_secs(3),
        )
        .unwrap();
    assert_eq!(answer, Value::Null);
    assert!(
        guest.wait_exit(TIMEOUT),
        "QEMU still runs after guest-shutdown"
    );
    let transcript = guest.console().transcript();
    assert!(
        transcript.contains("sealvm-guest: shutdown: poweroff"),
        "the guest's shutdown program did not run: {transcript}"
    );
    let log = Command::new("debugfs")
        .args(["-R", "cat /service.log"])
        .arg(&disk)
        .output()
        .expect("debugfs");
    assert_eq!(
        String::from_utf8_lossy(&log.stdout).trim(),
        "stopped-by-term",
        "the service was not stopped before power-off"
    );
    let fsck = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(&disk)
        .output()
        .expect("e2fsck");
    assert!(
        fsck.status.success(),
        "the filesystem was not unmounted cleanly: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}
