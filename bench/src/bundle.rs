//! Bench rows for sealed bundles: XTS throughput on 4 KiB requests beside
//! `openssl speed -evp aes-128-xts` in the same run, and the trusted-launch steps
//! (attest, unseal, open, the guest's swtpm start) against swtpm; the whole launch to the
//! guest's first serial line is a row of bench_vmm.

use crate::table::Row;
use anyhow::{anyhow, Context, Result};
use sealvm_testkit::command::{output, step};
use sealvm_testkit::Workspace;
use std::process::Command;

/// Runs trust/examples/bundle_bench.rs in release and OpenSSL, and returns their rows.
pub fn rows(workspace: &Workspace) -> Result<Vec<Row>> {
    step("bench: sealed bundle (XTS throughput, launch steps against swtpm)");
    let ours = output(Command::new("cargo").current_dir(workspace.root()).args([
        "run",
        "--quiet",
        "--release",
        "-p",
        "sealvm-trust",
        "--example",
        "bundle_bench",
    ]))?;
    let json: serde_json::Value =
        serde_json::from_str(ours.trim()).context("bundle_bench output")?;
    let field = |name: &str| {
        json[name]
            .as_f64()
            .ok_or_else(|| anyhow!("bundle_bench did not report {name}"))
    };
    let openssl_encrypt = openssl_xts_mib_s(false)?;
    let openssl_decrypt = openssl_xts_mib_s(true)?;
    let launch = |name: &str, key: &str| -> Result<Row> {
        Ok(Row {
            name: format!("bundle launch against swtpm: {name} (ms, median of 7)"),
            ours: field(key)?,
            peer: None,
            lower_is_better: true,
        })
    };
    Ok(vec![
        Row {
            name: "XTS-AES-128 encrypt, 4 KiB requests (MiB/s)".into(),
            ours: field("xts_encrypt_mib_s")?,
            peer: Some(("openssl speed".into(), openssl_encrypt)),
            lower_is_better: false,
        },
        Row {
            name: "XTS-AES-128 decrypt, 4 KiB requests (MiB/s)".into(),
            ours: field("xts_decrypt_mib_s")?,
            peer: Some(("openssl speed".into(), openssl_decrypt)),
            lower_is_better: false,
        },
        Row {
            name: "bundle disk 4 KiB writes on tmpfs, --integrity vs plain XTS (MiB/s)".into(),
            ours: field("integrity_write_mib_s")?,
            peer: Some(("plain XTS".into(), field("disk_write_mib_s")?)),
            lower_is_better: false,
        },
        Row {
            name: "bundle disk 4 KiB reads on tmpfs, --integrity vs plain XTS (MiB/s)".into(),
            ours: field("integrity_read_mib_s")?,
            peer: Some(("plain XTS".into(), field("disk_read_mib_s")?)),
            lower_is_better: false,
        },
        launch("attest", "attest_ms")?,
        launch("unseal", "unseal_ms")?,
        launch("open + HMAC checks", "open_ms")?,
        launch("attest + unseal + open", "attest_unseal_open_ms")?,
        launch("guest swtpm start until it answers", "vtpm_start_ms")?,
    ])
}

/// `openssl speed -mr` prints `+F:<n>:AES-128-XTS:<bytes per second>` for the one size.
fn openssl_xts_mib_s(decrypt: bool) -> Result<f64> {
    let mut command = Command::new("openssl");
    command.args([
        "speed",
        "-evp",
        "aes-128-xts",
        "-bytes",
        "4096",
        "-seconds",
        "2",
        "-mr",
    ]);
    if decrypt {
        command.arg("-decrypt");
    }
    let text = output(&mut command)?;
    let line = text
        .lines()
        .find(|l| l.starts_with("+F:"))
        .ok_or_else(|| anyhow!("openssl speed printed no +F line"))?;
    let bytes_per_s: f64 = line
        .rsplit(':')
        .next()
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("cannot parse openssl line {line:?}"))?;
    Ok(bytes_per_s / (1u64 << 20) as f64)
}
