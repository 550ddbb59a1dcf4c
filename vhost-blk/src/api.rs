//! The API socket: one JSON request per line in, one answer per line out, for every volume
//! a `serve` process serves (or the one point in time `pit expose` serves).
//!
//! The commands, their fields, answers and errors are documented in `API.md` beside this
//! package's `Cargo.toml` and typed in [`protocol`]; the envelope (`{"return": VALUE}` or
//! `{"error": MESSAGE, "code": CODE}`), the 64 KiB line limit and the client ([`call`]) are
//! [`sealvm_os::api_socket`]'s. This module serves the commands; it holds no wire format.

pub mod protocol;

use crate::device::BlockDevice;
use crate::image_access::PointInTimeImage;
use crate::pit::{self, PointInTime};
use crate::volume::{JournaledVolume, Retention};
use protocol::{
    ApiError, ConsumerEntry, Counters, DeviceCounters, GroupBookmark, JournalCounters,
    JournalTotals, LatencyBucket, Removed, Reply, Request, RequestsByKind, Restored,
    RetentionAnswer, VolumeEntry,
};
use sealvm_journal::consumer;
pub use sealvm_os::api_socket::{call, ClientError};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

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

/// Serves the API for `volumes` on `path` on a background thread. `path` is bound with
/// [`sealvm_os::socket::bind_removing`]: a file that is not a socket, or a socket another
/// process serves, is refused; the returned guard removes the socket file when dropped.
pub fn spawn(
    path: &Path,
    volumes: Vec<ServedVolume>,
) -> Result<sealvm_os::socket::RemoveOnDrop, sealvm_os::socket::SocketError> {
    let (listener, socket_file) = sealvm_os::socket::bind_removing(path)?;
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
    Ok(socket_file)
}

fn serve_client(stream: UnixStream, volumes: &[ServedVolume]) -> io::Result<()> {
    sealvm_os::api_socket::serve_connection(stream, |request| handle(request, volumes))
}

/// The served volumes' names, comma-separated, for error messages.
fn served_names(volumes: &[ServedVolume]) -> String {
    volumes
        .iter()
        .map(|v| v.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The volume a request names, or the only one when it names none.
fn pick<'a>(volumes: &'a [ServedVolume], name: Option<&str>) -> Result<&'a ServedVolume, ApiError> {
    match (name, volumes) {
        (Some(name), _) => {
            volumes
                .iter()
                .find(|v| v.name == name)
                .ok_or_else(|| ApiError::NoSuchVolume {
                    name: name.into(),
                    served: served_names(volumes),
                })
        }
        (None, [only]) => Ok(only),
        (None, _) => Err(ApiError::VolumeNotNamed {
            served: served_names(volumes),
        }),
    }
}

fn journaled<'a>(
    volumes: &'a [ServedVolume],
    name: Option<&str>,
) -> Result<&'a JournaledVolume, ApiError> {
    let volume = pick(volumes, name)?;
    volume
        .journal
        .as_deref()
        .ok_or_else(|| ApiError::NoJournal(volume.name.clone()))
}

/// Carries out one request.
fn handle(request: Request, volumes: &[ServedVolume]) -> Result<Reply, ApiError> {
    match request {
        Request::Volumes {} => Ok(Reply::Volumes(volumes.iter().map(describe).collect())),
        Request::Counters { volume } => {
            Ok(Reply::Counters(counters(pick(volumes, volume.as_deref())?)))
        }
        Request::Bookmark { name, volume: None } if volumes.len() > 1 => {
            // A bookmark across every journaled volume: one consistent point for the group.
            let group: Vec<&ServedVolume> =
                volumes.iter().filter(|v| v.journal.is_some()).collect();
            if group.is_empty() {
                return Err(ApiError::NoJournaledVolume);
            }
            let journals: Vec<&JournaledVolume> =
                group.iter().filter_map(|v| v.journal.as_deref()).collect();
            let made =
                JournaledVolume::bookmark_group(&journals, &name).map_err(ApiError::Bookmark)?;
            let seqs = group
                .iter()
                .zip(&made)
                .map(|(v, b)| (v.name.clone(), b.seq))
                .collect();
            Ok(Reply::GroupBookmark(GroupBookmark { name, seqs }))
        }
        Request::Bookmark { name, volume } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let bookmark = journal.bookmark(&name).map_err(ApiError::Bookmark)?;
            Ok(Reply::Bookmark(bookmark))
        }
        Request::Bookmarks { volume } => Ok(Reply::Bookmarks(
            journaled(volumes, volume.as_deref())?.bookmarks(),
        )),
        Request::Retention { volume } => Ok(Reply::Retention(retention(journaled(
            volumes,
            volume.as_deref(),
        )?))),
        Request::SetRetention {
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
                .map_err(ApiError::Retention)?;
            Ok(Reply::Retention(retention(journal)))
        }
        Request::Consumers { volume } => Ok(Reply::Consumers(consumers(journaled(
            volumes,
            volume.as_deref(),
        )?)?)),
        Request::ConsumerRegister { volume, name, seq } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let seq = seq.unwrap_or(journal.journal_position().1);
            Ok(Reply::Consumer(consumer::register(
                journal.journal_dir(),
                &name,
                seq,
            )?))
        }
        Request::ConsumerAdvance { volume, name, seq } => {
            let journal = journaled(volumes, volume.as_deref())?;
            let last = journal.journal_position().1;
            if seq > last {
                return Err(ApiError::BeyondJournal { seq, last });
            }
            let moved = consumer::advance(journal.journal_dir(), &name, seq)?;
            // The consumer may have released history that retention wants gone.
            journal.wake_folder();
            Ok(Reply::Consumer(moved))
        }
        Request::ConsumerRemove { volume, name } => {
            let journal = journaled(volumes, volume.as_deref())?;
            consumer::remove(journal.journal_dir(), &name)?;
            journal.wake_folder();
            Ok(Reply::Removed(Removed {}))
        }
        Request::Points { volume } => {
            let journal = journaled(volumes, volume.as_deref())?;
            Ok(Reply::Points(pit::points(journal.journal_dir())?))
        }
        Request::Restore { volume, at, to } => {
            let served = pick(volumes, volume.as_deref())?;
            let journal = journaled(volumes, volume.as_deref())?;
            if to.exists() {
                return Err(ApiError::RestoreTargetExists(to));
            }
            let point: PointInTime = at.parse()?;
            let started = std::time::Instant::now();
            let seq = pit::resolve(journal.journal_dir(), &point)?;
            pit::restore(&served.path, journal.journal_dir(), seq, &to, |_, _| {})?;
            Ok(Reply::Restored(Restored {
                seq,
                to: to.display().to_string(),
                seconds: started.elapsed().as_secs_f64(),
            }))
        }
        Request::Retarget { at } => {
            let image = volumes
                .iter()
                .find_map(|v| v.image.as_ref())
                .ok_or(ApiError::NotExposed)?;
            let point: PointInTime = at.parse()?;
            // A sequence number needs no scan of the journal (the image checks it is not
            // beyond the end), so a retarget costs what lies between the two points.
            let seq = match point {
                PointInTime::Seq(seq) => seq,
                point => pit::resolve(image.journal_dir(), &point)?,
            };
            Ok(Reply::Retargeted(image.retarget(seq)?))
        }
    }
}

/// A volume's entry in `volumes`: its counters, name, path and journal totals.
fn describe(volume: &ServedVolume) -> VolumeEntry {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    VolumeEntry {
        counters: counters(volume),
        name: volume.name.clone(),
        path: volume.path.display().to_string(),
        journal: volume.journal.is_some(),
        point_in_time_seq: volume.image.as_ref().map(|image| image.seq()),
        journal_totals: volume.journal.as_ref().map(|journal| JournalTotals {
            journal_dir: journal.journal_dir().display().to_string(),
            writes: load(&journal.counters.writes),
            bytes_written: load(&journal.counters.bytes_written),
            flushes: load(&journal.counters.flushes),
        }),
    }
}

/// The named consumers of a journal and how far each lags.
fn consumers(journal: &JournaledVolume) -> Result<Vec<ConsumerEntry>, ApiError> {
    let last = journal.journal_position().1;
    Ok(consumer::list(journal.journal_dir())?
        .into_iter()
        .map(|consumer| ConsumerEntry {
            lag_records: last.saturating_sub(consumer.seq),
            consumer,
        })
        .collect())
}

/// The retention in force and how far back history reaches.
fn retention(journal: &JournaledVolume) -> RetentionAnswer {
    let oldest = journal.oldest_point();
    RetentionAnswer {
        limits: journal.retention(),
        folded_through_seq: journal.base_seq(),
        journal_bytes: journal.journal_position().0,
        journal_segments: journal.segment_count() as u64,
        oldest_seq: oldest.map(|o| o.seq),
        oldest_time_ns: oldest.map(|o| o.time_ns),
    }
}

/// A device's request counters as the API shows them.
fn device_counters(counters: &crate::counters::DeviceCounters) -> DeviceCounters {
    let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
    DeviceCounters {
        requests: load(&counters.requests),
        requests_by_kind: RequestsByKind {
            read: load(&counters.reads),
            write: load(&counters.writes),
            flush: load(&counters.flushes),
            get_id: load(&counters.get_ids),
            discard: load(&counters.discards),
            write_zeroes: load(&counters.write_zeroes),
            rejected: load(&counters.rejected),
        },
        read_bytes: load(&counters.bytes_read),
        write_bytes: load(&counters.bytes_written),
        guest_errors: load(&counters.guest_errors),
        io_errors: load(&counters.io_errors),
        inflight_resubmitted: load(&counters.inflight_resubmitted),
        latency_us_log2: counters
            .latency_histogram()
            .into_iter()
            .map(|(from_us, count)| LatencyBucket { from_us, count })
            .collect(),
    }
}

/// The `counters` answer for `volume`.
fn counters(volume: &ServedVolume) -> Counters {
    let journal = volume.journal.as_ref().map(|journal| {
        let (bytes, last_seq) = journal.journal_position();
        let oldest = journal.oldest_point();
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        JournalCounters {
            journal_bytes: bytes,
            journal_segments: journal.segment_count() as u64,
            folded_through_seq: journal.base_seq(),
            folded_segments: load(&journal.counters.folded_segments),
            last_seq,
            oldest_seq: oldest.map(|o| o.seq),
            oldest_time_ns: oldest.map(|o| o.time_ns),
            journal_writes: load(&journal.counters.writes),
            journal_flushes: load(&journal.counters.flushes),
            journal_syncs: load(&journal.counters.syncs),
        }
    });
    Counters {
        device: device_counters(&volume.device.counters),
        journal,
    }
}
