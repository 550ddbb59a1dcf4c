use anyhow::Context;
use clap::{Parser, Subcommand};
use sealvm_agent::{Agent, AgentClient, AgentConfig};
use sealvm_os::main_setup::{self, run_main, LogDefault};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// sealvm-agent — the guest agent for application-consistent snapshots.
///
/// Inside a guest, `sealvm-agent serve --path /dev/virtio-ports/org.qemu.guest_agent.0`
/// answers qemu-guest-agent protocol commands (guest-ping, guest-fsfreeze-*, guest-exec, ...)
/// and sealvm's extensions (sealvm-toolkits, sealvm-heartbeat). On the host,
/// `sealvm-agent client --socket AGENT.sock guest-ping` talks to it.
#[derive(Parser)]
#[command(name = "sealvm-agent", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    verbosity: main_setup::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the agent protocol on a virtio port (in the guest) or a unix socket.
    Serve {
        /// The virtio-serial or virtio-console port device to serve on.
        #[arg(long, required_unless_present = "unix", conflicts_with = "unix")]
        path: Option<PathBuf>,
        /// Listen on this unix socket instead (for testing on a host).
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Thaw a freeze by itself after this many seconds.
        #[arg(long, default_value_t = 60)]
        freeze_timeout: u64,
        /// Where user toolkits are read from.
        #[arg(long, default_value = sealvm_agent::toolkits::USER_TOOLKITS_DIR)]
        toolkits_dir: PathBuf,
        /// How long each toolkit script may run, in seconds.
        #[arg(long, default_value_t = 30)]
        script_timeout: u64,
    },
    /// Send one command to an agent through its host-side unix socket and print the answer.
    Client {
        /// The unix socket of the agent channel (QEMU's chardev, sealvm's --console socket).
        #[arg(long)]
        socket: PathBuf,
        /// The command, such as guest-ping or guest-fsfreeze-freeze.
        command: String,
        /// Its arguments as a JSON object.
        #[arg(long)]
        args: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("sealvm-agent", LogDefault::Info, cli.verbosity, || {
        run(cli.command)
    })
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            path,
            unix,
            freeze_timeout,
            toolkits_dir,
            script_timeout,
        } => {
            let agent = Agent::new(AgentConfig {
                freeze_timeout: Duration::from_secs(freeze_timeout),
                toolkits_dir,
                script_timeout: Duration::from_secs(script_timeout),
            });
            match (path, unix) {
                (Some(path), _) => sealvm_agent::server::serve_port(&agent, &path)?,
                (None, Some(unix)) => {
                    // serve_unix never returns on its own: SIGTERM and SIGINT end it, and take
                    // its socket file with it.
                    sealvm_os::signals::watch_termination(|signo| {
                        tracing::info!(
                            signal = sealvm_os::signals::name(signo),
                            "stopping: removing the socket"
                        );
                        sealvm_os::socket::remove_bound();
                        std::process::exit(0);
                    })
                    .context("cannot install the signal handlers")?;
                    sealvm_agent::server::serve_unix(&agent, &unix)?
                }
                (None, None) => unreachable!("clap requires --path or --unix"),
            }
            Ok(())
        }
        Command::Client {
            socket,
            command,
            args,
            timeout,
        } => {
            let timeout = Duration::from_secs(timeout);
            let args = args
                .map(|a| serde_json::from_str(&a))
                .transpose()
                .context("--args is not valid JSON")
                .map_err(main_setup::usage)?;
            let mut client = AgentClient::connect(&socket, timeout)?;
            let answer = client.execute(&command, args, timeout)?;
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(())
        }
    }
}
