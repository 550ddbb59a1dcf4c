//! `sealvm-blk receive` and `sealvm-blk replicate`: the replication transport over TCP,
//! around `sealvm-repl`'s sender and receiver. The receiver keeps a replica of each volume
//! under its `--dir` (`DIR/NAME/base.raw` and `DIR/NAME/journal`), so `sealvm-blk pit`
//! restores and exposes the replica's points in time as it does the primary's.
//!
//! Not built yet (issue #14): TLS, synchronous mode (acknowledging a guest's flush only
//! once the replica has it), the sender inside `serve` (it follows the journal from another
//! process by polling), snapshot mode, resync.

use anyhow::{bail, Context};
use sealvm_repl::receiver;
use sealvm_repl::sender::{self, SendConfig};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// `sealvm-blk receive`: accept replication streams and keep replicas.
#[derive(Debug, clap::Args)]
pub struct ReceiveArgs {
    /// Address to listen on, e.g. 0.0.0.0:7400.
    #[arg(long)]
    pub listen: String,
    /// Folder of the replicas: one subfolder per volume name.
    #[arg(long)]
    pub dir: PathBuf,
    /// A volume name senders may replicate (repeat it); without any, every name is
    /// accepted.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// Serve one connection, then exit (its status says how it went).
    #[arg(long)]
    pub once: bool,
}

/// `sealvm-blk replicate`: ship a volume's journal to a receiver.
#[derive(Debug, clap::Args)]
pub struct ReplicateArgs {
    /// The volume's journal folder (the journal= of its --volume).
    #[arg(long)]
    pub journal: PathBuf,
    /// The volume's name at the receiver.
    #[arg(long)]
    pub name: String,
    /// The receiver's address, HOST:PORT.
    #[arg(long)]
    pub to: String,
    /// Exit once the replica has every record the journal holds now; without it, keep
    /// following the journal and reconnect after errors until interrupted.
    #[arg(long)]
    pub once: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `sealvm-blk receive`.
pub fn receive(args: ReceiveArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the replica folder {}", args.dir.display()))?;
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, dir = %args.dir.display(), "receiving replication");
    let permitted = (!args.allow.is_empty()).then(|| args.allow.clone());
    loop {
        let (mut stream, peer) = listener.accept().context("accepting a connection")?;
        let _ = stream.set_nodelay(true);
        if args.once {
            let report = receiver::serve_connection(&args.dir, permitted, &mut stream)
                .with_context(|| format!("replication from {peer}"))?;
            println!(
                "received {} records of volume {} from {peer}; durable through seq {}",
                report.records, report.volume, report.durable_seq
            );
            return Ok(());
        }
        let dir = args.dir.clone();
        let permitted = permitted.clone();
        std::thread::Builder::new()
            .name("repl-receive".into())
            .spawn(
                move || match receiver::serve_connection(&dir, permitted, &mut stream) {
                    Ok(report) => tracing::info!(
                        %peer,
                        volume = report.volume,
                        records = report.records,
                        durable_seq = report.durable_seq,
                        "replication connection ended"
                    ),
                    Err(error) => {
                        tracing::warn!(%peer, error = format!("{error:#}"), "replication connection failed")
                    }
                },
            )
            .context("starting a receiver thread")?;
    }
}

/// Runs `sealvm-blk replicate`.
pub fn replicate(args: ReplicateArgs) -> anyhow::Result<()> {
    if !sender::is_journal(&args.journal) {
        bail!(
            "{} is not a journal folder (no state.json): give the journal= of the volume",
            args.journal.display()
        );
    }
    let config = SendConfig::new(args.journal.clone(), args.name.clone());
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_stop as *const () as libc::sighandler_t) };
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let result = connect(&args.to).and_then(|mut stream| {
            let once = args.once;
            sender::ship(&config, &mut stream, None, || {
                !once && !STOP.load(Ordering::Relaxed)
            })
            .with_context(|| format!("replicating {} to {}", args.name, args.to))
        });
        match result {
            Ok(report) => {
                if args.json {
                    println!(
                        "{}",
                        serde_json::json!({
                            "volume": args.name,
                            "resumed-after": report.resumed_after,
                            "records": report.records,
                            "bytes": report.bytes,
                            "acked": report.acked,
                        })
                    );
                } else {
                    println!(
                        "replicated {} records ({} bytes) of {} to {}; the replica is durable through seq {}",
                        report.records, report.bytes, args.name, args.to, report.acked
                    );
                }
                return Ok(());
            }
            Err(error) if args.once => return Err(error),
            Err(error) => {
                if STOP.load(Ordering::Relaxed) {
                    return Err(error);
                }
                tracing::warn!(error = format!("{error:#}"), retry_in = ?backoff, "replication interrupted");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn connect(to: &str) -> anyhow::Result<TcpStream> {
    let addr = to
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {to}"))?
        .next()
        .with_context(|| format!("{to} resolves to no address"))?;
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("cannot connect to {to}"))?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}
