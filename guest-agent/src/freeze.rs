//! A freeze from start to thaw, as guest-fsfreeze-* drive it: detected applications
//! quiesce through their toolkits, the filesystems freeze ([`crate::fsfreeze`]), a timer
//! thaws a freeze nobody ends, and the heartbeat's report says what each toolkit did and
//! whether the frozen image is application-consistent or only crash-consistent.

use crate::agent::{Agent, State};
use crate::fsfreeze;
use crate::protocol::CommandError;
use crate::toolkits::{self, Toolkit};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// A freeze as the heartbeat reports it: the one under way (`current-freeze`) or the last
/// one (`last-freeze`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FreezeReport {
    /// `frozen` (under way), `thawed`, `auto-thawed`, `nothing-frozen` (no filesystem
    /// could be frozen) or `failed`.
    pub result: String,
    /// Seconds since the epoch when the freeze began.
    pub started_at: u64,
    /// Freeze to thaw, in milliseconds (0 while frozen or when the freeze failed).
    pub window_ms: u64,
    /// Filesystems frozen.
    pub filesystems: usize,
    /// Toolkits that quiesced.
    pub toolkits: Vec<String>,
    /// Every detected toolkit and what its quiesce step did.
    pub toolkit_results: Vec<ToolkitResult>,
    /// True only when at least one application was detected and every detected toolkit
    /// quiesced: the frozen image is then application-consistent, otherwise only
    /// crash-consistent.
    pub application_consistent: bool,
    /// What failed, when the freeze itself did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What one detected toolkit's quiesce step did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct ToolkitResult {
    /// The toolkit.
    pub name: String,
    /// `quiesced` or `failed`.
    pub result: String,
    /// Why it failed (the script's status and output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FreezeReport {
    pub(crate) fn new(started_at: u64, results: Vec<ToolkitResult>) -> Self {
        let toolkits = results
            .iter()
            .filter(|r| r.result == "quiesced")
            .map(|r| r.name.clone())
            .collect::<Vec<_>>();
        FreezeReport {
            result: "frozen".into(),
            started_at,
            window_ms: 0,
            filesystems: 0,
            application_consistent: !results.is_empty() && toolkits.len() == results.len(),
            toolkits,
            toolkit_results: results,
            error: None,
        }
    }
}

pub(crate) struct Frozen {
    pub(crate) mountpoints: Vec<PathBuf>,
    pub(crate) toolkits: Vec<Toolkit>,
    pub(crate) report: FreezeReport,
    pub(crate) at: Instant,
    pub(crate) generation: u64,
}

impl Agent {
    /// Quiesces detected applications, then freezes the filesystems; returns the count.
    /// As with qemu-ga, the freeze does not depend on the applications: a toolkit that
    /// fails to quiesce is reported (the image is then only crash-consistent) and the
    /// filesystems freeze all the same.
    pub(crate) fn freeze(&self, only: Option<Vec<String>>) -> Result<Value, CommandError> {
        let mut state = self.lock();
        if state.frozen.is_some() {
            // handle() refuses a second freeze before it gets here; a freeze racing another
            // connection's lands here, and gets the same answer.
            return Err(CommandError::disabled("guest-fsfreeze-freeze"));
        }
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let fail = |state: &mut State, mut report: FreezeReport, error: CommandError| {
            report.result = "failed".into();
            report.error = Some(error.desc.clone());
            state.last_freeze = Some(report);
            Err(error)
        };
        let mountpoints = match fsfreeze::candidates(only.as_deref()) {
            Ok(m) => m,
            Err(e) => {
                let report = FreezeReport::new(started_at, Vec::new());
                return fail(&mut state, report, CommandError::generic(e.to_string()));
            }
        };
        let system = toolkits::SystemView::read();
        let detected: Vec<Toolkit> = toolkits::all(&self.config.toolkits_dir)
            .into_iter()
            .filter(|t| t.detected(&system))
            .collect();
        let mut quiesced: Vec<Toolkit> = Vec::new();
        let mut results = Vec::new();
        for toolkit in detected {
            match toolkit.quiesce(self.config.script_timeout) {
                Ok(()) => {
                    results.push(ToolkitResult {
                        name: toolkit.name.clone(),
                        result: "quiesced".into(),
                        error: None,
                    });
                    quiesced.push(toolkit);
                }
                Err(failure) => {
                    tracing::warn!(%failure, "quiesce failed; the freeze is crash-consistent only");
                    results.push(ToolkitResult {
                        name: toolkit.name.clone(),
                        result: "failed".into(),
                        error: Some(failure.to_string()),
                    });
                }
            }
        }
        let mut report = FreezeReport::new(started_at, results);
        let frozen = match fsfreeze::freeze(&mountpoints) {
            Ok(frozen) => frozen,
            Err(e) => {
                self.resume_all(&quiesced);
                return fail(&mut state, report, CommandError::generic(e.to_string()));
            }
        };
        let count = frozen.len();
        report.filesystems = count;
        tracing::info!(
            filesystems = count,
            toolkits = ?report.toolkits,
            application_consistent = report.application_consistent,
            "frozen"
        );
        if count == 0 {
            // As qga: nothing frozen leaves the status "thawed", and nothing to thaw.
            self.resume_all(&quiesced);
            report.result = "nothing-frozen".into();
            state.last_freeze = Some(report);
            return Ok(json!(0));
        }
        state.generation += 1;
        let generation = state.generation;
        state.frozen = Some(Frozen {
            mountpoints: frozen,
            toolkits: quiesced,
            report,
            at: Instant::now(),
            generation,
        });
        drop(state);
        let agent = self.clone();
        let timeout = self.config.freeze_timeout;
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            let still_frozen = agent
                .lock()
                .frozen
                .as_ref()
                .is_some_and(|f| f.generation == generation);
            if still_frozen {
                tracing::warn!(
                    timeout_s = timeout.as_secs(),
                    "freeze not thawed in time; thawing"
                );
                let _ = agent.thaw("auto-thawed");
            }
        });
        Ok(json!(count))
    }

    /// Thaws what this agent froze (or, when it froze nothing, any frozen filesystem), then
    /// resumes the quiesced applications; returns the count thawed.
    pub(crate) fn thaw(&self, result: &str) -> Result<Value, CommandError> {
        let mut state = self.lock();
        let Some(frozen) = state.frozen.take() else {
            let count = fsfreeze::thaw_all().map_err(|e| CommandError::generic(e.to_string()))?;
            return Ok(json!(count));
        };
        let count = fsfreeze::thaw(&frozen.mountpoints);
        let window = frozen.at.elapsed();
        self.resume_all(&frozen.toolkits);
        tracing::info!(result, window_ms = window.as_millis() as u64, "thawed");
        let mut report = frozen.report;
        report.result = result.into();
        report.window_ms = window.as_millis() as u64;
        state.last_freeze = Some(report);
        Ok(json!(count))
    }

    fn resume_all(&self, toolkits: &[Toolkit]) {
        for toolkit in toolkits.iter().rev() {
            if let Err(failure) = toolkit.resume(self.config.script_timeout) {
                tracing::warn!(%failure, "resume script failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freeze_is_application_consistent_only_when_every_detected_toolkit_quiesced() {
        let result = |name: &str, ok: bool| ToolkitResult {
            name: name.into(),
            result: if ok { "quiesced" } else { "failed" }.into(),
            error: None,
        };
        assert!(!FreezeReport::new(0, Vec::new()).application_consistent);
        assert!(FreezeReport::new(0, vec![result("a", true)]).application_consistent);
        let mixed = FreezeReport::new(0, vec![result("a", true), result("b", false)]);
        assert!(!mixed.application_consistent);
        assert_eq!(mixed.toolkits, ["a"]);
    }
}
