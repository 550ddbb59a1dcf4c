//! sealvm beside QEMU microvm booting the same probe guest on this host's /dev/kvm: time
//! from starting the VMM to the guest's first serial line, and the VMM's memory overhead
//! (peak RSS minus the guest memory it touched, which both keep in a shared memfd).

use crate::table::{median, millis, Row};

use anyhow::{Context, Result};
use sealvm_testkit::command::step;
use sealvm_testkit::{SealvmVm, Workspace};
use std::process::Command;
use std::time::{Duration, Instant};

const RUNS: usize = 5;
const FIRST_LINE: &str = "sealvm probe guest";

struct Sample {
    first_line: Duration,
    overhead_kib: u64,
}

fn measure(mut start: impl FnMut() -> Result<SealvmVm>) -> Result<Sample> {
    let began = Instant::now();
    let mut vm = start()?;
    vm.wait_for(FIRST_LINE, Duration::from_secs(30))
        .context("the probe guest printed nothing")?;
    let first_line = began.elapsed();
    vm.wait_for("PROBE DONE", Duration::from_secs(30))
        .context("the probe guest did not finish")?;
    let hwm = vm.status_kib("VmHWM").context("no VmHWM")?;
    let shmem = vm.status_kib("RssShmem").unwrap_or(0);
    Ok(Sample {
        first_line,
        overhead_kib: hwm.saturating_sub(shmem),
    })
}

/// The rows: first serial line (ms) and memory overhead (MiB), median of five runs each.
pub fn rows(workspace: &Workspace, built: &crate::Built) -> Result<Vec<Row>> {
    // Measured as users run it: the release build (a debug binary maps ~5 MiB more).
    step("bench: building sealvm (release)");
    sealvm_testkit::command::run(
        Command::new(env!("CARGO"))
            .current_dir(workspace.root())
            .args(["build", "--release", "--quiet", "-p", "sealvm"]),
    )?;
    let sealvm = workspace.target_dir().join("release").join("sealvm");
    let probe = built.probe_guest.display().to_string();
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("bench.raw");
    std::fs::File::create(&disk)?.set_len(16 << 20)?;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 1..=RUNS {
        step(&format!(
            "bench: probe guest boot {i}/{RUNS} (sealvm, then QEMU microvm)"
        ));
        ours.push(measure(|| {
            let args: Vec<String> = vec![
                "--kernel".into(),
                probe.clone(),
                "--memory".into(),
                "64M".into(),
                "--cmdline".into(),
                "probe.linger=1".into(),
                "--disk".into(),
                format!("path={}", disk.display()),
            ];
            Ok(SealvmVm::start(&sealvm, &args)?)
        })?);
        theirs.push(measure(|| {
            // QEMU's microvm with the same guest, disk and memory (memfd-backed, shared).
            let mut qemu = Command::new("qemu-system-x86_64");
            qemu.args([
                "-M",
                "microvm,ioapic2=off,memory-backend=mem",
                "-accel",
                "kvm",
            ])
            .args([
                "-cpu",
                "kvm64",
                "-m",
                "64M",
                "-nodefaults",
                "-no-user-config",
            ])
            .args(["-object", "memory-backend-memfd,id=mem,size=64M,share=on"])
            .args(["-display", "none", "-serial", "stdio"])
            .args(["-global", "virtio-mmio.force-legacy=false"])
            .arg("-drive")
            .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .arg("-kernel")
            .arg(&probe)
            .args(["-append", &microvm_device_map()]);
            Ok(SealvmVm::spawn(&mut qemu)?)
        })?);
    }
    let first = |s: &[Sample]| {
        let mut d: Vec<Duration> = s.iter().map(|s| s.first_line).collect();
        millis(median(&mut d))
    };
    let (ours_ms, theirs_ms) = (first(&ours), first(&theirs));
    let overhead = |s: &[Sample]| {
        let mut v: Vec<u64> = s.iter().map(|s| s.overhead_kib).collect();
        v.sort();
        v[v.len() / 2] as f64 / 1024.0
    };
    let sealed = sealed_launch(&sealvm, &built.probe_guest)?;
    Ok(vec![
        Row {
            name: "sealed bundle launch (attest, unseal, open, vTPM, boot) to first serial line (ms, median of 5)"
                .into(),
            ours: sealed,
            peer: None,
            lower_is_better: true,
        },
        Row {
            name: "probe guest on /dev/kvm: VMM start to first serial line (ms, median of 5)"
                .into(),
            ours: ours_ms,
            peer: Some(("qemu microvm".into(), theirs_ms)),
            lower_is_better: true,
        },
        Row {
            name: "VMM memory overhead: peak RSS minus guest memory (MiB, median of 5)".into(),
            ours: overhead(&ours),
            peer: Some(("qemu microvm".into(), overhead(&theirs))),
            lower_is_better: true,
        },
    ])
}

/// QEMU microvm's virtio-mmio transports: 512-byte windows from 0xfeb00000, GSI 5 upwards
/// (with ioapic2=off); the probe skips the empty ones.
fn microvm_device_map() -> String {
    let devices: Vec<String> = (0..8)
        .map(|i| format!("{:#x}:{}", 0xfeb0_0000u64 + 0x200 * i, 5 + i))
        .collect();
    format!("probe.linger=1 sealvm.mmio={}", devices.join(","))
}

/// `sealvm run --bundle` of a probe-guest bundle against swtpm: start to first serial line.
fn sealed_launch(sealvm: &std::path::Path, probe: &std::path::Path) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let host_tpm = sealvm_testkit::SwtpmProcess::start(&dir.path().join("host-tpm"))?;
    let helper = dir.path().join("helper.img");
    let bundle = dir.path().join("bench.svm");
    let p = |p: &std::path::Path| p.display().to_string();
    sealvm_testkit::command::run(Command::new(sealvm).args([
        "helper-partition",
        "init",
        &p(&helper),
    ]))?;
    sealvm_testkit::command::run(Command::new(sealvm).args([
        "bundle",
        "create",
        &p(&bundle),
        "--helper-disk",
        &p(&helper),
        "--tcti",
        &host_tpm.tcti(),
        "--pcrs",
        "16,23",
        "--kernel",
        &p(probe),
        "--memory",
        "64M",
        "--disk-size",
        "8M",
    ]))?;
    let mut times = Vec::new();
    for i in 1..=RUNS {
        step(&format!("bench: sealed bundle launch {i}/{RUNS}"));
        let args: Vec<String> = vec![
            "--bundle".into(),
            p(&bundle),
            "--helper-disk".into(),
            p(&helper),
            "--tcti".into(),
            host_tpm.tcti(),
            "--kernel".into(),
            p(probe),
        ];
        let began = Instant::now();
        let mut vm = SealvmVm::start(sealvm, &args)?;
        vm.wait_for(FIRST_LINE, Duration::from_secs(30))
            .context("the sealed probe guest printed nothing")?;
        times.push(began.elapsed());
        vm.wait_exit(Duration::from_secs(30))
            .context("the sealed launch did not end")?;
    }
    Ok(millis(median(&mut times)))
}
