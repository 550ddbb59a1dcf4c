//! Consumer cursors: who still needs which records, so that folding never removes a record
//! a consumer has not consumed, within a budget.
//!
//! Two kinds, both files in `consumers/` in the journal directory:
//!
//! - a **named consumer** (a replication target, a backup policy) is durable:
//!   `consumers/<name>.json` says up to which seq it has consumed. Folding waits for it,
//!   until the journal grows past the volume's `consumer-budget`: then the laggard is
//!   marked `resync` (it must start over from a full copy), which the API, the log and
//!   `pit list` report, and folding goes on (PostgreSQL's replication slots with
//!   `max_slot_wal_keep_size` are the model). A consumer marked for resync holds nothing.
//! - a **reader hold** (`pit restore`, `pit list`, an exposed image) lives as long as the
//!   reader: `consumers/.reader-<pid>-<n>` holds the lowest seq the reader may still look
//!   at, and the reader keeps an flock on it. Folding never passes a live hold, whatever
//!   the budget (the reader is reading the folded base); a hold whose lock nobody keeps
//!   is a reader that died, and is removed.
//!
//! Holds are taken and moved under `fold.lock` shared, and the folder decides under
//! `fold.lock` exclusive, so a hold can never be placed below a fold in progress.

use crate::dir::{self, JournalError};
use sealvm_os::lock::{lock, LockError, LockMode, Wait};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The directory of consumer cursors inside a journal directory.
pub const CONSUMERS_DIR: &str = "consumers";
const READER_PREFIX: &str = ".reader-";

/// A named consumer's durable cursor.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Consumer {
    /// Its name (letters, digits, `-`, `_`, `.`; not starting with `.`).
    pub name: String,
    /// Records up to this seq have been consumed.
    pub seq: u64,
    /// The journal passed the consumer budget while this consumer lagged: records it had
    /// not consumed were folded away, and it must resynchronize from a full copy.
    pub resync: bool,
    /// When the cursor last changed, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
}

/// Errors about consumers.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// Reading or writing a cursor failed.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The name is not a file-name-safe word.
    #[error("{0:?} is not a consumer name (letters, digits, '-', '_', '.'; 1 to 64 bytes)")]
    BadName(String),
    /// No consumer has that name.
    #[error("the journal has no consumer named {0:?}")]
    NoSuchConsumer(String),
    /// A cursor may only move forward.
    #[error("consumer {name:?} is at seq {at}; it cannot move back to {asked}")]
    Backwards {
        /// The consumer.
        name: String,
        /// Where it is.
        at: u64,
        /// Where it was asked to go.
        asked: u64,
    },
    /// The consumer was marked for resync; it must register again (from a full copy).
    #[error("consumer {0:?} is marked for resync: register it again after a full copy")]
    NeedsResync(String),
    /// The records the cursor would need are folded away.
    #[error("seq {asked} is older than the journal reaches (folded through {base_seq})")]
    FoldedAway {
        /// Asked for.
        asked: u64,
        /// The oldest point left.
        base_seq: u64,
    },
}

fn check_name(name: &str) -> Result<(), ConsumerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConsumerError::BadName(name.into()))
    }
}

fn consumers_dir(journal: &Path) -> PathBuf {
    journal.join(CONSUMERS_DIR)
}

fn consumer_path(journal: &Path, name: &str) -> PathBuf {
    consumers_dir(journal).join(format!("{name}.json"))
}

fn write_consumer(journal: &Path, consumer: &Consumer) -> Result<(), ConsumerError> {
    let dir = consumers_dir(journal);
    std::fs::create_dir_all(&dir).map_err(JournalError::io(&dir))?;
    let path = consumer_path(journal, &consumer.name);
    let bytes = serde_json::to_vec_pretty(consumer).map_err(|e| JournalError::BadState {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    sealvm_os::durable::replace(&path, &bytes, 0o644).map_err(|e| JournalError::Io {
        path,
        source: io::Error::other(e),
    })?;
    Ok(())
}

/// The named consumers of the journal in `journal`, by name.
pub fn list(journal: &Path) -> Result<Vec<Consumer>, ConsumerError> {
    let dir = consumers_dir(journal);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(JournalError::Io { path: dir, source }.into()),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(JournalError::io(&dir))?;
        let path = entry.path();
        let is_cursor = path.extension().is_some_and(|e| e == "json")
            && !entry.file_name().to_string_lossy().starts_with('.');
        if !is_cursor {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(JournalError::io(&path))?;
        let consumer: Consumer =
            serde_json::from_slice(&bytes).map_err(|e| JournalError::BadState {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        found.push(consumer);
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// Registers consumer `name` as having consumed through `seq` (creating it, or starting it
/// over after a resync). `seq` must still be within reach.
pub fn register(journal: &Path, name: &str, seq: u64) -> Result<Consumer, ConsumerError> {
    check_name(name)?;
    let base_seq = dir::read_state(journal)?.base_seq;
    if seq < base_seq {
        return Err(ConsumerError::FoldedAway {
            asked: seq,
            base_seq,
        });
    }
    let consumer = Consumer {
        name: name.into(),
        seq,
        resync: false,
        updated_ns: dir::now_ns(),
    };
    write_consumer(journal, &consumer)?;
    Ok(consumer)
}

/// Moves consumer `name` forward to `seq`: it has consumed every record up to there.
pub fn advance(journal: &Path, name: &str, seq: u64) -> Result<Consumer, ConsumerError> {
    check_name(name)?;
    let mut consumer = list(journal)?
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| ConsumerError::NoSuchConsumer(name.into()))?;
    if consumer.resync {
        return Err(ConsumerError::NeedsResync(name.into()));
    }
    if seq < consumer.seq {
        return Err(ConsumerError::Backwards {
            name: name.into(),
            at: consumer.seq,
            asked: seq,
        });
    }
    consumer.seq = seq;
    consumer.updated_ns = dir::now_ns();
    write_consumer(journal, &consumer)?;
    Ok(consumer)
}

/// Removes consumer `name`; it holds nothing from now on.
pub fn remove(journal: &Path, name: &str) -> Result<(), ConsumerError> {
    check_name(name)?;
    let path = consumer_path(journal, name);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(ConsumerError::NoSuchConsumer(name.into()))
        }
        Err(source) => Err(JournalError::Io { path, source }.into()),
    }
}

/// What consumers and readers allow the folder to do, decided under `fold.lock` exclusive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Holds {
    /// The lowest seq a live reader may still look at.
    pub readers: Option<u64>,
    /// Named consumers not marked for resync, with where they are.
    pub consumers: Vec<Consumer>,
}

impl Holds {
    /// Whether a segment whose last record is `last_seq` may be folded: no live reader
    /// and no consumer (not marked for resync) still needs its records.
    pub fn allow(&self, last_seq: u64) -> bool {
        self.readers.is_none_or(|r| r >= last_seq)
            && self.consumers.iter().all(|c| c.seq >= last_seq)
    }
}

/// Reads every hold on the journal in `journal`; removes reader holds of readers that died.
/// The caller holds `fold.lock` exclusively.
pub fn holds(journal: &Path) -> Result<Holds, ConsumerError> {
    let consumers = list(journal)?.into_iter().filter(|c| !c.resync).collect();
    let dir = consumers_dir(journal);
    let mut readers: Option<u64> = None;
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if !entry
                .file_name()
                .to_string_lossy()
                .starts_with(READER_PREFIX)
            {
                continue;
            }
            let path = entry.path();
            let Ok(file) = OpenOptions::new().read(true).write(true).open(&path) else {
                continue;
            };
            match lock(&file, LockMode::Exclusive, Wait::NoWait) {
                Ok(()) => {
                    // Nobody keeps it: the reader is gone.
                    let _ = std::fs::remove_file(&path);
                }
                Err(LockError::Held) => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    // A hold being written reads as empty: count it as holding everything.
                    let seq = text.trim().parse::<u64>().unwrap_or(0);
                    readers = Some(readers.map_or(seq, |r| r.min(seq)));
                }
                Err(LockError::Io(source)) => return Err(JournalError::Io { path, source }.into()),
            }
        }
    }
    Ok(Holds { readers, consumers })
}

/// Marks the consumers that have not consumed through `last_seq` for resync (the journal
/// passed its consumer budget); returns their names. The caller holds `fold.lock`.
pub fn mark_laggards(journal: &Path, last_seq: u64) -> Result<Vec<String>, ConsumerError> {
    let mut marked = Vec::new();
    for mut consumer in list(journal)? {
        if !consumer.resync && consumer.seq < last_seq {
            consumer.resync = true;
            consumer.updated_ns = dir::now_ns();
            write_consumer(journal, &consumer)?;
            tracing::warn!(
                journal = %journal.display(),
                consumer = %consumer.name,
                consumed_through = consumer.seq,
                "the journal passed its consumer budget with this consumer behind: records it \
                 had not consumed are folded away, and it must resynchronize from a full copy"
            );
            marked.push(consumer.name);
        }
    }
    Ok(marked)
}

/// A reader's hold: while it lives, folding never passes its seq.
pub struct ReaderHold {
    file: File,
    path: PathBuf,
    journal: PathBuf,
    seq: u64,
}

static HOLDS: AtomicU64 = AtomicU64::new(0);

impl ReaderHold {
    /// Takes a hold at `seq` on the journal in `journal` (nothing before `seq` will be
    /// looked at). A `seq` already folded away is [`ConsumerError::FoldedAway`].
    pub fn take(journal: &Path, seq: u64) -> Result<ReaderHold, ConsumerError> {
        Self::take_at(journal, Some(seq))
    }

    /// Takes a hold at the oldest point the journal still reaches (its folded-through
    /// seq), for a reader that looks at the whole history.
    pub fn take_oldest(journal: &Path) -> Result<ReaderHold, ConsumerError> {
        Self::take_at(journal, None)
    }

    fn take_at(journal: &Path, seq: Option<u64>) -> Result<ReaderHold, ConsumerError> {
        let dir = consumers_dir(journal);
        std::fs::create_dir_all(&dir).map_err(JournalError::io(&dir))?;
        // Created and locked under fold.lock shared, so the folder never sees it unlocked
        // and takes it for a dead reader's.
        let _fold = dir::hold_history(journal)?;
        let n = HOLDS.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{READER_PREFIX}{}-{n}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(JournalError::io(&path))?;
        lock(&file, LockMode::Exclusive, Wait::NoWait).map_err(|e| JournalError::Io {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        // Read under the same fold.lock: no fold can pass it before the hold is written.
        let seq = match seq {
            Some(seq) => seq,
            None => dir::read_state(journal)?.base_seq,
        };
        let mut hold = ReaderHold {
            file,
            path,
            journal: journal.to_path_buf(),
            seq,
        };
        hold.move_to(seq)?;
        Ok(hold)
    }

    /// Where the hold is.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Moves the hold to `seq` (back or forward); refused if `seq` is folded away already.
    pub fn move_to(&mut self, seq: u64) -> Result<(), ConsumerError> {
        // Under fold.lock shared: no fold is deciding or running meanwhile.
        let _fold = dir::hold_history(&self.journal)?;
        let base_seq = dir::read_state(&self.journal)?.base_seq;
        if seq < base_seq {
            return Err(ConsumerError::FoldedAway {
                asked: seq,
                base_seq,
            });
        }
        let write = |file: &mut File| -> io::Result<()> {
            file.set_len(0)?;
            use std::io::Seek;
            file.seek(io::SeekFrom::Start(0))?;
            file.write_all(seq.to_string().as_bytes())
        };
        write(&mut self.file).map_err(JournalError::io(&self.path))?;
        self.seq = seq;
        Ok(())
    }
}

impl Drop for ReaderHold {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_consumers_move_forward_only_and_hold_until_marked() {
        let tmp = tempfile::tempdir().unwrap();
        let j = tmp.path();
        register(j, "replica-1", 5).unwrap();
        assert!(matches!(
            register(j, "../x", 1),
            Err(ConsumerError::BadName(_))
        ));
        assert!(matches!(
            advance(j, "replica-1", 4),
            Err(ConsumerError::Backwards { at: 5, .. })
        ));
        advance(j, "replica-1", 9).unwrap();
        let holds = holds(j).unwrap();
        assert!(holds.allow(9) && !holds.allow(10));
        assert_eq!(mark_laggards(j, 12).unwrap(), ["replica-1"]);
        assert!(list(j).unwrap()[0].resync);
        assert!(
            self::holds(j).unwrap().allow(100),
            "a consumer marked for resync holds"
        );
        assert!(matches!(
            advance(j, "replica-1", 20),
            Err(ConsumerError::NeedsResync(_))
        ));
        register(j, "replica-1", 20).unwrap();
        assert!(!list(j).unwrap()[0].resync);
        remove(j, "replica-1").unwrap();
        assert!(list(j).unwrap().is_empty());
    }

    #[test]
    fn a_reader_hold_lasts_as_long_as_the_reader() {
        let tmp = tempfile::tempdir().unwrap();
        let j = tmp.path();
        let mut hold = ReaderHold::take(j, 7).unwrap();
        assert_eq!(holds(j).unwrap().readers, Some(7));
        hold.move_to(3).unwrap();
        assert_eq!(holds(j).unwrap().readers, Some(3));
        drop(hold);
        assert_eq!(holds(j).unwrap().readers, None);
    }
}
