//! The Debian cloud kernel: fetched with `apt-get download`, unpacked with `dpkg -x`, never
//! installed on the host.

use anyhow::{bail, Context, Result};
use sealvm_testkit::command::{output, run, step};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage that names the current cloud kernel.
const METAPACKAGE: &str = "linux-image-cloud-amd64";

/// An unpacked kernel package.
pub struct Kernel {
    /// The package it came from, such as `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// The bzImage.
    pub vmlinuz: PathBuf,
    /// `lib/modules/<release>` inside the unpacked package.
    pub modules_dir: PathBuf,
}

/// Fetches and unpacks the current cloud kernel into `cache`, unless it is already there.
pub fn fetch(cache: &Path) -> Result<Kernel> {
    std::fs::create_dir_all(cache)?;
    let package = match current_package() {
        Ok(package) => package,
        Err(err) => match newest_cached(cache)? {
            Some(package) => {
                step(&format!(
                    "images: cannot ask apt for the current kernel ({err:#}); using cached {package}"
                ));
                package
            }
            None => return Err(err),
        },
    };
    let unpacked = cache.join(&package);
    if !unpacked.join("boot").is_dir() {
        step(&format!("images: fetching {package}"));
        let debs = |dir: &Path| -> Result<Vec<PathBuf>> {
            Ok(std::fs::read_dir(dir)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with(&format!("{package}_")) && n.ends_with(".deb")
                    })
                })
                .collect())
        };
        if debs(cache)?.is_empty() {
            run(Command::new("apt-get").current_dir(cache).args([
                "-q",
                "-o",
                "APT::Sandbox::User=root",
                "download",
                &package,
            ]))?;
        }
        let deb = debs(cache)?.pop().with_context(|| {
            format!(
                "apt-get download left no {package} .deb in {}",
                cache.display()
            )
        })?;
        let staging = cache.join(format!("{package}.partial"));
        let _ = std::fs::remove_dir_all(&staging);
        run(Command::new("dpkg").arg("-x").arg(&deb).arg(&staging))?;
        std::fs::rename(&staging, &unpacked)?;
        std::fs::remove_file(&deb)?;
    }
    let vmlinuz = find_one(&unpacked.join("boot"), "vmlinuz-")?;
    let modules_root = unpacked.join("lib").join("modules");
    let release = std::fs::read_dir(&modules_root)
        .with_context(|| format!("{package} has no {}", modules_root.display()))?
        .filter_map(|e| e.ok())
        .next()
        .with_context(|| format!("{package} has no module tree"))?
        .path();
    Ok(Kernel {
        package,
        vmlinuz,
        modules_dir: release,
    })
}

/// The versioned kernel package the metapackage depends on today.
fn current_package() -> Result<String> {
    let depends = output(Command::new("apt-cache").args(["depends", METAPACKAGE]))?;
    depends
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: "))
        .find(|dep| dep.starts_with("linux-image-"))
        .map(str::to_string)
        .with_context(|| {
            format!("apt-cache knows no kernel behind {METAPACKAGE}; run apt-get update")
        })
}

fn newest_cached(cache: &Path) -> Result<Option<String>> {
    let mut names: Vec<String> = std::fs::read_dir(cache)?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("boot").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names.pop())
}

fn find_one(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
        })
        .with_context(|| format!("no {prefix}* in {}", dir.display()))
}

/// The `.ko` files for `wanted` and everything they depend on, in load order (each module
/// after its dependencies), as read from each module's own `depends=` field.
pub fn modules_in_load_order(
    modules_dir: &Path,
    wanted: &[String],
) -> Result<Vec<(String, PathBuf)>> {
    let mut index = BTreeMap::new();
    index_modules(&modules_dir.join("kernel"), &mut index)?;
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        visit(name, &index, &mut done, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}

fn index_modules(dir: &Path, index: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            if let Some(stem) = name.strip_suffix(".ko") {
                index.insert(stem.replace('-', "_"), path.clone());
            }
        }
    }
    Ok(())
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    done: &mut BTreeSet<String>,
    path: &mut Vec<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<()> {
    let name = name.replace('-', "_");
    if done.contains(&name) {
        return Ok(());
    }
    if path.contains(&name) {
        bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
    }
    let file = index
        .get(&name)
        .with_context(|| format!("the kernel package has no module {name}"))?;
    path.push(name.clone());
    for dep in module_depends(file)? {
        visit(&dep, index, done, path, order)?;
    }
    path.pop();
    done.insert(name.clone());
    order.push((name, file.clone()));
    Ok(())
}

/// The `depends=` list from a module's .modinfo section.
fn module_depends(ko: &Path) -> Result<Vec<String>> {
    let data = std::fs::read(ko).with_context(|| format!("cannot read {}", ko.display()))?;
    let field = data
        .split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .unwrap_or(b"");
    Ok(String::from_utf8_lossy(field)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect())
}
