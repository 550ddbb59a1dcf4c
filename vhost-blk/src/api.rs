//! The API socket: one JSON object per line in, one per line out.
//!
//! Requests: `{"command": "volumes"}`, `{"command": "bookmark", "name": NAME}`,
//! `{"command": "bookmarks"}`, and for an exposed point in time
//! `{"command": "retarget", "at": POINT}`. Answers: `{"return": VALUE}` or `{"error": TEXT}`.

use crate::device::BlockDevice;
use crate::image_access::PointInTimeImage;
use crate::pit::{self, PointInTime};
use crate::volume::JournaledVolume;
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
    Bookmark { name: String },
    Bookmarks,
    Retarget { at: String },
}

/// Serves the API on `path` on a background thread.
pub fn spawn(path: &Path, volume: ServedVolume) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let volume = volume.clone();
            std::thread::spawn(move || {
                if let Err(e) = serve_client(stream, &volume) {
                    tracing::debug!(error = %e, "API client failed");
                }
            });
        }
    });
    Ok(())
}

fn serve_client(stream: UnixStream, volume: &ServedVolume) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if (&mut reader).take(MAX_REQUEST).read_line(&mut line)? == 0 {
            return Ok(());
        }
        let answer = match serde_json::from_str::<ApiRequest>(&line) {
            Ok(request) => match handle(request, volume) {
                Ok(value) => json!({ "return": value }),
                Err(e) => json!({ "error": e }),
            },
            Err(e) => json!({ "error": format!("bad request: {e}") }),
        };
        writer.write_all(format!("{answer}\n").as_bytes())?;
    }
}

fn handle(request: ApiRequest, volume: &ServedVolume) -> Result<Value, String> {
    match request {
        ApiRequest::Volumes => {
            let counters = &volume.device.counters;
            let mut entry = json!({
                "name": volume.name,
                "path": volume.path.display().to_string(),
                "requests": counters.requests.load(Ordering::Relaxed),
                "guest-errors": counters.guest_errors.load(Ordering::Relaxed),
                "io-errors": counters.io_errors.load(Ordering::Relaxed),
                "read-bytes": counters.read_bytes.load(Ordering::Relaxed),
                "write-bytes": counters.write_bytes.load(Ordering::Relaxed),
                "latency-us-log2": counters
                    .latency_histogram()
                    .iter()
                    .map(|(from_us, count)| json!({"from-us": from_us, "count": count}))
                    .collect::<Vec<_>>(),
                "journal": volume.journal.is_some(),
            });
            if let Some(image) = &volume.image {
                entry["point-in-time-seq"] = json!(image.seq());
            }
            if let Some(journal) = &volume.journal {
                let (bytes, last_seq) = journal.journal_position();
                entry["journal-bytes"] = json!(bytes);
                entry["last-seq"] = json!(last_seq);
                if let Some((seq, time_ns)) = journal.oldest_point() {
                    entry["oldest-seq"] = json!(seq);
                    entry["oldest-time-ns"] = json!(time_ns);
                }
                entry["writes"] = json!(journal.counters.writes.load(Ordering::Relaxed));
                entry["bytes-written"] =
                    json!(journal.counters.bytes_written.load(Ordering::Relaxed));
                entry["flushes"] = json!(journal.counters.flushes.load(Ordering::Relaxed));
            }
            Ok(json!([entry]))
        }
        ApiRequest::Bookmark { name } => {
            let journal = volume
                .journal
                .as_ref()
                .ok_or("this volume is served without a journal; bookmarks need one")?;
            let bookmark = journal
                .bookmark(&name)
                .map_err(|e| format!("bookmark failed: {e}"))?;
            Ok(json!(bookmark))
        }
        ApiRequest::Retarget { at } => {
            let image = volume
                .image
                .as_ref()
                .ok_or("only an exposed point in time (pit expose) can be retargeted")?;
            let point: PointInTime = at.parse().map_err(|e: pit::PitError| e.to_string())?;
            let seq = pit::resolve(image.journal_dir(), &point).map_err(|e| e.to_string())?;
            let moved = image.retarget(seq).map_err(|e| e.to_string())?;
            Ok(json!(moved))
        }
        ApiRequest::Bookmarks => {
            let journal = volume
                .journal
                .as_ref()
                .ok_or("this volume has no journal")?;
            Ok(json!(journal.bookmarks()))
        }
    }
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
