//! The requests and answers of sealvm-blk's API socket, as serde types: what `API.md` in
//! this package documents, and what the server ([`super::spawn`]) and the CLI use. The
//! envelope (`{"return": ...}` or `{"error": ..., "code": ...}`), the line limit and the
//! client are [`sealvm_os::api_socket`]'s.
//!
//! Names on the wire are kebab-case (`set-retention`, `max-age-s`), except where a type
//! shared with the journal keeps its own (`time_ns` of a bookmark).

use crate::image_access::{ImageAccessError, Retargeted};
use crate::pit::{PitError, Points};
use crate::volume::Retention;
use sealvm_journal::bookmark::Bookmark;
use sealvm_journal::consumer::{Consumer, ConsumerError};
use sealvm_os::api_socket::{ApiFailure, ErrorCode};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;

/// One request line. `volume` names the served volume a command is about; it may be left
/// out when one volume is served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Every served volume with its counters: answers a list of [`VolumeEntry`].
    Volumes {},
    /// One volume's counters: answers [`Counters`].
    Counters {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Makes a bookmark: answers the [`Bookmark`], or a [`GroupBookmark`] when no volume is
    /// named and several are served (one consistent point across every journaled volume).
    Bookmark {
        /// The bookmark's name (1 to 256 bytes, not `latest`, a number, `@...` or
        /// `bookmark:...`).
        name: String,
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// The bookmarks within reach, oldest first: answers a list of [`Bookmark`].
    Bookmarks {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// The retention in force and how far history reaches: answers [`RetentionAnswer`].
    Retention {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Replaces the retention (an absent or null limit is no limit) and folds older
    /// history away in the background: answers [`RetentionAnswer`].
    SetRetention {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        /// Keep points in time at least this many seconds old.
        #[serde(default, rename = "max-age-s")]
        max_age_s: Option<u64>,
        /// Keep the journal at most this many bytes.
        #[serde(default, rename = "max-bytes")]
        max_bytes: Option<u64>,
        /// Bytes of journal past which a lagging consumer is marked for resync.
        #[serde(default, rename = "consumer-budget")]
        consumer_budget: Option<u64>,
    },
    /// The named consumers and how far each lags: answers a list of [`ConsumerEntry`].
    Consumers {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Registers a consumer cursor at `seq` (absent: the latest record): answers the
    /// [`Consumer`].
    ConsumerRegister {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        /// The consumer's name.
        name: String,
        /// Records up to here count as consumed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
    },
    /// Moves a consumer's cursor forward to `seq`: answers the [`Consumer`].
    ConsumerAdvance {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        /// The consumer's name.
        name: String,
        /// Records up to here are consumed.
        seq: u64,
    },
    /// Removes a consumer's cursor: answers [`Removed`].
    ConsumerRemove {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        /// The consumer's name.
        name: String,
    },
    /// How far back the journal reaches (what `pit list --json` shows): answers [`Points`].
    Points {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
    },
    /// Writes the volume as it was at a point in time to a new file; answers
    /// [`Restored`] when the file is complete.
    Restore {
        /// The volume.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        volume: Option<String>,
        /// The point in time: `latest`, a sequence number, `@UNIX_SECONDS`,
        /// `bookmark:NAME` or a bookmark name.
        at: String,
        /// The file to write; it must not exist.
        to: PathBuf,
    },
    /// Moves an exposed point in time (`pit expose`) to another point: answers
    /// [`Retargeted`].
    Retarget {
        /// The point in time, as for `restore`.
        at: String,
    },
}

/// Requests by kind since the volume was served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RequestsByKind {
    /// Reads.
    pub read: u64,
    /// Writes.
    pub write: u64,
    /// Flushes.
    pub flush: u64,
    /// Device-id requests.
    pub get_id: u64,
    /// Discards.
    pub discard: u64,
    /// Write-zeroes requests.
    pub write_zeroes: u64,
    /// Chains refused before they ran (not counted by kind).
    pub rejected: u64,
}

/// One non-empty bucket of the service-time histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LatencyBucket {
    /// The bucket holds requests served in `from-us` to `2 * from-us` µs (the one from
    /// 1 µs also those under 1 µs, the one from 2^23 µs everything longer).
    pub from_us: u64,
    /// Requests in it.
    pub count: u64,
}

/// The device's request counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DeviceCounters {
    /// Requests completed, whatever their status.
    pub requests: u64,
    /// Requests by kind.
    pub requests_by_kind: RequestsByKind,
    /// Bytes read by reads that succeeded.
    pub read_bytes: u64,
    /// Bytes written by writes that succeeded.
    pub write_bytes: u64,
    /// Requests that failed because the guest sent something malformed.
    pub guest_errors: u64,
    /// Requests that failed in the storage.
    pub io_errors: u64,
    /// Requests in flight when a previous sealvm-blk stopped, served again from the
    /// frontend's inflight region (INFLIGHT_SHMFD).
    pub inflight_resubmitted: u64,
    /// The non-empty log2 buckets of service time.
    pub latency_us_log2: Vec<LatencyBucket>,
}

/// A journaled volume's journal counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JournalCounters {
    /// Bytes in all segments.
    pub journal_bytes: u64,
    /// Segment files.
    pub journal_segments: u64,
    /// History up to this seq is folded into the base.
    pub folded_through_seq: u64,
    /// Segments folded since the volume was served.
    pub folded_segments: u64,
    /// The last record's seq.
    pub last_seq: u64,
    /// The oldest record still within reach; absent while there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
    /// When it was written, nanoseconds since the Unix epoch; absent with `oldest-seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_time_ns: Option<u64>,
    /// Write records appended.
    pub journal_writes: u64,
    /// Flushes that made records durable.
    pub journal_flushes: u64,
    /// Every fdatasync of the journal.
    pub journal_syncs: u64,
}

/// What `counters` answers: the device's counters and, for a journaled volume, the
/// journal's (in one flat object).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// The device's counters.
    #[serde(flatten)]
    pub device: DeviceCounters,
    /// The journal's counters, for a journaled volume.
    #[serde(flatten)]
    pub journal: Option<JournalCounters>,
}

/// A journaled volume's totals in a `volumes` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JournalTotals {
    /// The journal directory.
    pub journal_dir: String,
    /// Writes journaled.
    pub writes: u64,
    /// Bytes journaled.
    pub bytes_written: u64,
    /// Flushes journaled.
    pub flushes: u64,
}

/// One volume in the `volumes` answer: its counters, name and path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeEntry {
    /// Its counters, as `counters` answers them.
    #[serde(flatten)]
    pub counters: Counters,
    /// Its name.
    pub name: String,
    /// Its image.
    pub path: String,
    /// Whether it is journaled.
    pub journal: bool,
    /// For an exposed point in time, the seq it shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub point_in_time_seq: Option<u64>,
    /// For a journaled volume, its journal totals.
    #[serde(flatten)]
    pub journal_totals: Option<JournalTotals>,
}

/// A bookmark across every journaled volume: one consistent point for the group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupBookmark {
    /// The bookmark's name.
    pub name: String,
    /// Each volume's bookmark record seq, by volume name.
    pub seqs: BTreeMap<String, u64>,
}

/// What `retention` and `set-retention` answer: the limits and how far history reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RetentionAnswer {
    /// The limits in force (`max-age-s`, `max-bytes`, `consumer-budget`; null: no limit).
    #[serde(flatten)]
    pub limits: Retention,
    /// History up to this seq is folded into the base.
    pub folded_through_seq: u64,
    /// Bytes in all segments.
    pub journal_bytes: u64,
    /// Segment files.
    pub journal_segments: u64,
    /// The oldest record still within reach; absent while there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_seq: Option<u64>,
    /// When it was written, nanoseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_time_ns: Option<u64>,
}

/// A consumer in the `consumers` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConsumerEntry {
    /// Its cursor (`name`, `seq`, `resync`, `updated-ns`).
    #[serde(flatten)]
    pub consumer: Consumer,
    /// Records between its cursor and the journal's last record.
    pub lag_records: u64,
}

/// What `consumer-remove` answers: an empty object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Removed {}

/// What `restore` answers once the file is complete.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restored {
    /// The point restored, as a seq.
    pub seq: u64,
    /// The file written.
    pub to: String,
    /// How long the restore took.
    pub seconds: f64,
}

/// Every answer's `return` value, one variant per kind of answer.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `volumes`.
    Volumes(Vec<VolumeEntry>),
    /// `counters`.
    Counters(Counters),
    /// `bookmark` of one volume.
    Bookmark(Bookmark),
    /// `bookmark` of every journaled volume.
    GroupBookmark(GroupBookmark),
    /// `bookmarks`.
    Bookmarks(Vec<Bookmark>),
    /// `retention` and `set-retention`.
    Retention(RetentionAnswer),
    /// `consumers`.
    Consumers(Vec<ConsumerEntry>),
    /// `consumer-register` and `consumer-advance`.
    Consumer(Consumer),
    /// `consumer-remove`.
    Removed(Removed),
    /// `points`.
    Points(Points),
    /// `restore`.
    Restored(Restored),
    /// `retarget`.
    Retargeted(Retargeted),
}

/// Why a request failed; each answers with the [`ErrorCode`] of [`ApiFailure::code`].
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The named volume is not served.
    #[error("no volume named {name:?}; volumes: {served}")]
    NoSuchVolume {
        /// The name asked for.
        name: String,
        /// The served volumes, comma-separated.
        served: String,
    },
    /// Several volumes are served and the request names none.
    #[error("several volumes are served; name one with \"volume\": {served}")]
    VolumeNotNamed {
        /// The served volumes, comma-separated.
        served: String,
    },
    /// The volume has no journal, and the command needs one.
    #[error("volume {0} is served without a journal")]
    NoJournal(String),
    /// A group bookmark was asked for and no volume is journaled.
    #[error("no volume is served with a journal; bookmarks need one")]
    NoJournaledVolume,
    /// Making the bookmark failed (an invalid name is `InvalidInput`).
    #[error("bookmark failed")]
    Bookmark(#[source] io::Error),
    /// Storing the new retention failed.
    #[error("cannot change the retention")]
    Retention(#[source] io::Error),
    /// A consumer cursor could not be read or changed.
    #[error(transparent)]
    Consumer(#[from] ConsumerError),
    /// `consumer-advance` past the last record.
    #[error("seq {seq} is beyond the journal's last record {last}")]
    BeyondJournal {
        /// Asked for.
        seq: u64,
        /// The journal's last record.
        last: u64,
    },
    /// `restore` would overwrite a file.
    #[error("{0} exists; restore writes a new file")]
    RestoreTargetExists(PathBuf),
    /// The point in time could not be parsed, found or restored.
    #[error(transparent)]
    Pit(#[from] PitError),
    /// `retarget` on a volume that is not an exposed point in time.
    #[error("only an exposed point in time (pit expose) can be retargeted")]
    NotExposed,
    /// The exposed point in time could not be moved.
    #[error(transparent)]
    Retarget(#[from] ImageAccessError),
}

impl ApiFailure for ApiError {
    fn code(&self) -> ErrorCode {
        match self {
            ApiError::NoSuchVolume { .. } => ErrorCode::NotFound,
            ApiError::VolumeNotNamed { .. } => ErrorCode::BadRequest,
            ApiError::NoJournal(_) | ApiError::NoJournaledVolume | ApiError::NotExposed => {
                ErrorCode::Unsupported
            }
            ApiError::Bookmark(e) if e.kind() == io::ErrorKind::InvalidInput => {
                ErrorCode::BadRequest
            }
            ApiError::Bookmark(_) | ApiError::Retention(_) => ErrorCode::Failed,
            ApiError::Consumer(e) => match e {
                ConsumerError::BadName(_) => ErrorCode::BadRequest,
                ConsumerError::NoSuchConsumer(_) => ErrorCode::NotFound,
                ConsumerError::Journal(_) => ErrorCode::Failed,
                _ => ErrorCode::Conflict,
            },
            ApiError::BeyondJournal { .. } => ErrorCode::BadRequest,
            ApiError::RestoreTargetExists(_) => ErrorCode::Conflict,
            ApiError::Pit(e) => match e {
                PitError::BadPoint(_) | PitError::BeyondJournal { .. } => ErrorCode::BadRequest,
                PitError::NoSuchBookmark(_) => ErrorCode::NotFound,
                PitError::AmbiguousBookmark { .. } | PitError::FoldedAway { .. } => {
                    ErrorCode::Conflict
                }
                PitError::NotAJournal(_)
                | PitError::Journal(_)
                | PitError::Base { .. }
                | PitError::Write { .. } => ErrorCode::Failed,
            },
            ApiError::Retarget(e) => match e {
                ImageAccessError::BeyondJournal { .. } => ErrorCode::BadRequest,
                ImageAccessError::FoldedAway { .. } => ErrorCode::Conflict,
                _ => ErrorCode::Failed,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_keep_their_wire_names() {
        let parsed: Request = serde_json::from_value(json!({
            "command": "set-retention", "volume": "v", "max-age-s": 60, "max-bytes": null
        }))
        .unwrap();
        assert_eq!(
            parsed,
            Request::SetRetention {
                volume: Some("v".into()),
                max_age_s: Some(60),
                max_bytes: None,
                consumer_budget: None,
            }
        );
        assert_eq!(
            serde_json::to_value(Request::Bookmark {
                name: "b".into(),
                volume: None
            })
            .unwrap(),
            json!({"command": "bookmark", "name": "b"})
        );
    }

    #[test]
    fn a_command_without_fields_refuses_unknown_ones() {
        assert!(serde_json::from_value::<Request>(json!({"command": "volumes"})).is_ok());
        assert!(
            serde_json::from_value::<Request>(json!({"command": "volumes", "volume": "x"}))
                .is_err()
        );
    }

    fn journal_counters() -> JournalCounters {
        JournalCounters {
            journal_bytes: 8344,
            journal_segments: 1,
            folded_through_seq: 0,
            folded_segments: 0,
            last_seq: 2,
            oldest_seq: Some(1),
            oldest_time_ns: Some(7),
            journal_writes: 2,
            journal_flushes: 1,
            journal_syncs: 1,
        }
    }

    #[test]
    fn counters_read_back_as_they_were_sent() {
        let mut counters = plain_counters();
        let sent = serde_json::to_value(&counters).unwrap();
        assert_eq!(serde_json::from_value::<Counters>(sent).unwrap(), counters);
        counters.journal = Some(journal_counters());
        let sent = serde_json::to_value(&counters).unwrap();
        assert_eq!(sent["journal-bytes"], 8344);
        assert_eq!(serde_json::from_value::<Counters>(sent).unwrap(), counters);
    }

    #[test]
    fn counters_of_a_plain_volume_have_no_journal_fields() {
        let value = serde_json::to_value(plain_counters()).unwrap();
        assert_eq!(value["requests-by-kind"]["read"], 1);
        assert_eq!(
            value["latency-us-log2"],
            json!([{"from-us": 4, "count": 1}])
        );
        assert!(value.get("journal-bytes").is_none(), "{value}");
    }

    fn plain_counters() -> Counters {
        Counters {
            device: DeviceCounters {
                requests: 1,
                requests_by_kind: RequestsByKind {
                    read: 1,
                    write: 0,
                    flush: 0,
                    get_id: 0,
                    discard: 0,
                    write_zeroes: 0,
                    rejected: 0,
                },
                read_bytes: 512,
                write_bytes: 0,
                guest_errors: 0,
                io_errors: 0,
                inflight_resubmitted: 0,
                latency_us_log2: vec![LatencyBucket {
                    from_us: 4,
                    count: 1,
                }],
            },
            journal: None,
        }
    }
}
