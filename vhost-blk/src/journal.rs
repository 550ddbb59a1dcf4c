//! The journal itself lives in the sealvm-journal crate (format, segments, reader, writer,
//! extent map); this module re-exports what sealvm-blk and its tests use under the names
//! they had.

pub use sealvm_journal::bookmark::{self, Bookmark};
pub use sealvm_journal::dir::now_ns;
pub use sealvm_journal::dir::{
    effective_base, hold_history, read_state, segment_path, segments, HistoryHold, JournalError,
    JournalState, FOLDED_BASE_NAME, FOLD_LOCK_NAME, SERVE_LOCK_NAME, STATE_NAME,
};
pub use sealvm_journal::format;
pub use sealvm_journal::reader::{scan, scan_from, Cursor, Location, Reader, ScanSummary};
