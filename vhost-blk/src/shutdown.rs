//! Stopping `serve` cleanly on SIGTERM or SIGINT: stop taking records, make every
//! journal durable (fdatasync and a sync point), remove the socket files this process
//! bound, exit 0 (1 if a journal could not be made durable). A SIGKILL or a power loss is
//! what the journal's crash argument is for; this is the orderly stop a service manager
//! asks for.
//!
//! The signals are caught by [`sealvm_os::signals`], which runs this reaction on a thread.

use crate::volume::JournaledVolume;
use sealvm_os::signals::{self, SignalError};
use std::sync::Arc;

/// Installs the handlers for SIGTERM and SIGINT: on either, every volume in `volumes` is
/// stopped ([`JournaledVolume::stop`]), the socket files this process bound are removed and
/// the process exits.
pub fn stop_on_signals(volumes: Vec<Arc<JournaledVolume>>) -> Result<(), SignalError> {
    signals::watch_termination(move |signo| {
        tracing::info!(
            signal = signals::name(signo),
            "stopping: making every journal durable"
        );
        let mut failed = false;
        for volume in &volumes {
            if let Err(e) = volume.stop() {
                failed = true;
                tracing::error!(
                    journal = %volume.journal_dir().display(),
                    error = %e,
                    "the journal could not be made durable"
                );
            }
        }
        if !failed {
            tracing::info!("every journal is durable; exiting");
        }
        // process::exit runs no destructors: remove the socket files here.
        sealvm_os::socket::remove_bound();
        std::process::exit(i32::from(failed));
    })
}
