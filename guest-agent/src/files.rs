//! guest-file-open, -read, -write, -seek, -flush and -close: qga's handle-based file access.
//!
//! Handles are small integers the agent hands out; the open files live until closed or the
//! agent exits (as in qga, a handle survives the host's connection). Modes are fopen's
//! (`r`, `r+`, `w`, `w+`, `a`, `a+`, each optionally with `b`); files created are 0600.

use crate::protocol::CommandError;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex, MutexGuard};

/// The most bytes one guest-file-read returns (qga's `QGA_READ_COUNT_MAX`, 48 MiB).
pub const READ_COUNT_MAX: i64 = 48 << 20;

/// What guest-file-read returns when the request names no count.
pub const READ_COUNT_DEFAULT: i64 = 4096;

/// Arguments of guest-file-open.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenArgs {
    /// The file.
    pub path: String,
    /// fopen's mode; `r` when absent.
    #[serde(default)]
    pub mode: Option<String>,
}

/// Arguments naming only a handle (close, flush).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandleArgs {
    /// From guest-file-open.
    pub handle: i64,
}

/// Arguments of guest-file-read.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadArgs {
    /// From guest-file-open.
    pub handle: i64,
    /// Most bytes to read.
    #[serde(default)]
    pub count: Option<i64>,
}

/// Arguments of guest-file-write.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WriteArgs {
    /// From guest-file-open.
    pub handle: i64,
    /// The bytes, base64.
    pub buf_b64: String,
    /// How many of the decoded bytes to write; all when absent.
    #[serde(default)]
    pub count: Option<i64>,
}

/// guest-file-seek's `whence`: qga's numbers or, since 2.6, names.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Whence {
    /// 0 set, 1 cur, 2 end.
    Value(i64),
    /// `set`, `cur` or `end`.
    Name(String),
}

/// Arguments of guest-file-seek.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeekArgs {
    /// From guest-file-open.
    pub handle: i64,
    /// Bytes, relative to `whence`.
    pub offset: i64,
    /// Where the offset counts from.
    pub whence: Whence,
}

/// The files opened through guest-file-open.
#[derive(Default, Clone)]
pub struct FileTable {
    files: Arc<Mutex<Table>>,
}

#[derive(Default)]
struct Table {
    open: HashMap<i64, File>,
    last_handle: i64,
}

fn not_found(handle: i64) -> CommandError {
    CommandError::generic(format!("handle '{handle}' has not been found"))
}

impl FileTable {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // Plain data: a panic elsewhere leaves it usable.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens a file; returns its handle.
    pub fn open(&self, args: OpenArgs) -> Result<Value, CommandError> {
        let mode = args.mode.as_deref().unwrap_or("r");
        let mut options = OpenOptions::new();
        match mode.replace('b', "").as_str() {
            "r" => options.read(true),
            "r+" => options.read(true).write(true),
            "w" => options.write(true).create(true).truncate(true),
            "w+" => options.read(true).write(true).create(true).truncate(true),
            "a" => options.append(true).create(true),
            "a+" => options.read(true).append(true).create(true),
            _ => {
                return Err(CommandError::generic(format!(
                    "invalid file open mode '{mode}'"
                )))
            }
        };
        let file = options
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&args.path)
            .map_err(|e| {
                CommandError::generic(format!("failed to open file '{}': {e}", args.path))
            })?;
        let mut table = self.lock();
        table.last_handle += 1;
        let handle = table.last_handle;
        table.open.insert(handle, file);
        Ok(json!(handle))
    }

    /// Closes a handle.
    pub fn close(&self, args: HandleArgs) -> Result<Value, CommandError> {
        self.lock()
            .open
            .remove(&args.handle)
            .map(|_| json!({}))
            .ok_or_else(|| not_found(args.handle))
    }

    /// Reads up to `count` bytes: `{count, buf-b64, eof}`.
    pub fn read(&self, args: ReadArgs) -> Result<Value, CommandError> {
        let count = args.count.unwrap_or(READ_COUNT_DEFAULT);
        if !(0..=READ_COUNT_MAX).contains(&count) {
            return Err(CommandError::generic(format!(
                "value '{count}' is invalid for argument count"
            )));
        }
        let mut table = self.lock();
        let file = table
            .open
            .get_mut(&args.handle)
            .ok_or_else(|| not_found(args.handle))?;
        let mut data = Vec::new();
        // Like fread: read until `count` bytes or end-of-file.
        file.take(count as u64)
            .read_to_end(&mut data)
            .map_err(|e| CommandError::generic(format!("failed to read file: {e}")))?;
        let eof = (data.len() as i64) < count;
        Ok(json!({"count": data.len(), "buf-b64": BASE64.encode(&data), "eof": eof}))
    }

    /// Writes decoded bytes: `{count, eof}`.
    pub fn write(&self, args: WriteArgs) -> Result<Value, CommandError> {
        let data = BASE64
            .decode(&args.buf_b64)
            .map_err(|e| CommandError::generic(format!("buf-b64 is not base64: {e}")))?;
        let count = args.count.unwrap_or(data.len() as i64);
        if count < 0 || count as usize > data.len() {
            return Err(CommandError::generic(format!(
                "value '{count}' is invalid for argument count"
            )));
        }
        let mut table = self.lock();
        let file = table
            .open
            .get_mut(&args.handle)
            .ok_or_else(|| not_found(args.handle))?;
        file.write_all(&data[..count as usize])
            .map_err(|e| CommandError::generic(format!("failed to write to file: {e}")))?;
        Ok(json!({"count": count, "eof": false}))
    }

    /// Moves the file position: `{position, eof}`.
    pub fn seek(&self, args: SeekArgs) -> Result<Value, CommandError> {
        let whence = match &args.whence {
            Whence::Value(0) => "set",
            Whence::Value(1) => "cur",
            Whence::Value(2) => "end",
            Whence::Name(name) if matches!(name.as_str(), "set" | "cur" | "end") => name,
            Whence::Value(v) => {
                return Err(CommandError::generic(format!("invalid whence code {v}")))
            }
            Whence::Name(n) => {
                return Err(CommandError::generic(format!(
                    "Parameter 'whence' does not accept value '{n}'"
                )))
            }
        };
        let to = match whence {
            "set" => SeekFrom::Start(u64::try_from(args.offset).map_err(|_| {
                CommandError::generic(format!(
                    "value '{}' is invalid for argument offset",
                    args.offset
                ))
            })?),
            "cur" => SeekFrom::Current(args.offset),
            _ => SeekFrom::End(args.offset),
        };
        let mut table = self.lock();
        let file = table
            .open
            .get_mut(&args.handle)
            .ok_or_else(|| not_found(args.handle))?;
        let position = file
            .seek(to)
            .map_err(|e| CommandError::generic(format!("failed to seek file: {e}")))?;
        Ok(json!({"position": position, "eof": false}))
    }

    /// Pushes written data to the kernel (the agent keeps no buffer of its own, so this only
    /// checks the handle).
    pub fn flush(&self, args: HandleArgs) -> Result<Value, CommandError> {
        let mut table = self.lock();
        let file = table
            .open
            .get_mut(&args.handle)
            .ok_or_else(|| not_found(args.handle))?;
        file.flush()
            .map_err(|e| CommandError::generic(format!("failed to flush file: {e}")))?;
        Ok(json!({}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_seek_read_and_close_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f").display().to_string();
        let files = FileTable::default();
        let handle = files
            .open(OpenArgs {
                path: path.clone(),
                mode: Some("w+".into()),
            })
            .unwrap()
            .as_i64()
            .unwrap();
        let wrote = files
            .write(WriteArgs {
                handle,
                buf_b64: BASE64.encode(b"hello world"),
                count: Some(5),
            })
            .unwrap();
        assert_eq!(wrote, json!({"count": 5, "eof": false}));
        let at = files
            .seek(SeekArgs {
                handle,
                offset: 1,
                whence: Whence::Name("set".into()),
            })
            .unwrap();
        assert_eq!(at["position"], 1);
        let read = files
            .read(ReadArgs {
                handle,
                count: Some(100),
            })
            .unwrap();
        assert_eq!(read["count"], 4);
        assert_eq!(read["buf-b64"], BASE64.encode(b"ello"));
        assert_eq!(read["eof"], true);
        files.close(HandleArgs { handle }).unwrap();
        let gone = files.close(HandleArgs { handle }).unwrap_err();
        assert!(gone.desc.contains("has not been found"), "{gone}");
        let refused = files.read(ReadArgs {
            handle,
            count: Some(READ_COUNT_MAX + 1),
        });
        assert!(refused.is_err());
        let bad_mode = files.open(OpenArgs {
            path,
            mode: Some("rw".into()),
        });
        assert!(bad_mode.is_err());
    }
}
