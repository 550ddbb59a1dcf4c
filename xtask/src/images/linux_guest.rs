//! The Linux guest: the Debian cloud kernel and a gzip initramfs holding busybox-static, the
//! virtio modules and a statically linked sealvm-agent, started by `images/linux-guest/init`.

use super::kernel;
use super::{InputDigest, Stamp};
use crate::cpio::Archive;
use anyhow::{bail, Context, Result};
use flate2::write::GzEncoder;
use flate2::Compression;
use sealvm_testkit::command::{run, step};
use sealvm_testkit::{GuestImages, Workspace};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The code that lays out the image is an input too: changing it rebuilds the image.
const BUILDER_SOURCE: [&str; 3] = [
    include_str!("linux_guest.rs"),
    include_str!("kernel.rs"),
    include_str!("../cpio.rs"),
];

/// The host's busybox-static binary.
const BUSYBOX: &str = "/bin/busybox";

/// Builds the Linux guest when any of its inputs changed; returns its files.
pub fn build(workspace: &Workspace) -> Result<GuestImages> {
    let recipe = workspace.root().join("images").join("linux-guest");
    let out = workspace.images_dir().join("linux-guest");
    std::fs::create_dir_all(&out)?;

    let kernel = kernel::fetch(&workspace.images_dir().join("cache"))?;
    let agent = build_static_agent(workspace)?;
    check_static(Path::new(BUSYBOX))?;
    let wanted: Vec<String> = std::fs::read_to_string(recipe.join("modules"))?
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    let modules = kernel::modules_in_load_order(&kernel.modules_dir, &wanted)?;
    let host_files = host_programs(&recipe.join("host-programs"))?;
    let rootfs_files = rootfs_files(&recipe.join("rootfs"))?;

    let mut digest = InputDigest::default();
    for source in BUILDER_SOURCE {
        digest.bytes("builder", source.as_bytes());
    }
    digest.bytes("kernel", kernel.package.as_bytes());
    digest.file("init", &recipe.join("init"))?;
    digest.file("busybox", Path::new(BUSYBOX))?;
    digest.file("agent", &agent)?;
    for (name, _) in &modules {
        digest.bytes("module", name.as_bytes());
    }
    for file in &host_files {
        digest.file(&file.display().to_string(), file)?;
    }
    for (name, source) in &rootfs_files {
        digest.file(&format!("rootfs/{name}"), source)?;
    }
    let digest = digest.finish();

    let images = GuestImages {
        kernel: out.join("vmlinuz"),
        initramfs: out.join("initramfs.cpio.gz"),
    };
    let stamp = Stamp::in_dir(&out);
    if stamp.is_current(&digest, &[&images.kernel, &images.initramfs]) {
        step("images: linux guest is up to date");
        return Ok(images);
    }

    step(&format!(
        "images: building the linux guest ({})",
        kernel.package
    ));
    std::fs::copy(&kernel.vmlinuz, &images.kernel)?;
    let partial = out.join("initramfs.cpio.gz.partial");
    let file = std::fs::File::create(&partial)?;
    let mut archive = Archive::new(GzEncoder::new(file, Compression::default()));
    let mut dirs: Vec<String> = [
        "bin",
        "dev",
        "etc",
        "lib",
        "lib/modules",
        "mnt",
        "proc",
        "root",
        "run",
        "sys",
        "tmp",
        "var",
        "var/run",
    ]
    .iter()
    .map(|d| d.to_string())
    .collect();
    let guest_paths = host_files
        .iter()
        .map(|f| f.to_string_lossy().trim_start_matches('/').to_string())
        .chain(rootfs_files.iter().map(|(name, _)| name.clone()))
        .collect::<Vec<_>>();
    for file in &guest_paths {
        for ancestor in Path::new(file).ancestors().skip(1) {
            let dir = ancestor
                .to_string_lossy()
                .trim_start_matches('/')
                .to_string();
            if !dir.is_empty() && !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    // Parents before children.
    dirs.sort_by_key(|d| d.matches('/').count());
    for dir in &dirs {
        archive.dir(dir)?;
    }
    // The kernel opens /dev/console before init mounts devtmpfs.
    archive.char_device("dev/console", 5, 1)?;
    archive.file("init", 0o755, &std::fs::read(recipe.join("init"))?)?;
    archive.file("bin/busybox", 0o755, &std::fs::read(BUSYBOX)?)?;
    archive.symlink("bin/sh", "busybox")?;
    archive.file("bin/sealvm-agent", 0o755, &std::fs::read(&agent)?)?;
    let mut order = String::new();
    for (name, path) in &modules {
        archive.file(
            &format!("lib/modules/{name}.ko"),
            0o644,
            &std::fs::read(path)?,
        )?;
        order.push_str(name);
        order.push('\n');
    }
    archive.file("etc/modules.order", 0o644, order.as_bytes())?;
    for file in &host_files {
        let name = file.to_string_lossy();
        archive.file(name.trim_start_matches('/'), 0o755, &std::fs::read(file)?)?;
    }
    for (name, source) in &rootfs_files {
        use std::os::unix::fs::PermissionsExt;
        let executable = source.metadata()?.permissions().mode() & 0o111 != 0;
        let mode = if executable { 0o755 } else { 0o644 };
        archive.file(name, mode, &std::fs::read(source)?)?;
    }
    archive.finish()?.finish()?.sync_all()?;
    std::fs::rename(&partial, &images.initramfs)?;
    stamp.record(&digest)?;
    Ok(images)
}

/// The files under the recipe's `rootfs/` folder (accounts, and the guest's `shutdown` and
/// `chpasswd` scripts), as (path in the guest without the leading `/`, source), sorted.
/// Git keeps only the executable bit, so that is the one permission carried over.
fn rootfs_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
        for entry in
            std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?
        {
            let path = entry?.path();
            if path.is_dir() {
                walk(root, &path, out)?;
            } else {
                let name = path
                    .strip_prefix(root)
                    .context("rootfs file outside its folder")?
                    .to_string_lossy()
                    .into_owned();
                out.push((name, path));
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files)?;
    files.sort();
    Ok(files)
}

/// The programs listed in `list` and every shared library `ldd` says they load, as absolute
/// host paths with symlinks resolved to the file's real content (kept at the linked name).
fn host_programs(list: &Path) -> Result<Vec<PathBuf>> {
    let text =
        std::fs::read_to_string(list).with_context(|| format!("cannot read {}", list.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for program in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let program = PathBuf::from(program);
        if !program.is_file() {
            bail!(
                "{} is missing on this host; run `cargo xtask setup` to install it",
                program.display()
            );
        }
        let ldd = sealvm_testkit::command::output(Command::new("ldd").arg(&program))?;
        files.push(program);
        for line in ldd.lines() {
            // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux... (0x...)"
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            if let Some(path) = path.filter(|p| p.starts_with('/')) {
                let path = PathBuf::from(path);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
        }
    }
    Ok(files)
}

/// Builds sealvm-agent statically linked for the guest, in its own target folder so the
/// static flags do not invalidate the host build.
fn build_static_agent(workspace: &Workspace) -> Result<PathBuf> {
    let target_dir = workspace.target_dir().join("guest");
    let triple = "x86_64-unknown-linux-gnu";
    run(Command::new(env!("CARGO"))
        .current_dir(workspace.root())
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .args([
            "build",
            "--quiet",
            "--release",
            "--package",
            "sealvm-agent",
            "--bin",
            "sealvm-agent",
        ])
        .args(["--target", triple])
        .arg("--target-dir")
        .arg(&target_dir))?;
    let binary = target_dir.join(triple).join("release").join("sealvm-agent");
    check_static(&binary)?;
    Ok(binary)
}

/// Fails unless `binary` is an ELF without a program interpreter (statically linked).
fn check_static(binary: &Path) -> Result<()> {
    let data =
        std::fs::read(binary).with_context(|| format!("cannot read {}", binary.display()))?;
    if data.get(..4) != Some(b"\x7fELF".as_slice()) {
        bail!("{} is not an ELF binary", binary.display());
    }
    let phoff = read_u64(&data, 0x20)? as usize;
    let phentsize = read_u16(&data, 0x36)? as usize;
    let phnum = read_u16(&data, 0x38)? as usize;
    const PT_INTERP: u32 = 3;
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        if read_u32(&data, at)? == PT_INTERP {
            bail!(
                "{} is dynamically linked; the guest needs a static binary (install busybox-static)",
                binary.display()
            );
        }
    }
    Ok(())
}

fn read_u16(data: &[u8], at: usize) -> Result<u16> {
    let bytes = data.get(at..at + 2).context("truncated ELF header")?;
    Ok(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn read_u32(data: &[u8], at: usize) -> Result<u32> {
    let bytes = data.get(at..at + 4).context("truncated ELF header")?;
    Ok(u32::from_le_bytes(bytes.try_into().expect("slice of 4")))
}

fn read_u64(data: &[u8], at: usize) -> Result<u64> {
    let bytes = data.get(at..at + 8).context("truncated ELF header")?;
    Ok(u64::from_le_bytes(bytes.try_into().expect("slice of 8")))
}
