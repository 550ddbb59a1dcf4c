//! `cargo xtask demo`: show the main job, as far as the project has got.

use crate::process::step;
use crate::{images, setup};
use anyhow::{Context, Result};
use sealvm_testkit::{Accel, QemuGuestBuilder, Workspace};

/// Installs what is missing, builds the images, and shows sealvm at work.
pub fn run(workspace: &Workspace) -> Result<()> {
    setup::run()?;
    let built = images::build_all(workspace)?;
    linux_guest_boots(&built)?;
    crate::demo_bundle::run_demo(workspace, &built)
}

/// Boots the Linux guest under QEMU to its ready line and powers it off.
fn linux_guest_boots(built: &images::Built) -> Result<()> {
    let accel = Accel::detect();
    step(&format!(
        "demo: booting the Linux guest under QEMU (-accel {})",
        accel.qemu_name()
    ));
    let guest = QemuGuestBuilder::new(built.linux_guest.clone())
        .echo_console(true)
        .spawn()?;
    let took = guest
        .wait_ready()
        .context("the Linux guest did not become ready")?;
    step(&format!(
        "demo: guest ready after {:.1} s",
        took.as_secs_f64()
    ));
    let (uname, _) = guest.run("uname -r")?;
    step(&format!("demo: guest kernel {}", uname.trim()));
    guest.shutdown()?;
    step("demo: guest powered off");
    Ok(())
}
