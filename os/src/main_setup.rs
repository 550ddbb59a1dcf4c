//! The one way sealvm's binaries start and end: logs through `tracing` to stderr (filtered
//! by `RUST_LOG`), and an error turned into one line naming what failed, the whole cause
//! chain with `-v`, and an exit code that tells a script what kind of failure it was.

use std::process::ExitCode;

/// Exit code of a bad command line or bad input the user can fix (as clap uses).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a failure while doing the work.
pub const EXIT_FAILURE: u8 = 1;

/// A mistake in what the user asked for (a malformed flag value, a missing option): the
/// binary exits with [`EXIT_USAGE`] when this is anywhere in the error's chain.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Starts logging: `tracing` events to stderr, filtered by `RUST_LOG` (warnings and errors
/// when it is unset).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second initialisation (a test calling in twice) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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

/// The exit code for `error`: [`EXIT_USAGE`] when a [`UsageError`] is in its chain.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if error.chain().any(|cause| cause.is::<UsageError>()) {
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
        let usage = anyhow::Error::new(UsageError("bad --memory".into())).context("run");
        assert_eq!(exit_code(&usage), EXIT_USAGE);
        let failure = anyhow::anyhow!("disk gone").context("run");
        assert_eq!(exit_code(&failure), EXIT_FAILURE);
    }

    #[test]
    fn usage_error_wrapped_as_a_source_is_found() {
        #[derive(Debug, thiserror::Error)]
        #[error("config rejected")]
        struct Outer(#[source] UsageError);
        let error = anyhow::Error::new(Outer(UsageError("x".into())));
        assert_eq!(exit_code(&error), EXIT_USAGE);
    }
}
