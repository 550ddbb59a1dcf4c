//! sealvm-blk's journal under a Linux guest in QEMU: a whole-device discard is a few small
//! records (not a gigabyte of zeroes) and costs sealvm-blk no memory to speak of; mkfs
//! journals no more than it writes; and the guest's write-through mode survives a restart
//! of sealvm-blk while QEMU reconnects (QEMU does not write the configuration again).

use sealvm_testkit::{Background, QemuGuestBuilder, Workspace};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

fn counters(api: &Path) -> Value {
    sealvm_blk::api::call(api, json!({"command": "counters"})).expect("counters")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn get(value: &Value, key: &str) -> u64 {
    value[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {value}"))
}

#[test]
fn a_guest_discard_of_the_whole_device_is_a_few_small_records() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let api = dir.path().join("vol.api");
    let spec = format!("vol={},journal={}", base.display(), journal.display());
    let server = Background::sealvm_blk(&spec, &socket, Some(&api)).expect("sealvm-blk");
    let guest = QemuGuestBuilder::new(images)
        .vhost_user_blk(&socket)
        .spawn()
        .expect("start QEMU");
    guest.wait_ready().expect("guest ready");

    let before = counters(&api);
    let rss_before = rss_kib(server.pid());
    let (out, status) = guest.run("blkdiscard /dev/vda 2>&1; echo done").unwrap();
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("done"), "{out}");
    let after = counters(&api);
    let grew = get(&after, "journal-bytes") - get(&before, "journal-bytes");
    let discards =
        get(&after["requests-by-kind"], "discard") - get(&before["requests-by-kind"], "discard");
    let rss_grew = rss_kib(server.pid()).saturating_sub(rss_before);
    println!(
        "blkdiscard of 1 GiB: {discards} discard requests, journal +{grew} bytes, \
         sealvm-blk RSS +{rss_grew} KiB"
    );
    assert!(discards > 0, "the guest sent no discard: {after}");
    assert!(
        grew < 64 << 10,
        "a whole-device discard grew the journal by {grew} bytes"
    );
    assert!(rss_grew < 1024, "sealvm-blk grew by {rss_grew} KiB");
    let (zeroes, _) = guest
        .run("dd if=/dev/vda bs=4096 skip=1000 count=1 2>/dev/null | od -An -v -x | sort -u | tr -d ' \\n'")
        .unwrap();
    assert_eq!(
        zeroes.trim(),
        "0000".repeat(8),
        "discarded blocks read back data"
    );

    // mke2fs writes metadata; the journal holds that and record headers, no more.
    let before = counters(&api);
    let (out, status) = guest
        .run("mke2fs -q /dev/vda >/dev/null 2>&1; echo rc=$?; sync")
        .unwrap();
    assert_eq!(status, 0, "{out}");
    assert!(out.contains("rc=0"), "mke2fs failed: {out}");
    let after = counters(&api);
    let journal_grew = get(&after, "journal-bytes") - get(&before, "journal-bytes");
    let written = get(&after, "write-bytes") - get(&before, "write-bytes");
    let requests = get(&after, "requests") - get(&before, "requests");
    println!(
        "mke2fs: {written} bytes written in {requests} requests, journal +{journal_grew} bytes"
    );
    assert!(
        journal_grew <= written + 64 * requests,
        "mke2fs wrote {written} bytes but the journal grew by {journal_grew}"
    );
    guest.shutdown().unwrap();
}

#[test]
fn the_guests_write_through_mode_survives_a_restart_of_sealvm_blk() {
    let images = Workspace::locate().linux_guest().expect("guest images");
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("vol.raw");
    std::fs::File::create(&base)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let journal = dir.path().join("vol.journal");
    let socket = dir.path().join("vol.sock");
    let api = dir.path().join("vol.api");
    let spec = format!("vol={},journal={}", base.display(), journal.display());
    let server = Background::sealvm_blk(&spec, &socket, Some(&api)).expect("sealvm-blk");
    let guest = QemuGuestBuilder::new(images)
        .shared_memory()
        .qemu_args([
            "-chardev".to_string(),
            format!("socket,id=vub0,path={},reconnect-ms=500", socket.display()),
            "-device".to_string(),
            "vhost-user-blk-pci,chardev=vub0".to_string(),
        ])
        .spawn()
        .expect("start QEMU");
    guest.wait_ready().expect("guest ready");
    let (out, _) = guest
        .run("echo 'write through' > /sys/block/vda/cache_type; cat /sys/block/vda/cache_type")
        .unwrap();
    assert!(out.contains("write through"), "{out}");

    // sealvm-blk restarts; QEMU reconnects on its own.
    drop(server);
    let _server = Background::sealvm_blk(&spec, &socket, Some(&api)).expect("sealvm-blk");
    let deadline = Instant::now() + Duration::from_secs(30);
    let before = loop {
        let c = counters(&api);
        // The reconnected frontend has set up its queue once a read gets through.
        let (_, status) = guest
            .run("dd if=/dev/vda of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null")
            .unwrap();
        if status == 0 && get(&counters(&api), "requests") > get(&c, "requests") {
            break counters(&api);
        }
        assert!(Instant::now() < deadline, "QEMU did not reconnect");
        std::thread::sleep(Duration::from_millis(200));
    };
    let (out, status) = guest
        .run("for i in 1 2 3 4; do dd if=/dev/zero of=/dev/vda bs=4096 seek=$i count=1 oflag=direct 2>/dev/null; done; echo ok")
        .unwrap();
    assert_eq!(status, 0, "{out}");
    let after = counters(&api);
    let writes =
        get(&after["requests-by-kind"], "write") - get(&before["requests-by-kind"], "write");
    let syncs = get(&after, "journal-syncs") - get(&before, "journal-syncs");
    let flushes =
        get(&after["requests-by-kind"], "flush") - get(&before["requests-by-kind"], "flush");
    println!("after the restart: {writes} writes, {flushes} flushes, {syncs} journal syncs");
    assert!(writes >= 4, "{after}");
    assert_eq!(flushes, 0, "a write-through guest sent flushes: {after}");
    assert!(
        syncs >= writes,
        "{writes} writes were acknowledged with only {syncs} fdatasyncs after the restart"
    );
    guest.shutdown().unwrap();
}
