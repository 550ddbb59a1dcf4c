//! The one way sealvm's binaries start and end: logs through `tracing` to stderr (filtered
//! by `RUST_LOG`), and an error turned into one line naming what failed, the whole cause
//! chain with `-v`, and an exit code that tells a script what kind of failure it was.

use std::process::ExitCode;

/// Exit code of a bad command line or bad input the user can fix (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failure while doing the work.
pub const EXIT_FAILURE: u8 = 1;

/// A mistake in what the user asked for (a malformed flag value, a missing option): the
/// binary exits with [`EXIT_USAGE`] when this is anywhere in the error's chain. It shows
/// as the error it wraps (its message and its causes), so marking an error as a usage
/// error adds no line to what the user reads.
#[derive(Debug)]
pub struct UsageError(pub Box<dyn std::error::Error + Send + Sync>);

impl UsageError {
    /// Marks `error` (an error value, an `anyhow::Error`, or a message) as a usage error.
    pub fn new(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        UsageError(error.into())
    }
}

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for UsageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// `error` as an `anyhow::Error` that exits with [`EXIT_USAGE`] (see [`UsageError`]).
pub fn usage(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> anyhow::Error {
    anyhow::Error::new(UsageError::new(error))
}

/// How much a binary logs when `RUST_LOG` does not say: its default, raised one level per
/// `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDefault {
    /// Warnings and errors only (commands that print their answer on stdout).
    Warn,
    /// Also what the process does (daemons: sockets served, volumes opened).
    Info,
}

/// Starts logging: `tracing` events to stderr, one line each, coloured only on a
/// terminal, filtered by `RUST_LOG` or else by `default` raised one level per `verbose`
/// (so `-v` on a daemon gives debug, `-vv` trace).
pub fn init_logging(default: LogDefault, verbose: u8) {
    const LEVELS: [&str; 4] = ["warn", "info", "debug", "trace"];
    let start = match default {
        LogDefault::Warn => 0,
        LogDefault::Info => 1,
    };
    let level = LEVELS[(start + usize::from(verbose)).min(LEVELS.len() - 1)];
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    // A second initialisation (a test calling in twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The `-v` flag every binary takes, counted: more logs per `-v`, and the error's whole
/// cause chain on failure. Binaries `#[command(flatten)]` it into their arguments.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct Verbosity {
    /// Log more (repeat for more), and print the full error chain on failure.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// A binary's whole life after parsing its arguments: starts logging
/// ([`init_logging`] with `default` and `verbosity`), runs `work`, and turns its result
/// into the exit code ([`finish`]).
pub fn run_main(
    binary: &str,
    default: LogDefault,
    verbosity: Verbosity,
    work: impl FnOnce() -> anyhow::Result<()>,
) -> ExitCode {
    init_logging(default, verbosity.verbose);
    finish(binary, verbosity.verbose > 0, work())
}

/// Turns a binary's result into its exit: nothing printed on success; on failure one line
/// `BINARY: what failed: why: ...` on stderr, each cause on its own line with `verbose`,
/// and [`EXIT_USAGE`] or [`EXIT_FAILURE`].
pub fn finish(binary: &str, verbose: bool, result: anyhow::Result<()>) -> ExitCode {
    let Err(error) = result else {
        return ExitCode::SUCCESS;
    };
    eprintln!("{binary}: {error:#}");
    if verbose {
        for (depth, cause) in error.chain().enumerate() {
            eprintln!("  {depth}: {cause}");
        }
    }
    ExitCode::from(exit_code(&error))
}

/// The exit code for `error`: [`EXIT_USAGE`] when a [`UsageError`] is in its chain (as an
/// error or as an `anyhow` context).
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some()
        || error.chain().any(|cause| cause.is::<UsageError>())
    {
        EXIT_USAGE
    } else {
        EXIT_FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_errors_exit_2_anywhere_in_the_chain() {
        let usage = anyhow::Error::new(UsageError::new("bad --memory")).context("run");
        assert_eq!(exit_code(&usage), EXIT_USAGE);
        let failure = anyhow::anyhow!("disk gone").context("run");
        assert_eq!(exit_code(&failure), EXIT_FAILURE);
    }

    #[test]
    fn usage_error_wrapped_as_a_source_is_found() {
        #[derive(Debug, thiserror::Error)]
        #[error("config rejected")]
        struct Outer(#[source] UsageError);
        let error = anyhow::Error::new(Outer(UsageError::new("x")));
        assert_eq!(exit_code(&error), EXIT_USAGE);
    }

    #[test]
    fn a_usage_error_reads_as_the_error_it_marks() {
        #[derive(Debug, thiserror::Error)]
        #[error("bad --volume 'x'")]
        struct BadVolume(#[source] std::io::Error);
        let error = usage(BadVolume(std::io::Error::other("no '=' in it")));
        assert_eq!(exit_code(&error), EXIT_USAGE);
        let lines: Vec<String> = error.chain().map(ToString::to_string).collect();
        assert_eq!(lines, ["bad --volume 'x'", "no '=' in it"]);
        let marked_anyhow = usage(anyhow::anyhow!("bad value").context("--args"));
        assert_eq!(exit_code(&marked_anyhow), EXIT_USAGE);
        assert_eq!(format!("{marked_anyhow:#}"), "--args: bad value");
    }
}
