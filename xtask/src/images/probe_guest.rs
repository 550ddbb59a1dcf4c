//! The probe guest: a freestanding C program with a PVH note that sealvm boots on real KVM
//! (see images/probe-guest/README.md).

use super::{InputDigest, Stamp};
use anyhow::Result;
use sealvm_testkit::command::{run, step};
use sealvm_testkit::Workspace;
use std::path::PathBuf;
use std::process::Command;

const BUILDER_SOURCE: &str = include_str!("probe_guest.rs");
const SOURCES: [&str; 3] = ["start.S", "probe.c", "link.ld"];
const CFLAGS: [&str; 14] = [
    "-m64",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-Wall",
    "-Wextra",
    "-Werror",
];

/// Builds `images/build/probe-guest/probe.elf` when its sources changed; returns its path.
pub fn build(workspace: &Workspace) -> Result<PathBuf> {
    let recipe = workspace.root().join("images").join("probe-guest");
    let out = workspace.images_dir().join("probe-guest");
    std::fs::create_dir_all(&out)?;
    let elf = out.join("probe.elf");
    let mut digest = InputDigest::default();
    digest.bytes("builder", BUILDER_SOURCE.as_bytes());
    for source in SOURCES {
        digest.file(source, &recipe.join(source))?;
    }
    let digest = digest.finish();
    let stamp = Stamp::in_dir(&out);
    if stamp.is_current(&digest, &[&elf]) {
        step("images: probe guest is up to date");
        return Ok(elf);
    }
    step("images: building the probe guest");
    let start = out.join("start.o");
    let probe = out.join("probe.o");
    run(Command::new("gcc")
        .args(CFLAGS)
        .arg("-c")
        .arg(recipe.join("start.S"))
        .arg("-o")
        .arg(&start))?;
    run(Command::new("gcc")
        .args(CFLAGS)
        .arg("-c")
        .arg(recipe.join("probe.c"))
        .arg("-o")
        .arg(&probe))?;
    let partial = out.join("probe.elf.partial");
    run(Command::new("ld")
        .args([
            "-m",
            "elf_x86_64",
            "-no-pie",
            "--no-warn-rwx-segments",
            "-T",
        ])
        .arg(recipe.join("link.ld"))
        .arg(&start)
        .arg(&probe)
        .arg("-o")
        .arg(&partial))?;
    std::fs::rename(&partial, &elf)?;
    stamp.record(&digest)?;
    Ok(elf)
}
