//! The API socket: one JSON object per line in, one per line out, for every volume a
//! `serve` process serves (or the one point in time `pit expose` serves).
//!
//! Requests: `{"command": "volumes"}`, `{"command": "counters"}`,
//! `{"command": "bookmark", "name": NAME}`, `{"command": "bookmarks"}`,
//! `{"command": "retention"}` (the limits in force and how far history reaches) and
//! `{"command": "set-retention", "max-age-s": N, "max-bytes": N}` (either may be absent or
//! null: no limit; older history is folded away at once, in the background),
//! `{"command": "points"}` (what `pit list --json` shows),
//! consumer cursors (sealvm_journal::consumer): `{"command": "consumers"}` (each named
//! consumer's `name`, `seq`, `resync` and `lag-records`), `{"command":
//! "consumer-register", "name": NAME, "seq": N}` (`seq` absent: the latest record),
//! `{"command": "consumer-advance", "name": NAME, "seq": N}` and `{"command":
//! "consumer-remove", "name": NAME}`; `set-retention` also takes `consumer-budget` (bytes
//! of journal past which a lagging consumer is marked for resync; absent: no limit), and
//!
//! `{"command": "restore", "at": POINT, "to": FILE}` (answers when the file is complete),
//! and for an exposed point in time `{"command": "retarget", "at": POINT}`. Answers:
//! `{"return": VALUE}` or `{"error": TEXT}`.
//!
//! Every command but `volumes` and `retarget` takes `"volume": NAME`, which may be left out
//! when one volume is served. `bookmark` without a volume while several are served bookmarks
//! every journaled volume at one consistent point (no write to any of them falls between
//! the records) and answers `{"name", "seqs": {VOLUME: SEQ}}`; with one volume it answers
//! the bookmark (`name`, `seq`, `time_ns`).
//!
//! `counters` returns one object: requests completed and by kind (`requests-by-kind`:
//! `read`, `write`, `flush`, `get-id`, `discard`, `write-zeroes`, and `rejected` for chains
//! refused before they ran), `read-bytes`, `write-bytes`, `guest-errors`, `io-errors`,
//! `inflight-resubmitted` (requests in flight when a previous sealvm-blk stopped, served
//! again from the frontend's inflight region), `latency-us-log2` (the non-empty log2 buckets of service time as `{"from-us", "count"}`:
//! the bucket from 2^i µs holds requests served in 2^i to 2^(i+1) µs, the one from 1 µs
//! also those under 1 µs, the one from 2^23 µs everything longer), and for a journaled
//! volume `journal-bytes` (all segments), `journal-segments`, `last-seq`, `oldest-seq` and
//! `oldest-time-ns` (the oldest record still within reach; absent while there is none),
//! `folded-through-seq` (history up to here is folded into the base), `folded-segments`,
//! `journal-writes`, `journal-flushes` and `journal-syncs` (every fdatasync). `volumes`
//! lists every volume with the same fields, plus its name, path and for a journaled one
//! `journal-dir`, `writes`, `bytes-written` and `flushes`.

use crate::device::BlockDevice;
use crate::image_access::PointInTimeImage;
use crate::pit::{self, PointInTime};
use crate::volume::{JournaledVolume, Retention};
use sealvm_journal::consumer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The longest request line accepted.
const MAX_REQUEST: u64 = 64 * 1024;

/// What the API can see of one served volume.
#[derive(Clone)]
pub struct ServedVolume {
    /// Its name.
    pub name: String,
    /// The image path.
    pub path: PathBuf,
    /// The device serving it.
    pub device: Arc<BlockDevice>,
    /// Its journal, when journaling is on.
    pub journal: Option<Arc<JournaledVolume>>,
    /// The point-in-time view, when this is an exposed image.
    pub image: Option<Arc<PointInTimeImage>>,
}

#[derive(Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
enum ApiRequest {
    Volumes,
    Counters {
        volume: Option<String>,
    },
    Bookmark {
        name: String,
        volume: Option<String>,
    },
    Bookmarks {
        volume: Option<String>,
    },
    Retention {
        volume: Option<String>,
    },
    SetRetention {
        volume: Option<String>,
        #[serde(default, rename = "max-age-s")]
        max_age_s: Option<u64>,
        #[serde(default, rename = "max-bytes")]
        max_bytes: Option<u64>,
        #[serde(default, rename = "consumer-budget")]
        consumer_budget: Option<u64>,
    },
    Consumers {
        volume: Option<String>,
    },
    ConsumerRegister {
        volume: Option<String>,
        name: String,
        seq: Option<u64>,
    },
    ConsumerAdvance {
        volume: Option<String>,
        name: String,
        seq: u64,
    },
    ConsumerRemove {
        volume: Option<String>,
        name: String,
    },
    Points {
        volume: Option<String>,
    },
    Restore {
        volume: Option<String>,
        at: String,
        to: PathBuf,
    },
    Retarget {
        at: String,
    },
}

/// Serves the API for `volumes` on `path` on a background thread.
pub fn spawn(path: &Path, volumes: Vec<ServedVolume>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let volumes = Arc::new(volumes);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let volumes = volumes.clone();
            std::thread::spawn(move || {
                if let Err(e) = serve_client(stream, &volumes) {
                    tracing::debug!(error = %e, "API client failed");
                }
            });
        }
    });
    Ok(())
}

fn serve_client(stream: UnixStream, volumes: &[ServedVolume]) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if (&mut reader).take(MAX_REQUEST).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match serde_json::from_str::<ApiRequest>(&line) {
            Ok(request) => match handle(request, volumes) {
                Ok(value) => json!({ "return": value }),
                Err(e) => json!({ "error": e }),
            },
            Err(e) => json!({ "error": format!("bad request: {e}") }),
        };
        writer.write_all(format!("{answer}\n").as_bytes())?;
    }
}

/// The volume a request names, or the only one when it names none.
fn pick<'a>(volumes: &'a [ServedVolume], name: Option<&str>) -> Result<&'a ServedVolume, String> {
    let names = || {
        volumes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match (name, volumes) {
        (Some(name), _) => volumes
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| format!("no volume named {name:?}; volumes: {}", names())),
        (None, [only]) => Ok(only),
        (None, _) => Err(format!(
            "several volumes are served; name one with \"volume\": {}",
            names()
        )),
    }
}

fn journaled<'a>(
    volumes: &'a [ServedVolume],
    name: Option<&str>,
) -> Result<&'a JournaledVolume, String> {
    let volume = pick(volumes, name)?;
    volume
        .journal
        .as_deref()
        .ok_or_else(|| format!("volume {} is served without a journal", volume.name))
}

fn handle(request: ApiRequest, volumes: &[ServedVolume]) -> Result<Value, String> {
    match request {
        ApiRequest::Volumes => Ok(volumes.iter().map(describe).collect()),
        ApiRequest::Counters { volume } => Ok(counters(pick(volumes, volume.as_deref())?)),
        ApiRequest::Bookmark { name, volume: None } if volumes.len() > 1 => {
            // A bookmark across every journaled volume: one consistent point for the group.
            let group: Vec<&ServedVolume> =
                volumes.iter().filter(|v| v.journal.is_some()).collect();
            if group.is_empty() {
                return Err("no volume is served with a journal; bookmarks need one".into());
            }
            let journals: Vec<&JournaledVolume> =
                group.iter().filter_map(|v| v.journal.as_deref()).collect();
            let made = JournaledVolume::bookmark_group(&journals, &name)
                .map_err(|e| format!("bookmark failed: {e}"))?;
            let seqs: serde_json::Map<String, Value> = group
                .iter()
                .zip(&made)
                .map(|(v, b)| (v.name.clone(), json!(b.seq)))
                .collect();
            Ok(json!({"name": name, "seqs": seqs}))
        }
        ApiRequest::Bookmark { name, volume } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let bookmark = journal
                .bookmark(&name)
                .map_err(|e| format!("bookmark failed: {e}"))?;
            Ok(json!(bookmark))
        }
        ApiRequest::Bookmarks { volume } => {
            Ok(json!(journaled(volumes, volume.as_deref())?.bookmarks()))
        }
        ApiRequest::Retention { volume } => Ok(retention(journaled(volumes, volume.as_deref())?)),
        ApiRequest::SetRetention {
            volume,
            max_age_s,
            max_bytes,
            consumer_budget,
        } => {
            let journal = journaled(volumes, volume.as_deref())?;
            journal
                .set_retention(Retention {
                    max_age_s,
                    max_bytes,
                    consumer_budget,
                })
                .map_err(|e| format!("cannot change the retention: {e}"))?;
            Ok(retention(journal))
        }
        ApiRequest::Consumers { volume } => Ok(consumers(journaled(volumes, volume.as_deref())?)?),
        ApiRequest::ConsumerRegister { volume, name, seq } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let seq = seq.unwrap_or(journal.journal_position().1);
            let made =
                consumer::register(journal.journal_dir(), &name, seq).map_err(|e| e.to_string())?;
            Ok(json!(made))
        }
        ApiRequest::ConsumerAdvance { volume, name, seq } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let last = journal.journal_position().1;
            if seq > last {
                return Err(format!(
                    "seq {seq} is beyond the journal's last record {last}"
                ));
            }
            let moved =
                consumer::advance(journal.journal_dir(), &name, seq).map_err(|e| e.to_string())?;
            // The consumer may have released history that retention wants gone.
            journal.wake_folder();
            Ok(json!(moved))
        }
        ApiRequest::ConsumerRemove { volume, name } => {
            let journal = journaled(volumes, volume.as_deref())?;
            consumer::remove(journal.journal_dir(), &name).map_err(|e| e.to_string())?;
            journal.wake_folder();
            Ok(json!({}))
        }
        ApiRequest::Points { volume } => {
            let journal = journaled(volumes, volume.as_deref())?;
            Ok(json!(
                pit::points(journal.journal_dir()).map_err(|e| e.to_string())?
            ))
        }
        ApiRequest::Restore { volume, at, to } => {
            let served = pick(volumes, volume.as_deref())?;
            let journal = journaled(volumes, volume.as_deref())?;
            if to.exists() {
                return Err(format!(
                    "{} exists; restore writes a new file",
                    to.display()
                ));
            }
            let point: PointInTime = at.parse().map_err(|e: pit::PitError| e.to_string())?;
            let started = std::time::Instant::now();
            let seq = pit::resolve(journal.journal_dir(), &point).map_err(|e| e.to_string())?;
            pit::restore(&served.path, journal.journal_dir(), seq, &to, |_, _| {})
                .map_err(|e| e.to_string())?;
            Ok(json!({
                "seq": seq,
                "to": to.display().to_string(),
                "seconds": started.elapsed().as_secs_f64(),
            }))
        }
        ApiRequest::Retarget { at } => {
            let image = volumes
                .iter()
                .find_map(|v| v.image.as_ref())
                .ok_or("only an exposed point in time (pit expose) can be retargeted")?;
            let point: PointInTime = at.parse().map_err(|e: pit::PitError| e.to_string())?;
            // A sequence number needs no scan of the journal (the image checks it is not
            // beyond the end), so a retarget costs what lies between the two points.
            let seq = match point {
                PointInTime::Seq(seq) => seq,
                point => pit::resolve(image.journal_dir(), &point).map_err(|e| e.to_string())?,
            };
            let moved = image.retarget(seq).map_err(|e| e.to_string())?;
            Ok(json!(moved))
        }
    }
}

/// A volume's entry in `volumes`: its counters, name, path and journal totals.
fn describe(volume: &ServedVolume) -> Value {
    let mut entry = counters(volume);
    entry["name"] = json!(volume.name);
    entry["path"] = json!(volume.path.display().to_string());
    entry["journal"] = json!(volume.journal.is_some());
    if let Some(image) = &volume.image {
        entry["point-in-time-seq"] = json!(image.seq());
    }
    if let Some(journal) = &volume.journal {
        entry["journal-dir"] = json!(journal.journal_dir().display().to_string());
        entry["writes"] = json!(journal.counters.writes.load(Ordering::Relaxed));
        entry["bytes-written"] = json!(journal.counters.bytes_written.load(Ordering::Relaxed));
        entry["flushes"] = json!(journal.counters.flushes.load(Ordering::Relaxed));
    }
    entry
}

/// The named consumers of a journal and how far each lags.
fn consumers(journal: &JournaledVolume) -> Result<Value, String> {
    let last = journal.journal_position().1;
    let list = consumer::list(journal.journal_dir()).map_err(|e| e.to_string())?;
    Ok(list
        .into_iter()
        .map(|c| {
            let mut value = json!(c);
            value["lag-records"] = json!(last.saturating_sub(c.seq));
            value
        })
        .collect())
}

/// The retention in force and how far back history reaches.
fn retention(journal: &JournaledVolume) -> Value {
    let mut value = json!(journal.retention());
    value["folded-through-seq"] = json!(journal.base_seq());
    value["journal-bytes"] = json!(journal.journal_position().0);
    value["journal-segments"] = json!(journal.segment_count());
    if let Some(oldest) = journal.oldest_point() {
        value["oldest-seq"] = json!(oldest.seq);
        value["oldest-time-ns"] = json!(oldest.time_ns);
    }
    value
}

/// The `counters` object for `volume` (see the module documentation).
fn counters(volume: &ServedVolume) -> Value {
    let mut counters = volume.device.counters.to_json();
    if let Some(journal) = &volume.journal {
        let (bytes, last_seq) = journal.journal_position();
        let oldest = journal.oldest_point();
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        counters["journal-bytes"] = json!(bytes);
        counters["journal-segments"] = json!(journal.segment_count());
        counters["folded-through-seq"] = json!(journal.base_seq());
        counters["folded-segments"] = json!(load(&journal.counters.folded_segments));
        counters["last-seq"] = json!(last_seq);
        if let Some(oldest) = oldest {
            counters["oldest-seq"] = json!(oldest.seq);
            counters["oldest-time-ns"] = json!(oldest.time_ns);
        }
        counters["journal-writes"] = json!(load(&journal.counters.writes));
        counters["journal-flushes"] = json!(load(&journal.counters.flushes));
        counters["journal-syncs"] = json!(load(&journal.counters.syncs));
    }
    counters
}

/// Errors calling the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket could not be reached or the exchange broke off.
    #[error("cannot talk to the API socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The answer is not JSON.
    #[error("the API answered with malformed JSON")]
    Malformed(#[source] serde_json::Error),
    /// The API refused the request.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the API socket at `path` and returns its `return` value.
pub fn call(path: &Path, request: Value) -> Result<Value, ApiError> {
    let io_err = |source| ApiError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = UnixStream::connect(path).map_err(io_err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_err)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_err)?;
    let answer: Value = serde_json::from_str(&line).map_err(ApiError::Malformed)?;
    if let Some(error) = answer.get("error") {
        return Err(ApiError::Refused(
            error.as_str().unwrap_or("unknown error").into(),
        ));
    }
    Ok(answer["return"].clone())
}
