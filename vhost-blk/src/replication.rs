//! `sealvm-blk receive` and `sealvm-blk replicate`: the replication transport over TCP,
//! around `sealvm-repl`'s sender and receiver. The receiver keeps a replica of each volume
//! under its `--dir` (`DIR/NAME/base.raw` and `DIR/NAME/journal`), so `sealvm-blk pit`
//! restores and exposes the replica's points in time as it does the primary's.
//!
//! With `--tls-cert`, both sides use mutual TLS (`sealvm-blk certs init` makes a CA and
//! certificates): a sender without a certificate from the receiver's CA is refused in the
//! handshake, and `--allow CLIENT:VOLUME` lets only the sender whose certificate names
//! CLIENT write VOLUME.
//!
//! Not built yet (issue #14): synchronous mode (acknowledging a guest's flush only once the
//! replica has it), the sender inside `serve` (it follows the journal from another process
//! by polling), snapshot mode, resync, consistency groups.

use anyhow::{bail, Context};
use rustls::pki_types::CertificateDer;
use sealvm_repl::receiver;
use sealvm_repl::sender::{self, SendConfig};
use sealvm_repl::tls;
use std::io::Write;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// VOLUME, or CLIENT:VOLUME with TLS: a volume senders may replicate (repeat it). With
    /// CLIENT, only a sender whose certificate names CLIENT may. Without any --allow, every
    /// volume is accepted from any sender.
    #[arg(long = "allow")]
    pub allow: Vec<String>,
    /// This receiver's certificate (PEM); turns on mutual TLS.
    #[arg(long, requires_all = ["tls_key", "client_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This receiver's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA whose certificates senders must show.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
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
    /// This sender's certificate (PEM); turns on mutual TLS.
    #[arg(long, requires_all = ["tls_key", "ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This sender's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA the receiver's certificate must come from.
    #[arg(long, requires = "tls_cert")]
    pub ca: Option<PathBuf>,
    /// The name the receiver's certificate must carry (default: the host of --to).
    #[arg(long, requires = "tls_cert")]
    pub server_name: Option<String>,
}

/// `sealvm-blk certs init`: a CA and certificates for a receiver and its senders.
#[derive(Debug, clap::Args)]
pub struct CertsInitArgs {
    /// Folder to write them to (files there are never overwritten).
    #[arg(long)]
    pub dir: PathBuf,
    /// A DNS name or IP address of the receiver, as senders write it in --to (repeat it).
    #[arg(long = "receiver-name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    pub receiver_names: Vec<String>,
    /// A sender's name, which its certificate carries and --allow CLIENT:VOLUME names
    /// (repeat it).
    #[arg(long = "sender")]
    pub senders: Vec<String>,
}

/// Runs `sealvm-blk certs init`.
pub fn certs_init(args: CertsInitArgs) -> anyhow::Result<()> {
    let files = tls::init_certs(&args.dir, &args.receiver_names, &args.senders)?;
    println!("CA: {}", files.ca.display());
    println!(
        "receiver: --tls-cert {} --tls-key {} --client-ca {}",
        files.receiver.0.display(),
        files.receiver.1.display(),
        files.ca.display()
    );
    for (name, cert, key) in files.senders {
        println!(
            "sender {name}: --tls-cert {} --tls-key {} --ca {}",
            cert.display(),
            key.display(),
            files.ca.display()
        );
    }
    Ok(())
}

/// Who may write which volume.
#[derive(Debug, Clone)]
struct Allow {
    /// VOLUME rules: anyone.
    anyone: Vec<String>,
    /// CLIENT:VOLUME rules.
    client: Vec<(String, String)>,
}

impl Allow {
    fn parse(rules: &[String], tls: bool) -> anyhow::Result<Option<Allow>> {
        if rules.is_empty() {
            return Ok(None);
        }
        let mut allow = Allow {
            anyone: Vec::new(),
            client: Vec::new(),
        };
        for rule in rules {
            match rule.split_once(':') {
                Some(_) if !tls => bail!(
                    "--allow {rule}: naming a client needs mutual TLS (--tls-cert, --tls-key, --client-ca)"
                ),
                Some((client, volume)) => allow.client.push((client.into(), volume.into())),
                None => allow.anyone.push(rule.clone()),
            }
        }
        Ok(Some(allow))
    }

    /// The volumes the peer showing `peer` may write.
    fn for_peer(&self, peer: Option<&CertificateDer<'_>>) -> Vec<String> {
        let mut volumes = self.anyone.clone();
        if let Some(peer) = peer {
            volumes.extend(
                self.client
                    .iter()
                    .filter(|(client, _)| tls::names(peer, client))
                    .map(|(_, volume)| volume.clone()),
            );
        }
        volumes
    }
}

/// Runs `sealvm-blk receive`.
pub fn receive(args: ReceiveArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create the replica folder {}", args.dir.display()))?;
    let tls = match (&args.tls_cert, &args.tls_key, &args.client_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(tls::server_config(cert, key, ca)?),
        _ => None,
    };
    let allow = Allow::parse(&args.allow, tls.is_some())?;
    let listener = TcpListener::bind(&args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let local = listener.local_addr()?;
    if tls.is_none() && !local.ip().is_loopback() {
        tracing::warn!(%local, "receiving without TLS: anyone who can connect can write replicas");
    }
    tracing::info!(listen = %local, dir = %args.dir.display(), tls = tls.is_some(), "receiving replication");
    loop {
        let (stream, peer) = listener.accept().context("accepting a connection")?;
        let _ = stream.set_nodelay(true);
        let dir = args.dir.clone();
        let allow = allow.clone();
        let tls = tls.clone();
        let connection = move || -> anyhow::Result<receiver::SessionReport> {
            match tls {
                None => {
                    let permitted = allow.map(|a| a.for_peer(None));
                    let mut stream = stream;
                    Ok(receiver::serve_connection(&dir, permitted, &mut stream)?)
                }
                Some(config) => {
                    let conn = rustls::ServerConnection::new(config)?;
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    while tls.conn.is_handshaking() {
                        tls.conn
                            .complete_io(&mut tls.sock)
                            .context("TLS handshake with the sender")?;
                    }
                    let client = tls.conn.peer_certificates().and_then(|c| c.first());
                    let permitted = allow.map(|a| a.for_peer(client));
                    let report = receiver::serve_connection(&dir, permitted, &mut tls)?;
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    Ok(report)
                }
            }
        };
        if args.once {
            let report = connection().with_context(|| format!("replication from {peer}"))?;
            println!(
                "received {} records of volume {} from {peer}; durable through seq {}",
                report.records, report.volume, report.durable_seq
            );
            return Ok(());
        }
        std::thread::Builder::new()
            .name("repl-receive".into())
            .spawn(move || match connection() {
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
            })
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
    let tls = match (&args.tls_cert, &args.tls_key, &args.ca) {
        (Some(cert), Some(key), Some(ca)) => {
            let host = match &args.server_name {
                Some(name) => name.clone(),
                None => host_of(&args.to).to_owned(),
            };
            Some((tls::client_config(cert, key, ca)?, tls::server_name(&host)?))
        }
        _ => None,
    };
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, on_stop as *const () as libc::sighandler_t) };
    }
    let mut backoff = Duration::from_millis(200);
    loop {
        let once = args.once;
        let keep_going = || !once && !STOP.load(Ordering::Relaxed);
        let result = connect(&args.to)
            .and_then(|stream| match &tls {
                None => {
                    let mut stream = stream;
                    Ok(sender::ship(&config, &mut stream, None, keep_going)?)
                }
                Some((client, server_name)) => {
                    let conn =
                        rustls::ClientConnection::new(Arc::clone(client), server_name.clone())?;
                    let mut tls = rustls::StreamOwned::new(conn, stream);
                    let report = sender::ship(&config, &mut tls, None, keep_going)?;
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                    Ok(report)
                }
            })
            .map_err(|error| {
                let garbled = error
                    .chain()
                    .any(|cause| cause.is::<sealvm_repl::DecodeError>());
                if tls.is_none() && garbled {
                    error.context("the receiver's answer is not the replication protocol: does it require TLS (--tls-cert, --tls-key, --ca)?")
                } else {
                    error
                }
            })
            .with_context(|| format!("replicating {} to {}", args.name, args.to));
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

/// The host part of HOST:PORT (an IPv6 address in brackets loses them).
fn host_of(to: &str) -> &str {
    let host = to.rsplit_once(':').map_or(to, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
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
