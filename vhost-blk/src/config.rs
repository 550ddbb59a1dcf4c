//! What `sealvm-blk serve` serves: volumes from `--volume` specs or a TOML file.
//!
//! A `--volume` spec is `NAME=PATH` followed by comma-separated options; the file has the
//! same options as keys of `[[volume]]` tables:
//!
//! ```toml
//! api-socket = "blk.api"          # optional: one JSON API for every volume
//!
//! [[volume]]
//! name = "web1"
//! path = "web1.raw"
//! socket = "web1.sock"            # its vhost-user socket
//! journal = "web1.journal"        # optional: journal every write
//! retain = "24h"                  # optional: how far back points in time reach
//! retain-bytes = "20G"            # optional
//! consumer-budget = "40G"         # optional: past this, lagging consumers are marked for resync
//! segment-size = "64M"            # optional, default 64M
//! write-through = false           # optional: fdatasync every write
//! readonly = false                # optional (not with a journal)
//! queues = 2                      # optional, default 1
//! ```

use crate::volume::{JournalOptions, MAX_SEGMENT_BYTES};
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// The most request queues (worker threads) one volume may have.
pub const MAX_QUEUES: usize = 16;

/// Errors describing what to serve.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A `--volume` spec or config value is malformed.
    #[error("volume {volume:?}: {problem}")]
    Volume {
        /// The volume (its spec or name).
        volume: String,
        /// What is wrong, and what is expected.
        problem: String,
    },
    /// The config file could not be read.
    #[error("cannot read the config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with the line.
        message: String,
    },
    /// The set of volumes is inconsistent.
    #[error("{0}")]
    Inconsistent(String),
}

/// One volume to serve.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeConfig {
    /// Its name, as the API and logs call it.
    pub name: String,
    /// The raw image.
    pub path: PathBuf,
    /// The vhost-user socket it is served on.
    pub socket: PathBuf,
    /// The journal directory, when every write is journaled.
    pub journal: Option<PathBuf>,
    /// Refuse writes.
    pub read_only: bool,
    /// Request queues, one worker thread each.
    pub queues: usize,
    /// Journal options (write-through, segment size, retention).
    pub options: JournalOptions,
}

/// Everything `serve` serves.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// The JSON API socket for all volumes.
    pub api_socket: Option<PathBuf>,
    /// The volumes, each on its own socket.
    pub volumes: Vec<VolumeConfig>,
}

/// `30s`, `15m`, `24h`, `7d` or plain seconds.
pub fn parse_age(text: &str) -> Option<u64> {
    let (number, unit) = match text.char_indices().last()? {
        (i, 's') => (&text[..i], 1),
        (i, 'm') => (&text[..i], 60),
        (i, 'h') => (&text[..i], 3600),
        (i, 'd') => (&text[..i], 86400),
        _ => (text, 1),
    };
    number.parse::<u64>().ok()?.checked_mul(unit)
}

/// `4096`, `64K`, `512M`, `10G`, `1T` (powers of 1024).
pub fn parse_size(text: &str) -> Option<u64> {
    let (number, unit) = match text.char_indices().last()? {
        (i, 'K' | 'k') => (&text[..i], 1u64 << 10),
        (i, 'M') => (&text[..i], 1 << 20),
        (i, 'G') => (&text[..i], 1 << 30),
        (i, 'T') => (&text[..i], 1 << 40),
        _ => (text, 1),
    };
    number.parse::<u64>().ok()?.checked_mul(unit)
}

/// The keys a volume may have, in a spec (`key=value` or a bare flag) or a config file.
struct Options {
    socket: Option<PathBuf>,
    journal: Option<PathBuf>,
    read_only: bool,
    write_through: bool,
    retain: Option<String>,
    retain_bytes: Option<String>,
    consumer_budget: Option<String>,
    segment_size: Option<String>,
    queues: Option<usize>,
}

impl Options {
    fn into_volume(
        self,
        name: String,
        path: PathBuf,
        default_socket: Option<PathBuf>,
        default_queues: usize,
    ) -> Result<VolumeConfig, ConfigError> {
        let bad = |problem: String| ConfigError::Volume {
            volume: name.clone(),
            problem,
        };
        if name.is_empty() || path.as_os_str().is_empty() {
            return Err(bad("NAME and PATH must not be empty".into()));
        }
        let socket = self
            .socket
            .or(default_socket)
            .ok_or_else(|| bad("no socket: give it socket=PATH or a --socket".into()))?;
        let mut options = JournalOptions {
            write_through: self.write_through,
            ..JournalOptions::default()
        };
        if let Some(age) = &self.retain {
            options.retention.max_age_s = Some(
                parse_age(age).ok_or_else(|| bad(format!("retain={age} is not 30m, 24h or 7d")))?,
            );
        }
        if let Some(size) = &self.retain_bytes {
            options.retention.max_bytes = Some(
                parse_size(size)
                    .ok_or_else(|| bad(format!("retain-bytes={size} is not 512M or 10G")))?,
            );
        }
        if let Some(size) = &self.consumer_budget {
            options.retention.consumer_budget = Some(
                parse_size(size)
                    .ok_or_else(|| bad(format!("consumer-budget={size} is not 512M or 10G")))?,
            );
        }
        if let Some(size) = &self.segment_size {
            options.segment_bytes = parse_size(size)
                .filter(|s| (4096..=MAX_SEGMENT_BYTES).contains(s))
                .ok_or_else(|| bad(format!("segment-size={size} is not 4K to 1G")))?;
        }
        let journaled_only = self.retain.is_some()
            || self.retain_bytes.is_some()
            || self.consumer_budget.is_some()
            || self.segment_size.is_some()
            || self.write_through;
        if self.journal.is_none() && journaled_only {
            return Err(bad(
                "retain, retain-bytes, consumer-budget, segment-size and write-through need a journal".into(),
            ));
        }
        if self.journal.is_some() && self.read_only {
            return Err(bad(
                "a journaled volume cannot be read-only; drop journal or readonly".into(),
            ));
        }
        let queues = self.queues.unwrap_or(default_queues);
        if !(1..=MAX_QUEUES).contains(&queues) {
            return Err(bad(format!("queues={queues} is not 1 to {MAX_QUEUES}")));
        }
        Ok(VolumeConfig {
            name,
            path,
            socket,
            journal: self.journal,
            read_only: self.read_only,
            queues,
            options,
        })
    }
}

/// Parses a `--volume` spec: `NAME=PATH[,socket=S][,journal=DIR][,readonly]
/// [,write-through][,retain=AGE][,retain-bytes=SIZE][,consumer-budget=SIZE][,segment-size=SIZE]
/// [,queues=N]`.
/// `default_socket` (the matching `--socket`) and `default_queues` fill what it leaves out.
pub fn parse_volume(
    spec: &str,
    default_socket: Option<PathBuf>,
    default_queues: usize,
) -> Result<VolumeConfig, ConfigError> {
    let bad = |problem: String| ConfigError::Volume {
        volume: spec.into(),
        problem,
    };
    let mut parts = spec.split(',');
    let first = parts.next().unwrap_or_default();
    let (name, path) = first.split_once('=').ok_or_else(|| {
        bad(
            "expected NAME=PATH[,socket=S][,journal=DIR][,readonly][,write-through]\
             [,retain=AGE][,retain-bytes=SIZE][,consumer-budget=SIZE][,segment-size=SIZE]\
             [,queues=N]"
                .into(),
        )
    })?;
    let mut options = Options {
        socket: None,
        journal: None,
        read_only: false,
        write_through: false,
        retain: None,
        retain_bytes: None,
        consumer_budget: None,
        segment_size: None,
        queues: None,
    };
    for option in parts {
        match option.split_once('=') {
            Some(("socket", path)) => options.socket = Some(path.into()),
            Some(("journal", dir)) => options.journal = Some(dir.into()),
            Some(("retain", age)) => options.retain = Some(age.into()),
            Some(("retain-bytes", size)) => options.retain_bytes = Some(size.into()),
            Some(("consumer-budget", size)) => options.consumer_budget = Some(size.into()),
            Some(("segment-size", size)) => options.segment_size = Some(size.into()),
            Some(("queues", n)) => {
                options.queues = Some(
                    n.parse()
                        .map_err(|_| bad(format!("queues={n} is not a number")))?,
                )
            }
            None if option == "readonly" => options.read_only = true,
            None if option == "write-through" => options.write_through = true,
            _ => return Err(bad(format!("unknown option {option:?}"))),
        }
    }
    options.into_volume(name.into(), path.into(), default_socket, default_queues)
}

/// Builds the config from the command line: each `--volume` takes its socket from a
/// `socket=` option or, in order, from the `--socket` arguments.
pub fn from_args(
    volumes: &[String],
    sockets: &[PathBuf],
    api_socket: Option<PathBuf>,
    queues: usize,
) -> Result<ServeConfig, ConfigError> {
    let mut sockets = sockets.iter().cloned();
    let mut parsed = Vec::new();
    for spec in volumes {
        let own_socket = spec.split(',').any(|o| o.starts_with("socket="));
        let default = if own_socket { None } else { sockets.next() };
        parsed.push(parse_volume(spec, default, queues)?);
    }
    if sockets.next().is_some() {
        return Err(ConfigError::Inconsistent(
            "more --socket arguments than volumes without socket=".into(),
        ));
    }
    check(ServeConfig {
        api_socket,
        volumes: parsed,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    api_socket: Option<PathBuf>,
    #[serde(default)]
    volume: Vec<FileVolume>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileVolume {
    name: String,
    path: PathBuf,
    socket: PathBuf,
    journal: Option<PathBuf>,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    write_through: bool,
    retain: Option<String>,
    retain_bytes: Option<String>,
    consumer_budget: Option<String>,
    segment_size: Option<String>,
    queues: Option<usize>,
}

/// Reads a TOML config file (layout in the module documentation). Relative paths in it are
/// relative to the file's directory.
pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let resolve = |p: PathBuf| if p.is_absolute() { p } else { dir.join(p) };
    let mut volumes = Vec::new();
    for v in file.volume {
        let options = Options {
            socket: Some(resolve(v.socket)),
            journal: v.journal.map(resolve),
            read_only: v.readonly,
            write_through: v.write_through,
            retain: v.retain,
            retain_bytes: v.retain_bytes,
            consumer_budget: v.consumer_budget,
            segment_size: v.segment_size,
            queues: v.queues,
        };
        volumes.push(options.into_volume(v.name, resolve(v.path), None, 1)?);
    }
    check(ServeConfig {
        api_socket: file.api_socket.map(resolve),
        volumes,
    })
}

/// At least one volume; names, sockets, images and journals each used once.
fn check(config: ServeConfig) -> Result<ServeConfig, ConfigError> {
    if config.volumes.is_empty() {
        return Err(ConfigError::Inconsistent(
            "nothing to serve: give --volume (with --socket) or --config".into(),
        ));
    }
    let mut seen = HashSet::new();
    for v in &config.volumes {
        let mut claims = vec![
            ("name", PathBuf::from(&v.name)),
            ("socket", v.socket.clone()),
            ("image", v.path.clone()),
        ];
        claims.extend(v.journal.clone().map(|j| ("journal", j)));
        for (what, value) in claims {
            if !seen.insert((what, value.clone())) {
                return Err(ConfigError::Inconsistent(format!(
                    "{what} {} is used by two volumes",
                    value.display()
                )));
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_and_sizes_parse() {
        assert_eq!(parse_age("90"), Some(90));
        assert_eq!(parse_age("15m"), Some(900));
        assert_eq!(parse_age("24h"), Some(86400));
        assert_eq!(parse_age("7d"), Some(7 * 86400));
        assert_eq!(parse_age("h"), None);
        assert_eq!(parse_age("-1h"), None);
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64K"), Some(64 << 10));
        assert_eq!(parse_size("20G"), Some(20 << 30));
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(parse_size("1.5G"), None);
    }

    #[test]
    fn volume_specs_take_sockets_in_order_or_their_own() {
        let config = from_args(
            &[
                "a=a.raw,journal=a.j,retain=1h,retain-bytes=1G,segment-size=1M".into(),
                "b=b.raw,socket=b.sock,readonly,queues=4".into(),
                "c=c.raw".into(),
            ],
            &["a.sock".into(), "c.sock".into()],
            None,
            2,
        )
        .unwrap();
        let [a, b, c] = &config.volumes[..] else {
            panic!("{config:?}")
        };
        assert_eq!(a.socket, PathBuf::from("a.sock"));
        assert_eq!(a.options.retention.max_age_s, Some(3600));
        assert_eq!(a.options.retention.max_bytes, Some(1 << 30));
        assert_eq!(a.options.segment_bytes, 1 << 20);
        assert_eq!((a.queues, b.queues), (2, 4));
        assert_eq!(b.socket, PathBuf::from("b.sock"));
        assert!(b.read_only);
        assert_eq!(c.socket, PathBuf::from("c.sock"));
    }

    #[test]
    fn bad_volume_sets_are_refused_with_the_reason() {
        let refused = |volumes: &[&str], sockets: &[&str], expected: &str| {
            let volumes: Vec<String> = volumes.iter().map(|s| s.to_string()).collect();
            let sockets: Vec<PathBuf> = sockets.iter().map(PathBuf::from).collect();
            let e = from_args(&volumes, &sockets, None, 1)
                .unwrap_err()
                .to_string();
            assert!(e.contains(expected), "{e:?} does not say {expected:?}");
        };
        refused(&["a=a.raw"], &[], "no socket");
        refused(&["a=a.raw"], &["1", "2"], "more --socket");
        refused(
            &["a=a.raw", "a=b.raw"],
            &["1", "2"],
            "name a is used by two",
        );
        refused(
            &["a=x.raw", "b=x.raw"],
            &["1", "2"],
            "image x.raw is used by two",
        );
        refused(&["a=a.raw,retain=soon"], &["1"], "retain=soon");
        refused(&["a=a.raw,retain=1h"], &["1"], "need a journal");
        refused(
            &["a=a.raw,journal=j,readonly"],
            &["1"],
            "cannot be read-only",
        );
        refused(&["a=a.raw,queues=99"], &["1"], "queues=99");
        refused(&["a=a.raw,bogus"], &["1"], "unknown option");
        refused(&["a.raw"], &["1"], "expected NAME=PATH");
        refused(&[], &[], "nothing to serve");
    }

    #[test]
    fn a_config_file_describes_volumes_relative_to_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blk.toml");
        std::fs::write(
            &path,
            r#"
api-socket = "blk.api"
[[volume]]
name = "web1"
path = "web1.raw"
socket = "web1.sock"
journal = "/abs/web1.journal"
retain = "24h"
[[volume]]
name = "db"
path = "db.raw"
socket = "db.sock"
queues = 2
"#,
        )
        .unwrap();
        let config = from_file(&path).unwrap();
        assert_eq!(config.api_socket, Some(dir.path().join("blk.api")));
        assert_eq!(config.volumes[0].path, dir.path().join("web1.raw"));
        assert_eq!(
            config.volumes[0].journal,
            Some(PathBuf::from("/abs/web1.journal"))
        );
        assert_eq!(config.volumes[0].options.retention.max_age_s, Some(86400));
        assert_eq!(config.volumes[1].queues, 2);

        std::fs::write(
            &path,
            "[[volume]]\nname = \"x\"\npath = \"x\"\nsocket = \"s\"\ncolour = 1\n",
        )
        .unwrap();
        let e = from_file(&path).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
