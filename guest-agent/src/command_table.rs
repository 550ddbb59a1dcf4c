//! The agent's command table: the commands it answers (qemu-ga 7.2's Linux set and two
//! `sealvm-` extensions) and how qga treats each, which commands answer nothing, which
//! stay enabled while frozen, which take no arguments, which qga keeps disabled on Linux.

/// The commands the agent answers, as guest-info lists them.
pub const COMMANDS: &[&str] = &[
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-timezone",
    "guest-get-users",
    "guest-get-time",
    "guest-set-time",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-get-diskstats",
    "guest-get-cpustats",
    "guest-get-vcpus",
    "guest-set-vcpus",
    "guest-get-memory-blocks",
    "guest-set-memory-blocks",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
    "guest-get-devices",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-set-user-password",
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "sealvm-toolkits",
    "sealvm-heartbeat",
];

/// Commands that answer nothing on success (qga's `success-response: false`).
pub(crate) const NO_SUCCESS_RESPONSE: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// Commands that stay enabled while the filesystems are frozen: qga's
/// `ga_freeze_allowlist`, and sealvm's read-only extensions. Everything else (exec, file
/// writes, a second freeze) is refused as qga refuses it: disabled, `CommandNotFound`.
pub(crate) const ALLOWED_WHILE_FROZEN: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-sync-delimited",
    "guest-fsfreeze-status",
    "guest-fsfreeze-thaw",
    "sealvm-toolkits",
    "sealvm-heartbeat",
];

/// Commands that take no arguments: qga refuses any argument given to them.
pub(crate) const NO_ARGUMENTS: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-timezone",
    "guest-get-users",
    "guest-get-time",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-get-diskstats",
    "guest-get-cpustats",
    "guest-get-vcpus",
    "guest-get-memory-blocks",
    "guest-get-memory-block-info",
    "guest-network-get-interfaces",
    "guest-get-devices",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-thaw",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "sealvm-toolkits",
    "sealvm-heartbeat",
];

/// Commands qga offers only on Windows and keeps disabled on Linux; listed so tools see
/// the same command table, answered as qga answers them.
pub(crate) const DISABLED_ON_LINUX: &[&str] = &["guest-get-devices"];
