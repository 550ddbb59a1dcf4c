//! Consumer cursors over the API socket: a lagging named consumer holds folding; once the
//! journal passes the volume's consumer budget it is marked for resync, folding goes on,
//! and the API and `pit list` say so.

use sealvm_testkit::background::BlkDaemon as Daemon;
use sealvm_testkit::loadgen::BlkDriver;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn api(daemon: &Daemon, request: Value) -> Value {
    sealvm_blk::api::call(&daemon.api, request).expect("API call")
}

fn journal_bytes(daemon: &Daemon) -> u64 {
    daemon.counters().expect("counters")["journal-bytes"]
        .as_u64()
        .unwrap()
}

/// Waits until `done` holds, or fails after 10 s with what `describe` says.
fn wait_for(mut done: impl FnMut() -> bool, describe: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{}", describe());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_lagging_consumer_holds_folding_until_the_budget_then_is_marked_for_resync() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("vol.raw");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let journal = dir.path().join("vol.journal");
    let spec = format!(
        "vol={},journal={},segment-size=16K,retain-bytes=32K,consumer-budget=256K",
        image.display(),
        journal.display()
    );
    let daemon = Daemon::serve(dir.path(), "vol", &spec).expect("start sealvm-blk");
    let mut driver = BlkDriver::connect(&daemon.socket, Duration::from_secs(10)).unwrap();
    let made = api(
        &daemon,
        json!({"command": "consumer-register", "name": "replica", "seq": 0}),
    );
    assert_eq!(made["seq"], 0, "{made}");

    // 40 writes of 4 KiB: 160 KiB of journal, over the retention limit, within the budget.
    for i in 0..40u64 {
        driver.write((i * 8) % 2000, &[i as u8 + 1; 4096]).unwrap();
    }
    driver.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let held = journal_bytes(&daemon);
    assert!(
        held > 150 << 10,
        "folding did not wait for the consumer: {held} bytes"
    );
    let consumers = api(&daemon, json!({"command": "consumers"}));
    assert_eq!(consumers[0]["lag-records"], 40, "{consumers}");
    assert_eq!(consumers[0]["resync"], false, "{consumers}");

    // The consumer catches up to seq 30: history up to there may go.
    api(
        &daemon,
        json!({"command": "consumer-advance", "name": "replica", "seq": 30}),
    );
    wait_for(
        || {
            let r = api(&daemon, json!({"command": "retention"}));
            r["folded-through-seq"].as_u64().unwrap() > 0
        },
        || {
            format!(
                "nothing folded after the consumer moved on: {}",
                journal_bytes(&daemon)
            )
        },
    );
    let folded = api(&daemon, json!({"command": "retention"}))["folded-through-seq"]
        .as_u64()
        .unwrap();
    assert!(folded <= 30, "folded past the consumer's cursor: {folded}");

    // It lags again, past the budget: it is marked for resync and folding goes on.
    for i in 0..80u64 {
        driver.write((i * 8) % 2000, &[i as u8 + 1; 4096]).unwrap();
    }
    driver.flush().unwrap();
    wait_for(
        || journal_bytes(&daemon) <= 64 << 10,
        || format!("the journal stayed at {} bytes", journal_bytes(&daemon)),
    );
    let consumers = api(&daemon, json!({"command": "consumers"}));
    assert_eq!(consumers[0]["resync"], true, "{consumers}");
    let points = api(&daemon, json!({"command": "points"}));
    assert_eq!(points["consumers"][0]["resync"], true, "{points}");
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_sealvm-blk"))
        .args(["pit", "list", "--journal"])
        .arg(&journal)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    assert!(
        text.contains("consumer replica") && text.contains("needs resync"),
        "{text}"
    );
    let refused = sealvm_blk::api::call(
        &daemon.api,
        json!({"command": "consumer-advance", "name": "replica", "seq": 100}),
    );
    assert!(refused.is_err(), "a consumer marked for resync moved on");
}
