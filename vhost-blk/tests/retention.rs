//! Retention with a real daemon: a volume written through the vhost-user socket keeps its
//! journal within the limit set over the API, folds old history in the background while
//! writes go on, and every point in time still within reach restores exactly.

use sealvm_testkit::background::BlkDaemon as Daemon;
use sealvm_testkit::loadgen::BlkDriver;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const SECTORS: u64 = 2048; // 1 MiB

fn api(daemon: &Daemon, request: Value) -> Value {
    sealvm_blk::api::call(&daemon.api, request).expect("API call")
}

fn pit(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .arg("pit")
        .args(args)
        .output()
        .expect("run sealvm-blk pit")
}

#[test]
fn retention_folds_history_in_the_background_and_later_points_stay_exact() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::write(&image, vec![0u8; (SECTORS * 512) as usize]).unwrap();
    let journal = dir.path().join("vol.journal");
    let spec = format!(
        "vol={},journal={},segment-size=64K",
        image.display(),
        journal.display()
    );
    let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();

    // The model of the volume, and a copy of it at a bookmark made late in the run.
    let mut model = vec![0u8; (SECTORS * 512) as usize];
    let write = |driver: &mut BlkDriver, model: &mut Vec<u8>, i: u64| {
        let sector = (i * 37) % (SECTORS - 8);
        let data = vec![(i % 251) as u8 + 1; 4096];
        driver.write(sector, &data).unwrap();
        model[(sector * 512) as usize..(sector * 512) as usize + 4096].copy_from_slice(&data);
        if i % 16 == 15 {
            driver.flush().unwrap();
        }
    };
    for i in 0..200 {
        write(&mut driver, &mut model, i);
    }
    let unlimited = api(&daemon, json!({"command": "retention"}));
    assert_eq!(unlimited["max-bytes"], Value::Null, "{unlimited}");
    assert_eq!(unlimited["folded-through-seq"], 0, "{unlimited}");
    let grown = unlimited["journal-bytes"].as_u64().unwrap();
    assert!(grown > 512 * 1024, "{unlimited}");

    // Limit the journal; the folder brings it under the limit while writes go on.
    let limited = api(
        &daemon,
        json!({"command": "set-retention", "max-bytes": 256 * 1024}),
    );
    assert_eq!(limited["max-bytes"], 256 * 1024, "{limited}");
    for i in 200..400 {
        write(&mut driver, &mut model, i);
    }
    driver.flush().unwrap();
    let bookmark = api(&daemon, json!({"command": "bookmark", "name": "late"}));
    let at_bookmark = model.clone();
    for i in 400..450 {
        write(&mut driver, &mut model, i);
    }
    driver.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let counters = loop {
        let counters = daemon.counters().expect("counters");
        if counters["journal-bytes"].as_u64().unwrap() <= 256 * 1024 {
            break counters;
        }
        assert!(
            Instant::now() < deadline,
            "journal still over the limit: {counters}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let folded = counters["folded-through-seq"].as_u64().unwrap();
    assert!(folded > 0, "{counters}");
    assert!(
        counters["folded-segments"].as_u64().unwrap() > 0,
        "{counters}"
    );
    assert_eq!(counters["oldest-seq"], folded + 1, "{counters}");
    assert!(
        bookmark["seq"].as_u64().unwrap() > folded,
        "{bookmark} {counters}"
    );

    // The guest's view never changed.
    let chunk = (sealvm_testkit::loadgen::MAX_REQUEST_BYTES / 512) as u64;
    let mut read = Vec::new();
    for first in (0..SECTORS).step_by(chunk as usize) {
        read.extend(
            driver
                .read(first, (chunk.min(SECTORS - first) * 512) as usize)
                .unwrap(),
        );
    }
    assert!(
        read == model,
        "the volume reads back differently after folding"
    );
    assert!(
        std::fs::read(&image).unwrap().iter().all(|&b| b == 0),
        "the volume's image was written"
    );

    // pit sees the same reach, restores what is within it, and refuses what is not.
    let journal_arg = journal.to_str().unwrap();
    let list = pit(&["list", "--journal", journal_arg, "--json"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let list: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(
        list["folded-through-seq"].as_u64().unwrap() >= folded,
        "{list}"
    );
    assert_eq!(list["bookmarks"][0]["name"], "late", "{list}");
    let restored = dir.path().join("late.raw");
    let base_arg = image.to_str().unwrap();
    let out = pit(&[
        "restore",
        "--base",
        base_arg,
        "--journal",
        journal_arg,
        "--at",
        "late",
        "--to",
        restored.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(&restored).unwrap() == at_bookmark,
        "restore at the bookmark differs"
    );
    // The API answers the same for the served volume.
    let points = api(&daemon, json!({"command": "points"}));
    assert_eq!(
        points["folded-through-seq"], list["folded-through-seq"],
        "{points}"
    );
    assert_eq!(points["bookmarks"], list["bookmarks"], "{points}");
    let via_api = dir.path().join("late-api.raw");
    let answer = api(
        &daemon,
        json!({"command": "restore", "at": "late", "to": via_api}),
    );
    assert_eq!(answer["seq"], bookmark["seq"], "{answer}");
    assert!(
        std::fs::read(&via_api).unwrap() == at_bookmark,
        "API restore differs"
    );
    let out = pit(&[
        "restore",
        "--base",
        base_arg,
        "--journal",
        journal_arg,
        "--at",
        "1",
        "--to",
        dir.path().join("old.raw").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("folded into the base"), "{stderr}");
}
