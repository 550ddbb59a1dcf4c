//! One `sealvm-blk serve` process serving several volumes from a config file, each on its
//! own socket, with one API; a bookmark across them is one consistent point for the group.
use sealvm_testkit::loadgen::BlkDriver;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SECTORS: u64 = 256;

struct Served {
    child: Child,
    api: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(args: &[&str], wait_for: &[&Path]) -> Served {
    let child = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .arg("serve")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("start sealvm-blk");
    let mut served = Served {
        child,
        api: wait_for[wait_for.len() - 1].to_path_buf(),
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !wait_for.iter().all(|p| p.exists()) {
        if let Some(status) = served.child.try_wait().unwrap() {
            panic!("sealvm-blk exited with {status} before listening");
        }
        assert!(Instant::now() < deadline, "sealvm-blk did not listen");
        std::thread::sleep(Duration::from_millis(10));
    }
    served
}

fn image(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.raw"));
    std::fs::write(&path, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    path
}

fn tag_block(tag: u64) -> Vec<u8> {
    tag.to_le_bytes().repeat(64)
}

fn restored_tag(dir: &Path, name: &str, at: &str) -> u64 {
    let to = dir.join(format!("{name}-{at}.raw"));
    let out = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(["pit", "restore", "--base"])
        .arg(dir.join(format!("{name}.raw")))
        .arg("--journal")
        .arg(dir.join(format!("{name}.journal")))
        .args(["--at", at, "--to"])
        .arg(&to)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&to).unwrap();
    u64::from_le_bytes(bytes[..8].try_into().unwrap())
}

#[test]
fn a_config_file_serves_several_volumes_and_a_group_bookmark_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in ["log", "data", "scratch"] {
        image(d, name);
    }
    std::fs::write(
        d.join("blk.toml"),
        r#"
api-socket = "blk.api"

[[volume]]
name = "log"
path = "log.raw"
socket = "log.sock"
journal = "log.journal"

[[volume]]
name = "data"
path = "data.raw"
socket = "data.sock"
journal = "data.journal"
queues = 2

[[volume]]
name = "scratch"
path = "scratch.raw"
socket = "scratch.sock"
"#,
    )
    .unwrap();
    let sockets: Vec<PathBuf> = ["log.sock", "data.sock", "scratch.sock", "blk.api"]
        .iter()
        .map(|s| d.join(s))
        .collect();
    let waits: Vec<&Path> = sockets.iter().map(PathBuf::as_path).collect();
    let served = serve(&["--config", d.join("blk.toml").to_str().unwrap()], &waits);
    let api = |request: Value| sealvm_blk::api::call(&served.api, request);

    let volumes = api(json!({"command": "volumes"})).unwrap();
    let names: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["log", "data", "scratch"]);
    assert_eq!(volumes[2]["journal"], false);
    let refused = api(json!({"command": "counters"})).unwrap_err().to_string();
    assert!(refused.contains("name one"), "{refused}");

    // Each socket serves its own volume.
    let mut log = BlkDriver::connect(&sockets[0], Duration::from_secs(10)).unwrap();
    let mut data = BlkDriver::connect(&sockets[1], Duration::from_secs(10)).unwrap();
    let mut scratch = BlkDriver::connect(&sockets[2], Duration::from_secs(10)).unwrap();
    scratch.write(0, &tag_block(77)).unwrap();
    scratch.flush().unwrap();
    assert_eq!(
        &std::fs::read(d.join("scratch.raw")).unwrap()[..512],
        &tag_block(77)[..]
    );
    let counters = api(json!({"command": "counters", "volume": "scratch"})).unwrap();
    assert_eq!(counters["requests-by-kind"]["write"], 1, "{counters}");

    // Dependent writes, log first and then data, while group bookmarks are taken: at every
    // bookmark the data volume is never ahead of the log, and at most one write behind.
    let writer = std::thread::spawn(move || {
        for tag in 1..=1500u64 {
            log.write(0, &tag_block(tag)).unwrap();
            data.write(0, &tag_block(tag)).unwrap();
        }
        log.flush().unwrap();
        data.flush().unwrap();
    });
    let mut bookmarks = Vec::new();
    for i in 0..6 {
        std::thread::sleep(Duration::from_millis(15));
        let made = api(json!({"command": "bookmark", "name": format!("group{i}")})).unwrap();
        assert!(made["seqs"]["log"].as_u64().is_some(), "{made}");
        assert!(made["seqs"]["data"].as_u64().is_some(), "{made}");
        assert!(made["seqs"].get("scratch").is_none(), "{made}");
        bookmarks.push(format!("group{i}"));
    }
    writer.join().unwrap();
    let mut moving = 0;
    for name in &bookmarks {
        let (log_tag, data_tag) = (restored_tag(d, "log", name), restored_tag(d, "data", name));
        assert!(
            data_tag <= log_tag && log_tag <= data_tag + 1,
            "bookmark {name}: log at {log_tag}, data at {data_tag}: not one consistent point"
        );
        moving += u64::from(log_tag > 0 && log_tag < 1500);
    }
    assert!(moving > 0, "no bookmark fell while the writes ran");

    // A bookmark on one named volume.
    let one = api(json!({"command": "bookmark", "name": "only-log", "volume": "log"})).unwrap();
    assert!(one["seq"].as_u64().unwrap() > 0, "{one}");
    let err = api(json!({"command": "bookmark", "name": "x", "volume": "scratch"}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("without a journal"), "{err}");
}

#[test]
fn repeated_volume_flags_take_their_sockets_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (image(d, "a"), image(d, "b"));
    let (sa, sb, api) = (d.join("a.sock"), d.join("b.sock"), d.join("api"));
    let _served = serve(
        &[
            "--volume",
            &format!("a={}", a.display()),
            "--volume",
            &format!("b={},socket={}", b.display(), sb.display()),
            "--socket",
            sa.to_str().unwrap(),
            "--api-socket",
            api.to_str().unwrap(),
        ],
        &[&sa, &sb, &api],
    );
    BlkDriver::connect(&sa, Duration::from_secs(10))
        .unwrap()
        .write(1, &tag_block(1))
        .unwrap();
    BlkDriver::connect(&sb, Duration::from_secs(10))
        .unwrap()
        .write(2, &tag_block(2))
        .unwrap();
    assert_eq!(&std::fs::read(&a).unwrap()[512..1024], &tag_block(1)[..]);
    assert_eq!(&std::fs::read(&b).unwrap()[1024..1536], &tag_block(2)[..]);

    let out = Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args([
            "serve", "--volume", "a=a.raw", "--volume", "b=b.raw", "--socket", "x",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no socket"), "{stderr}");
}
