//! The agent's state and its dispatch: which module answers each qemu-guest-agent command
//! (and each `sealvm-` extension), and the gating qga applies around them (see
//! [`crate::command_table`]). Transport-free: [`Agent::handle`] takes a decoded request and
//! gives the bytes to send back.

pub use crate::command_table::COMMANDS;
use crate::command_table::{
    ALLOWED_WHILE_FROZEN, DISABLED_ON_LINUX, NO_ARGUMENTS, NO_SUCCESS_RESPONSE,
};
use crate::exec::{ExecArgs, ExecTable};
use crate::files::FileTable;
use crate::freeze::Frozen;
pub use crate::freeze::{FreezeReport, ToolkitResult};
use crate::power::{self, SuspendMode};
use crate::protocol::{encode_error, encode_return, CommandError, ErrorClass, Request, DELIMITER};
use crate::toolkits;
use crate::{accounts, machine, network, storage, system};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How the agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// A freeze not thawed within this long thaws itself.
    pub freeze_timeout: Duration,
    /// Where user toolkits are read from.
    pub toolkits_dir: PathBuf,
    /// How long each toolkit script may run.
    pub script_timeout: Duration,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            freeze_timeout: Duration::from_secs(60),
            toolkits_dir: PathBuf::from(toolkits::USER_TOOLKITS_DIR),
            script_timeout: toolkits::SCRIPT_TIMEOUT,
        }
    }
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) frozen: Option<Frozen>,
    pub(crate) last_freeze: Option<FreezeReport>,
    pub(crate) generation: u64,
}

/// What to send back for one request.
#[derive(Debug, PartialEq)]
pub enum Reply {
    /// These bytes.
    Send(Vec<u8>),
    /// Nothing (guest-shutdown answers only by going away).
    Nothing,
}

/// The agent: shared by the transport loop and the auto-thaw timer.
#[derive(Clone)]
pub struct Agent {
    pub(crate) config: AgentConfig,
    state: Arc<Mutex<State>>,
    exec: ExecTable,
    files: FileTable,
    started: Instant,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SyncArgs {
    id: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FreezeListArgs {
    #[serde(default)]
    mountpoints: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecStatusArgs {
    pid: u32,
}

impl Agent {
    /// A new agent with nothing frozen.
    pub fn new(config: AgentConfig) -> Self {
        Agent {
            config,
            state: Arc::new(Mutex::new(State::default())),
            exec: ExecTable::default(),
            files: FileTable::default(),
            started: Instant::now(),
        }
    }

    /// Answers one request.
    pub fn handle(&self, request: Request) -> Reply {
        let id = request.id.clone();
        let command = request.execute.as_str();
        let known = COMMANDS.contains(&command);
        if known && !self.enabled(command) {
            return Reply::Send(encode_error(&CommandError::disabled(command), id.as_ref()));
        }
        if NO_ARGUMENTS.contains(&command) {
            if let Some(name) = request
                .arguments
                .as_ref()
                .and_then(|a| a.as_object())
                .and_then(|a| a.keys().next())
            {
                let error = CommandError::generic(format!("Parameter '{name}' is unexpected"));
                return Reply::Send(encode_error(&error, id.as_ref()));
            }
        }
        let silent_on_success = NO_SUCCESS_RESPONSE.contains(&command);
        match self.dispatch(&request) {
            Ok(_) if silent_on_success => Reply::Nothing,
            Ok(value) if command == "guest-sync-delimited" => {
                let mut bytes = vec![DELIMITER];
                bytes.extend(encode_return(value, id.as_ref()));
                Reply::Send(bytes)
            }
            Ok(value) => Reply::Send(encode_return(value, id.as_ref())),
            Err(e) => Reply::Send(encode_error(&e, id.as_ref())),
        }
    }

    /// Whether `command` may run now: qga disables some commands on Linux, and all but a
    /// few while the filesystems are frozen.
    fn enabled(&self, command: &str) -> bool {
        if DISABLED_ON_LINUX.contains(&command) {
            return false;
        }
        self.lock().frozen.is_none() || ALLOWED_WHILE_FROZEN.contains(&command)
    }

    fn dispatch(&self, request: &Request) -> Result<Value, CommandError> {
        let files = &self.files;
        match request.execute.as_str() {
            "guest-sync" | "guest-sync-delimited" => Ok(json!(parse::<SyncArgs>(request)?.id)),
            "guest-ping" => Ok(json!({})),
            "guest-info" => Ok(json!({
                "version": env!("CARGO_PKG_VERSION"),
                "supported_commands": COMMANDS.iter().map(|name| json!({
                    "name": name,
                    "enabled": self.enabled(name),
                    "success-response": !NO_SUCCESS_RESPONSE.contains(name),
                })).collect::<Vec<_>>(),
            })),
            "guest-get-osinfo" => Ok(system::osinfo()),
            "guest-get-host-name" => system::host_name(),
            "guest-get-timezone" => Ok(system::timezone()),
            "guest-get-users" => Ok(system::users()),
            "guest-get-time" => system::time(),
            "guest-set-time" => system::set_time(parse(request)?),
            "guest-get-fsinfo" => storage::fsinfo(),
            "guest-get-disks" => storage::disks(),
            "guest-get-diskstats" => storage::diskstats(),
            "guest-fstrim" => storage::fstrim(parse(request)?),
            "guest-get-cpustats" => machine::cpustats(),
            "guest-get-vcpus" => machine::vcpus(),
            "guest-set-vcpus" => machine::set_vcpus(parse(request)?),
            "guest-get-memory-blocks" => machine::memory_blocks(),
            "guest-set-memory-blocks" => Ok(machine::set_memory_blocks(parse(request)?)),
            "guest-get-memory-block-info" => machine::memory_block_info(),
            "guest-network-get-interfaces" => network::interfaces(),
            "guest-fsfreeze-status" => Ok(json!(if self.lock().frozen.is_some() {
                "frozen"
            } else {
                "thawed"
            })),
            "guest-fsfreeze-freeze" => self.freeze(None),
            "guest-fsfreeze-freeze-list" => {
                let args = parse::<FreezeListArgs>(request)?;
                self.freeze(args.mountpoints)
            }
            "guest-fsfreeze-thaw" => self.thaw("thawed"),
            "guest-shutdown" => power::shutdown(parse(request)?).map(|()| Value::Null),
            "guest-suspend-disk" => power::suspend(SuspendMode::Disk).map(|()| Value::Null),
            "guest-suspend-ram" => power::suspend(SuspendMode::Ram).map(|()| Value::Null),
            "guest-suspend-hybrid" => power::suspend(SuspendMode::Hybrid).map(|()| Value::Null),
            "guest-exec" => self.exec.start(parse::<ExecArgs>(request)?),
            "guest-exec-status" => self.exec.status(parse::<ExecStatusArgs>(request)?.pid),
            "guest-file-open" => files.open(parse(request)?),
            "guest-file-close" => files.close(parse(request)?),
            "guest-file-read" => files.read(parse(request)?),
            "guest-file-write" => files.write(parse(request)?),
            "guest-file-seek" => files.seek(parse(request)?),
            "guest-file-flush" => files.flush(parse(request)?),
            "guest-set-user-password" => accounts::set_user_password(parse(request)?),
            "guest-ssh-get-authorized-keys" => accounts::get_authorized_keys(parse(request)?),
            "guest-ssh-add-authorized-keys" => accounts::add_authorized_keys(parse(request)?),
            "guest-ssh-remove-authorized-keys" => accounts::remove_authorized_keys(parse(request)?),
            "sealvm-toolkits" => Ok(self.toolkits_report()),
            "sealvm-heartbeat" => Ok(self.heartbeat()),
            other => Err(CommandError {
                class: ErrorClass::CommandNotFound,
                desc: format!("The command {other} has not been found"),
            }),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn toolkits_report(&self) -> Value {
        let system = toolkits::SystemView::read();
        let list: Vec<Value> = toolkits::all(&self.config.toolkits_dir)
            .into_iter()
            .map(|t| {
                let detected = t.detected(&system);
                let mut entry = serde_json::to_value(&t).unwrap_or(Value::Null);
                entry["detected"] = json!(detected);
                entry
            })
            .collect();
        Value::Array(list)
    }

    fn heartbeat(&self) -> Value {
        let uptime = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        let state = self.lock();
        json!({
            "uptime-seconds": uptime,
            "agent-uptime-seconds": self.started.elapsed().as_secs_f64(),
            "frozen": state.frozen.is_some(),
            "current-freeze": state.frozen.as_ref().map(|f| &f.report),
            "last-freeze": state.last_freeze,
            "version": env!("CARGO_PKG_VERSION"),
        })
    }
}

/// Parses a request's arguments into `T`; a missing argument object counts as `{}`.
fn parse<T: for<'de> Deserialize<'de>>(request: &Request) -> Result<T, CommandError> {
    let args = request.arguments.clone().unwrap_or_else(|| json!({}));
    serde_json::from_value(args).map_err(|e| {
        CommandError::generic(format!("Invalid arguments for {}: {e}", request.execute))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(agent: &Agent, text: &str) -> Value {
        let request = Request::from_value(serde_json::from_str(text).unwrap()).unwrap();
        match agent.handle(request) {
            Reply::Send(bytes) => {
                let start = usize::from(bytes.first() == Some(&DELIMITER));
                serde_json::from_slice(&bytes[start..]).unwrap()
            }
            Reply::Nothing => Value::Null,
        }
    }

    #[test]
    fn sync_ping_info_and_unknown_commands() {
        let agent = Agent::new(AgentConfig::default());
        assert_eq!(
            answer(&agent, r#"{"execute":"guest-sync","arguments":{"id":42}}"#),
            json!({"return": 42})
        );
        assert_eq!(
            answer(&agent, r#"{"execute":"guest-ping","id":"a"}"#),
            json!({"return": {}, "id": "a"})
        );
        let info = answer(&agent, r#"{"execute":"guest-info"}"#);
        let names: Vec<&str> = info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, COMMANDS);
        let unknown = answer(&agent, r#"{"execute":"guest-frobnicate"}"#);
        assert_eq!(unknown["error"]["class"], "CommandNotFound");
        let bad_args = answer(&agent, r#"{"execute":"guest-sync","arguments":{"id":"x"}}"#);
        assert_eq!(bad_args["error"]["class"], "GenericError");
        let unexpected = answer(&agent, r#"{"execute":"guest-ping","arguments":{"pad":1}}"#);
        assert_eq!(unexpected["error"]["desc"], "Parameter 'pad' is unexpected");
    }

    #[test]
    fn sync_delimited_answer_starts_with_the_delimiter() {
        let agent = Agent::new(AgentConfig::default());
        let request =
            Request::from_value(json!({"execute":"guest-sync-delimited","arguments":{"id":9}}))
                .unwrap();
        let Reply::Send(bytes) = agent.handle(request) else {
            panic!()
        };
        assert_eq!(bytes[0], DELIMITER);
        assert_eq!(&bytes[1..], b"{\"return\":9}\n");
    }

    /// Polls guest-exec-status until the program has exited; returns that status.
    fn exited(agent: &Agent, pid: u64) -> Value {
        loop {
            let s = answer(
                agent,
                &format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#),
            );
            if s["return"]["exited"] == json!(true) {
                return s["return"].clone();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn exec_output_past_the_limit_is_cut_and_says_so() {
        use base64::Engine;
        let agent = Agent::new(AgentConfig::default());
        let started = answer(
            &agent,
            &format!(
                r#"{{"execute":"guest-exec","arguments":{{"path":"/bin/sh","arg":["-c","head -c {} /dev/zero"],"capture-output":true}}}}"#,
                crate::exec::OUTPUT_LIMIT + 100
            ),
        );
        let pid = started["return"]["pid"].as_u64().unwrap();
        let status = exited(&agent, pid);
        assert_eq!(status["exitcode"], 0, "the program was blocked or killed");
        assert_eq!(status["out-truncated"], json!(true));
        let kept = base64::engine::general_purpose::STANDARD
            .decode(status["out-data"].as_str().unwrap())
            .unwrap();
        assert_eq!(kept.len() as u64, crate::exec::OUTPUT_LIMIT);
        assert!(status.get("err-data").is_none());
    }

    #[test]
    fn exec_runs_a_program_and_returns_its_output() {
        let agent = Agent::new(AgentConfig::default());
        let started = answer(
            &agent,
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","read x; echo out-$x; echo err >&2; exit 3"],"input-data":"aGk=","capture-output":true}}"#,
        );
        let pid = started["return"]["pid"].as_u64().unwrap();
        let status = exited(&agent, pid);
        assert_eq!(status["exitcode"], 3);
        assert_eq!(status["out-data"], json!("b3V0LWhpCg==")); // "out-hi\n"
        assert_eq!(status["err-data"], json!("ZXJyCg==")); // "err\n"
        assert_eq!(status["out-truncated"], json!(false));
        assert_eq!(status["err-truncated"], json!(false));
        let gone = answer(
            &agent,
            &format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#),
        );
        assert!(gone["error"]["desc"].as_str().unwrap().contains("pid"));
        let missing = answer(
            &agent,
            r#"{"execute":"guest-exec","arguments":{"path":"/no/such/program"}}"#,
        );
        assert_eq!(missing["error"]["class"], "GenericError");
    }

    #[test]
    fn a_failing_toolkit_is_reported_and_makes_the_freeze_crash_consistent_only() {
        let dir = tempfile::tempdir().unwrap();
        let kit = dir.path().join("broken-app");
        std::fs::create_dir(&kit).unwrap();
        std::fs::write(kit.join("detect"), "file /\n").unwrap();
        let quiesce = kit.join("quiesce");
        std::fs::write(&quiesce, "#!/bin/sh\necho cannot-quiesce\nexit 7\n").unwrap();
        std::fs::write(kit.join("resume"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&quiesce, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(kit.join("resume"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let agent = Agent::new(AgentConfig {
            toolkits_dir: dir.path().to_path_buf(),
            ..AgentConfig::default()
        });
        // /proc cannot be frozen (EOPNOTSUPP, skipped), so nothing on the machine running
        // the test freezes: the freeze goes through the toolkits and freezes nothing.
        let answer = answer(
            &agent,
            r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/proc"]}}"#,
        );
        assert_eq!(answer["return"], 0, "{answer}");
        let status = super::tests::answer(&agent, r#"{"execute":"guest-fsfreeze-status"}"#);
        assert_eq!(status["return"], "thawed");
        let heartbeat = super::tests::answer(&agent, r#"{"execute":"sealvm-heartbeat"}"#);
        let last = &heartbeat["return"]["last-freeze"];
        assert_eq!(last["result"], "nothing-frozen");
        assert_eq!(last["application-consistent"], false);
        let broken = last["toolkit-results"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == "broken-app")
            .cloned()
            .unwrap();
        assert_eq!(broken["result"], "failed");
        let error = broken["error"].as_str().unwrap();
        assert!(
            error.contains("quiesce") && error.contains("cannot-quiesce"),
            "{error}"
        );
    }

    #[test]
    fn exec_status_answers_at_once_while_a_background_child_holds_the_output() {
        let agent = Agent::new(AgentConfig::default());
        let started = answer(
            &agent,
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 2 & echo started"],"capture-output":true}}"#,
        );
        let pid = started["return"]["pid"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let asked = Instant::now();
        let status = answer(
            &agent,
            &format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#),
        );
        let ping = answer(&agent, r#"{"execute":"guest-ping"}"#);
        assert!(
            asked.elapsed() < Duration::from_millis(500),
            "status and ping took {:?}",
            asked.elapsed()
        );
        assert_eq!(status["return"], json!({"exited": false}));
        assert_eq!(ping["return"], json!({}));
        let done = exited(&agent, pid);
        assert_eq!(done["out-data"], json!("c3RhcnRlZAo=")); // "started\n"
    }

    #[test]
    fn exec_capture_modes_merge_or_pick_streams() {
        let agent = Agent::new(AgentConfig::default());
        let run = |mode: &str| {
            let started = answer(
                &agent,
                &format!(
                    r#"{{"execute":"guest-exec","arguments":{{"path":"/bin/sh","arg":["-c","echo o; echo e >&2"],"capture-output":{mode}}}}}"#
                ),
            );
            exited(&agent, started["return"]["pid"].as_u64().unwrap())
        };
        let merged = run(r#""merged""#);
        assert_eq!(merged["out-data"], json!("bwplCg==")); // "o\ne\n"
        assert!(merged.get("err-data").is_none());
        let stderr = run(r#""stderr""#);
        assert!(stderr.get("out-data").is_none());
        assert_eq!(stderr["err-data"], json!("ZQo="));
        let none = run("false");
        assert!(none.get("out-data").is_none() && none.get("err-data").is_none());
    }

    /// Marks the agent frozen without freezing anything on the machine running the test.
    fn pretend_frozen(agent: &Agent) {
        agent.lock().frozen = Some(Frozen {
            mountpoints: Vec::new(),
            toolkits: Vec::new(),
            report: FreezeReport::new(0, Vec::new()),
            at: Instant::now(),
            generation: 0,
        });
    }

    #[test]
    fn while_frozen_only_qga_allowlisted_commands_run() {
        let agent = Agent::new(AgentConfig::default());
        pretend_frozen(&agent);
        for refused in [
            r#"{"execute":"guest-exec","arguments":{"path":"/bin/true"},"id":1}"#,
            r#"{"execute":"guest-file-open","arguments":{"path":"/tmp/x","mode":"w"},"id":1}"#,
            r#"{"execute":"guest-fsfreeze-freeze","id":1}"#,
            r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/"]},"id":1}"#,
            r#"{"execute":"guest-set-time","id":1}"#,
        ] {
            let got = answer(&agent, refused);
            assert_eq!(got["error"]["class"], "CommandNotFound", "{refused}: {got}");
            assert!(
                got["error"]["desc"]
                    .as_str()
                    .unwrap()
                    .contains("has been disabled"),
                "{got}"
            );
            assert_eq!(got["id"], 1);
        }
        assert_eq!(
            answer(&agent, r#"{"execute":"guest-ping"}"#)["return"],
            json!({})
        );
        assert_eq!(
            answer(&agent, r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
            "frozen"
        );
        let info = answer(&agent, r#"{"execute":"guest-info"}"#);
        let enabled = |name: &str| {
            info["return"]["supported_commands"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()["enabled"]
                .clone()
        };
        assert_eq!(enabled("guest-exec"), false);
        assert_eq!(enabled("guest-fsfreeze-thaw"), true);
        answer(&agent, r#"{"execute":"guest-fsfreeze-thaw"}"#);
        assert_eq!(
            answer(&agent, r#"{"execute":"guest-fsfreeze-status"}"#)["return"],
            "thawed"
        );
    }

    #[test]
    fn commands_qga_disables_on_linux_answer_disabled() {
        let agent = Agent::new(AgentConfig::default());
        let got = answer(&agent, r#"{"execute":"guest-get-devices"}"#);
        assert_eq!(got["error"]["class"], "CommandNotFound");
        let bad = answer(
            &agent,
            r#"{"execute":"guest-shutdown","arguments":{"mode":"explode"},"id":null}"#,
        );
        assert_eq!(bad["error"]["class"], "GenericError");
        assert_eq!(bad["id"], Value::Null);
        assert!(bad.as_object().unwrap().contains_key("id"));
    }

    #[test]
    fn file_commands_round_trip_through_the_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let agent = Agent::new(AgentConfig::default());
        let handle = answer(
            &agent,
            &format!(
                r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"w+"}}}}"#,
                path.display()
            ),
        )["return"]
            .as_i64()
            .unwrap();
        let wrote = answer(
            &agent,
            &format!(
                r#"{{"execute":"guest-file-write","arguments":{{"handle":{handle},"buf-b64":"aGVsbG8="}}}}"#
            ),
        );
        assert_eq!(wrote["return"]["count"], 5);
        answer(
            &agent,
            &format!(r#"{{"execute":"guest-file-close","arguments":{{"handle":{handle}}}}}"#),
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
    }
}
