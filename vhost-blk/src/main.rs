use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use sealvm_blk::api::{self, ServedVolume};
use sealvm_blk::config::ServeConfig;
use sealvm_blk::device::BlockDevice;
use sealvm_blk::image_access::PointInTimeImage;
use sealvm_blk::pit::{self, PointInTime};
use sealvm_blk::volume::JournaledVolume;
use sealvm_os::main_setup::{self, run_main, LogDefault};
use sealvm_virtio_blk::{BlockBackend, RawFile};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::GuestMemoryAtomic;

/// sealvm-blk — a vhost-user-blk backend that journals every write.
///
/// Serves a volume to QEMU (`-device vhost-user-blk-pci`), cloud-hypervisor or sealvm over
/// a vhost-user socket. With a journal, every write becomes a journal record and the base
/// image is never written, so any point in time can be bookmarked and restored. Retention
/// (retain=, retain-bytes=) bounds how far back that reaches: older history is folded into
/// a copy of the image in the journal directory, in the background.
///
/// Example:
///   sealvm-blk serve --volume web1=web1.raw,journal=web1.journal,retain=24h --socket web1.sock --api-socket web1.api
///   sealvm-blk bookmark --api-socket web1.api before-upgrade
///   sealvm-blk pit restore --base web1.raw --journal web1.journal --at before-upgrade --to restored.raw
#[derive(Parser)]
#[command(name = "sealvm-blk", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    verbosity: main_setup::Verbosity,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve volumes, each on its own vhost-user socket, until interrupted.
    ///
    /// Several volumes: repeat --volume, and give each a socket with socket= or a --socket
    /// (matched in order). Or describe them in a TOML file with --config.
    #[command(verbatim_doc_comment)]
    Serve {
        /// NAME=PATH[,journal=DIR][,readonly][,write-through][,retain=AGE][,retain-bytes=SIZE]
        /// [,consumer-budget=SIZE][,segment-size=SIZE]: the raw image to serve. With a journal every write is
        /// journaled and PATH is never written; retain= (30m, 24h, 7d) and retain-bytes=
        /// (512M, 10G) bound how far back points in time reach (default: no limit), and
        /// history older than that is folded away a segment (segment-size=, default 64M) at
        /// a time. Named consumers (replication, backups) hold history they have not
        /// consumed until the journal passes consumer-budget=; then they are marked for
        /// resync.
        /// Also: socket=PATH (instead of a --socket) and queues=N.
        #[arg(long, required_unless_present = "config")]
        volume: Vec<String>,
        /// The vhost-user socket of each --volume without socket=, in order.
        #[arg(long)]
        socket: Vec<PathBuf>,
        /// A TOML file listing the volumes ([[volume]] tables with name, path, socket and
        /// the --volume options as keys; see vhost-blk/src/config.rs).
        #[arg(long, conflicts_with_all = ["volume", "socket"])]
        config: Option<PathBuf>,
        /// A unix socket for the JSON API of every volume (bookmarks, counters, retention).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Request queues per volume (one worker thread each), unless queues= says otherwise.
        #[arg(long, default_value_t = 1)]
        queues: usize,
    },
    /// Make a bookmark on a served volume, optionally application-consistent.
    Bookmark {
        /// The volume's API socket.
        #[arg(long)]
        api_socket: PathBuf,
        /// Freeze the guest through its agent (the host end of its agent channel) around the
        /// bookmark, so applications quiesce first.
        #[arg(long)]
        agent_socket: Option<PathBuf>,
        /// Refuse (thaw, make no bookmark) unless every application the agent detected
        /// quiesced; without it, a freeze whose toolkits failed or found nothing gives a
        /// bookmark reported as crash-consistent.
        #[arg(long, requires = "agent_socket")]
        require_application_consistent: bool,
        /// The bookmark's name.
        name: String,
    },
    /// Points in time: list them, restore one to a file, or expose one as a device.
    Pit {
        #[command(subcommand)]
        command: PitCommand,
    },
    /// The journal itself: convert its format.
    Journal {
        #[command(subcommand)]
        command: JournalCommand,
    },
    /// Keep replicas of volumes other hosts replicate here (DIR/NAME/ for each).
    Receive(sealvm_blk::replication::ReceiveArgs),
    /// Ship a volume's journal to a receiver, resuming where the replica stands.
    Replicate(sealvm_blk::replication::ReplicateArgs),
    /// Certificates for replication's mutual TLS.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a CA, a receiver certificate and sender certificates (a test or small site).
    Init(sealvm_blk::replication::CertsInitArgs),
}

#[derive(Subcommand)]
enum JournalCommand {
    /// Convert a format-version-1 journal to version 2 (needed to serve it; `pit` reads
    /// both). Crash-safe, one segment at a time; run it again to finish an interrupted
    /// upgrade. The volume must not be served meanwhile.
    Upgrade {
        /// The base image the journal started from.
        #[arg(long)]
        base: PathBuf,
        /// The journal directory.
        #[arg(long)]
        journal: PathBuf,
    },
}

#[derive(Subcommand)]
enum PitCommand {
    /// Show how far back the journal reaches and its bookmarks.
    List {
        /// The journal directory.
        #[arg(long)]
        journal: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the volume as it was at a point in time as a new vhost-user-blk device, without
    /// copying it (image access). Writes, with --writable, go to a throw-away overlay. The
    /// API's retarget command moves it to another point in time.
    Expose {
        /// The base image the journal started from.
        #[arg(long)]
        base: PathBuf,
        /// The journal directory (the live volume may keep writing to it).
        #[arg(long)]
        journal: PathBuf,
        /// latest, a sequence number, @UNIX_SECONDS, or a bookmark name.
        #[arg(long)]
        at: PointInTime,
        /// The vhost-user socket to serve the point in time on.
        #[arg(long)]
        socket: PathBuf,
        /// A unix socket for the JSON API (retarget, counters).
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Accept writes into a throw-away overlay (otherwise the device is read-only).
        #[arg(long)]
        writable: bool,
    },
    /// Write the volume as it was at a point in time to a new file.
    Restore {
        /// The base image the journal started from.
        #[arg(long)]
        base: PathBuf,
        /// The journal directory.
        #[arg(long)]
        journal: PathBuf,
        /// latest, a sequence number, @UNIX_SECONDS, or a bookmark name.
        #[arg(long)]
        at: PointInTime,
        /// Where to write the restored image (must not exist).
        #[arg(long)]
        to: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    run_main("sealvm-blk", LogDefault::Info, cli.verbosity, || {
        run(cli.command)
    })
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            volume,
            socket,
            config: Some(file),
            api_socket,
            ..
        } => {
            debug_assert!(volume.is_empty() && socket.is_empty());
            let mut config = sealvm_blk::config::from_file(&file)?;
            if api_socket.is_some() {
                config.api_socket = api_socket;
            }
            serve(config)
        }
        Command::Serve {
            volume,
            socket,
            config: None,
            api_socket,
            queues,
        } => serve(
            sealvm_blk::config::from_args(&volume, &socket, api_socket, queues)
                .map_err(main_setup::usage)?,
        ),
        Command::Bookmark {
            api_socket,
            agent_socket,
            require_application_consistent,
            name,
        } => bookmark(
            &api_socket,
            agent_socket.as_deref(),
            require_application_consistent,
            &name,
        ),
        Command::Journal {
            command: JournalCommand::Upgrade { base, journal },
        } => {
            let report = sealvm_journal::upgrade::upgrade(&journal, &base)?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Receive(args) => sealvm_blk::replication::receive(args),
        Command::Replicate(args) => sealvm_blk::replication::replicate(args),
        Command::Certs {
            command: CertsCommand::Init(args),
        } => sealvm_blk::replication::certs_init(args),
        Command::Pit { command } => match command {
            PitCommand::List { journal, json } => pit_list(&journal, json),
            PitCommand::Expose {
                base,
                journal,
                at,
                socket,
                api_socket,
                writable,
            } => {
                let seq = pit::resolve(&journal, &at)?;
                let image = Arc::new(PointInTimeImage::open(&base, &journal, seq, writable)?);
                tracing::info!(seq, writable, "exposing point in time");
                let device = Arc::new(BlockDevice::new(image.clone(), !writable, 1));
                // SIGTERM/SIGINT: remove the sockets and exit 0 (nothing to make durable: an
                // exposed point in time writes no journal).
                sealvm_blk::shutdown::stop_on_signals(Vec::new())
                    .context("cannot install the signal handlers")?;
                let (listener, _socket_file) = bind_vhost(&socket)?;
                let _api_socket_file = match &api_socket {
                    Some(api_socket) => Some(
                        api::spawn(
                            api_socket,
                            vec![ServedVolume {
                                name: "point-in-time".into(),
                                path: base.clone(),
                                device: device.clone(),
                                journal: None,
                                image: Some(image),
                            }],
                        )
                        .with_context(|| {
                            format!("cannot listen on the API socket {}", api_socket.display())
                        })?,
                    ),
                    None => None,
                };
                serve_device("point-in-time", device, listener, &socket)
            }
            PitCommand::Restore {
                base,
                journal,
                at,
                to,
            } => {
                if to.exists() {
                    bail!("{} exists; restore writes a new file", to.display());
                }
                let seq = pit::resolve(&journal, &at)?;
                let started = Instant::now();
                // A progress bar on a terminal; nothing when stderr is a pipe or a file.
                let bar = indicatif::ProgressBar::new(0);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "restore [{elapsed_precise}] {wide_bar} {pos}/{len} records (eta {eta})",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                pit::restore(&base, &journal, seq, &to, |done, of| {
                    bar.set_length(of);
                    bar.set_position(done);
                })?;
                bar.finish_and_clear();
                println!(
                    "restored {} at record {seq} to {} in {:.2} s",
                    base.display(),
                    to.display(),
                    started.elapsed().as_secs_f64()
                );
                Ok(())
            }
        },
    }
}

fn serve(config: ServeConfig) -> anyhow::Result<()> {
    let mut served = Vec::new();
    for volume in &config.volumes {
        let (backend, journal): (Arc<dyn BlockBackend>, Option<Arc<JournaledVolume>>) =
            match &volume.journal {
                Some(dir) => {
                    let (journaled, opened) =
                        JournaledVolume::open_with(&volume.path, dir, volume.options)
                            .with_context(|| format!("volume {}", volume.name))?;
                    let retention = volume.options.retention;
                    tracing::info!(
                        volume = %volume.name,
                        records = opened.records,
                        dropped_bytes = opened.dropped_bytes,
                        journal = %dir.display(),
                        retain_s = retention.max_age_s,
                        retain_bytes = retention.max_bytes,
                        "journal replayed"
                    );
                    let journaled = Arc::new(journaled);
                    journaled.start_folder(Duration::from_secs(1));
                    (journaled.clone(), Some(journaled))
                }
                None => (
                    Arc::new(
                        RawFile::open(&volume.path, volume.read_only)
                            .with_context(|| format!("volume {}", volume.name))?,
                    ),
                    None,
                ),
            };
        served.push(ServedVolume {
            name: volume.name.clone(),
            path: volume.path.clone(),
            device: Arc::new(BlockDevice::new(backend, volume.read_only, volume.queues)),
            journal,
            image: None,
        });
    }
    // SIGTERM/SIGINT: stop taking records, fdatasync every journal, exit 0.
    sealvm_blk::shutdown::stop_on_signals(
        served.iter().filter_map(|v| v.journal.clone()).collect(),
    )
    .context("cannot install the signal handlers")?;
    // Every socket is bound before any is served, so a refused path stops the process
    // before a frontend or client could connect; the guards remove the files on the way out.
    let mut listeners = Vec::new();
    let mut socket_files = Vec::new();
    for volume in &config.volumes {
        let (listener, socket_file) = bind_vhost(&volume.socket)?;
        listeners.push(listener);
        socket_files.push(socket_file);
    }
    if let Some(api_socket) = &config.api_socket {
        let socket_file = api::spawn(api_socket, served.clone())
            .with_context(|| format!("cannot listen on the API socket {}", api_socket.display()))?;
        socket_files.push(socket_file);
    }
    // One thread per volume; the first that fails ends the process with its error.
    let (failed, failure) = std::sync::mpsc::channel();
    for ((volume, config), listener) in served.into_iter().zip(&config.volumes).zip(listeners) {
        let failed = failed.clone();
        let socket = config.socket.clone();
        std::thread::Builder::new()
            .name(format!("serve-{}", volume.name))
            .spawn(move || {
                let result = serve_device(&volume.name, volume.device, listener, &socket)
                    .with_context(|| format!("volume {}", volume.name));
                let _ = failed.send(result);
            })
            .context("cannot start a volume's thread")?;
    }
    drop(failed);
    match failure.recv() {
        Ok(result) => result,
        Err(_) => bail!("every volume stopped"),
    }
}

/// Binds a vhost-user socket at `socket` (refusing a file that is not a socket and a socket
/// another process serves; replacing only a stale one), with the guard that removes it.
fn bind_vhost(
    socket: &std::path::Path,
) -> anyhow::Result<(vhost::vhost_user::Listener, sealvm_os::socket::RemoveOnDrop)> {
    let (listener, socket_file) = sealvm_os::socket::bind_removing(socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    // A listener made from a bound socket does not unlink the path when dropped: the guard
    // does, and only while the file is still this socket.
    Ok((vhost::vhost_user::Listener::from(listener), socket_file))
}

/// Serves `device` on `listener` (bound at `socket`), one frontend at a time, forever.
fn serve_device(
    name: &str,
    device: Arc<BlockDevice>,
    listener: vhost::vhost_user::Listener,
    socket: &std::path::Path,
) -> anyhow::Result<()> {
    tracing::info!(volume = %name, socket = %socket.display(), "serving");
    // One frontend at a time; when it disconnects, wait for the next (a rebooted VM). The
    // socket stays bound throughout, so a frontend that reconnects at once finds it.
    loop {
        // A daemon per connection: vhost-user ownership (SET_OWNER) belongs to one frontend.
        let mut daemon = VhostUserDaemon::new(
            format!("sealvm-blk-{name}"),
            device.clone(),
            GuestMemoryAtomic::new(vm_memory::GuestMemoryMmap::new()),
        )
        .map_err(|e| anyhow::anyhow!("cannot create the vhost-user daemon: {e}"))?;
        let frontend = loop {
            if let Some(frontend) = listener
                .accept()
                .with_context(|| format!("cannot accept on {}", socket.display()))?
            {
                break frontend;
            }
        };
        // The inflight messages are answered beside the daemon's handler (INFLIGHT_SHMFD).
        let connection = sealvm_blk::inflight::serve_connection(
            frontend,
            device.inflight_slots(),
            sealvm_blk::device::QUEUE_SIZE,
            |listener| {
                daemon
                    .start(listener)
                    .map_err(|e| std::io::Error::other(e.to_string()))
            },
        )
        .context("cannot serve the frontend")?;
        let result = daemon.wait();
        connection.finish();
        // Stop this connection's queue workers before the next frontend gets new ones.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            // A frontend that goes away (the VM shut down) is the normal end of a connection.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("frontend disconnected; waiting for the next one"),
            Err(e) => {
                tracing::warn!(error = %e, "frontend connection ended with an error; waiting for the next one")
            }
        }
    }
}

/// The API request that bookmarks the served volume.
fn bookmark_request(name: &str) -> api::protocol::Request {
    api::protocol::Request::Bookmark {
        name: name.into(),
        volume: None,
    }
}

fn bookmark(
    api_socket: &std::path::Path,
    agent: Option<&std::path::Path>,
    require_application_consistent: bool,
    name: &str,
) -> anyhow::Result<()> {
    let Some(agent) = agent else {
        let made = api::call(api_socket, bookmark_request(name))?;
        println!("{}", serde_json::to_string_pretty(&made)?);
        return Ok(());
    };
    let timeout = Duration::from_secs(60);
    let mut client = sealvm_agent::AgentClient::connect(agent, timeout)
        .context("cannot reach the guest agent")?;
    let started = Instant::now();
    let frozen = client
        .execute("guest-fsfreeze-freeze", None, timeout)
        .context("the guest could not be frozen; no bookmark was made")?;
    // What the agent's toolkits did for this freeze (sealvm-agent's heartbeat answers while
    // frozen; another agent has no such report, so the bookmark is crash-consistent).
    let freeze = client
        .execute("sealvm-heartbeat", None, timeout)
        .ok()
        .and_then(|h| h.get("current-freeze").cloned())
        .unwrap_or(json!({}));
    let application_consistent = freeze["application-consistent"] == json!(true);
    if require_application_consistent && !application_consistent {
        let thawed = client.execute("guest-fsfreeze-thaw", None, timeout);
        thawed.context("thaw failed")?;
        anyhow::bail!(
            "the guest's applications did not all quiesce, so no bookmark was made (toolkits: {})",
            freeze.get("toolkit-results").cloned().unwrap_or(json!([]))
        );
    }
    let made = api::call(api_socket, bookmark_request(name));
    // Thaw whatever happened to the bookmark.
    let thawed = client.execute("guest-fsfreeze-thaw", None, timeout);
    let window = started.elapsed();
    let made = made?;
    thawed.context("thaw failed after the bookmark")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "bookmark": made,
            "application-consistent": application_consistent,
            "consistency": if application_consistent { "application-consistent" } else { "crash-consistent" },
            "filesystems-frozen": frozen,
            "toolkits": freeze.get("toolkits").cloned().unwrap_or(json!([])),
            "toolkit-results": freeze.get("toolkit-results").cloned().unwrap_or(json!([])),
            "freeze-window-ms": window.as_millis() as u64,
        }))?
    );
    Ok(())
}

fn pit_list(journal_dir: &std::path::Path, as_json: bool) -> anyhow::Result<()> {
    let points = pit::points(journal_dir)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&points)?);
        return Ok(());
    }
    let span = points.oldest_time_ns.map_or(0.0, |t| {
        points.newest_time_ns.saturating_sub(t) as f64 / 1e9
    });
    println!(
        "points in time: seq {}..{} ({} records, {span:.3} s of history, {} bytes in {} segments)",
        points.oldest_seq, points.last_seq, points.records, points.journal_bytes, points.segments,
    );
    if points.format_version < sealvm_journal::format::VERSION {
        println!(
            "journal format version {}: readable; serve it after `sealvm-blk journal upgrade`",
            points.format_version
        );
    }
    if points.folded_through_seq > 0 {
        println!(
            "history up to seq {} is folded into the base (retention)",
            points.folded_through_seq
        );
    }
    for c in &points.consumers {
        println!(
            "consumer {:<23} seq {:>10}  {}",
            c.name,
            c.seq,
            if c.resync {
                "needs resync: the journal passed its consumer budget"
            } else {
                "holds history after its seq"
            }
        );
    }
    for b in points.bookmarks {
        println!(
            "bookmark {:<24} seq {:>10}  @{:.3}",
            b.name,
            b.seq,
            b.time_ns as f64 / 1e9
        );
    }
    Ok(())
}
