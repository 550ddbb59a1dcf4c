//! Bookmarks: named points in the journal, and the rule for their names.
//!
//! A point in time is named on the command line as `latest`, a sequence number, `@TIME`,
//! `bookmark:NAME` or a bare bookmark name. A bookmark whose name reads as one of the
//! others (`latest`, `2`, `@1`, `bookmark:x`) would make `--at NAME` silently mean another
//! point, so such names are refused when the bookmark is made, and so are names already in
//! use (a duplicate would shadow the older one).

use crate::format::RecordHeader;

/// The longest bookmark name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// The explicit prefix that makes `--at` read the rest as a bookmark name.
pub const PREFIX: &str = "bookmark:";

/// A bookmark: a named point in the journal.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Bookmark {
    /// Its name.
    pub name: String,
    /// The bookmark record's sequence number: writes before it are in the point in time.
    pub seq: u64,
    /// When it was made, nanoseconds since the Unix epoch.
    pub time_ns: u64,
}

impl Bookmark {
    /// The bookmark a bookmark record makes.
    pub fn from_record(header: &RecordHeader, payload: &[u8]) -> Self {
        Bookmark {
            name: String::from_utf8_lossy(payload).into_owned(),
            seq: header.seq,
            time_ns: header.time_ns,
        }
    }
}

/// Why a bookmark name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty or too long.
    #[error("a bookmark name is 1 to {MAX_NAME_BYTES} bytes")]
    Length,
    /// The name reads as another kind of point in time.
    #[error(
        "a bookmark may not be named {0:?}: `--at {0}` would mean {1}, not the bookmark; \
         pick a name that is not `latest`, a number, or starts with `@` or `bookmark:`"
    )]
    Ambiguous(String, &'static str),
}

/// Checks that `name` can only ever mean this bookmark.
pub fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(NameError::Length);
    }
    let meaning = if name == "latest" {
        Some("the latest point")
    } else if name.parse::<u64>().is_ok() {
        Some("a sequence number")
    } else if name.starts_with('@') {
        Some("a time")
    } else if name.starts_with(PREFIX) {
        Some("the bookmark named after the prefix")
    } else {
        None
    };
    match meaning {
        Some(meaning) => Err(NameError::Ambiguous(name.into(), meaning)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_read_as_another_point_are_refused() {
        for name in ["latest", "2", "0042", "@1", "@x", "bookmark:a", ""] {
            assert!(check_name(name).is_err(), "{name:?} was accepted");
        }
        for name in ["before-upgrade", "v2", "2a", "late st"] {
            assert!(check_name(name).is_ok(), "{name:?} was refused");
        }
    }
}
