// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Test support for real-guest tests: boots Debian's User-Mode Linux (UML)
//! kernel as an ordinary process, acting as a vhost-user frontend through
//! `virtio_uml`, and drives the guest agent that `scripts/real-guest/setup.sh`
//! puts into the initramfs.
//!
//! The agent reads one command per console line and answers command `n`
//! (numbered from 1 in the order sent) with
//!
//! ```text
//! @@BEGIN n <command>
//! @@n <body line>          (zero or more)
//! @@END n ok               or   @@END n error <message>
//! ```
//!
//! Lines not framed this way (kernel messages, UML's own output) are kept
//! in the console log but otherwise ignored.

#![allow(dead_code)]

pub mod daemon;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Virtio device id of the memory balloon.
pub const BALLOON_DEVICE_ID: u32 = 5;

/// Protocol version the agent announces in `@@READY`.
pub const AGENT_PROTOCOL: u32 = 1;

/// How the guest is booted.
#[derive(Clone, Debug)]
pub struct UmlConfig {
    /// Guest memory (UML `mem=`), in MiB.
    pub mem_mib: u64,
    /// vhost-user socket UML connects to at boot; empty for no device.
    pub socket: PathBuf,
    /// Virtio device id served on `socket`.
    pub device_id: u32,
    /// Extra kernel command line arguments.
    pub extra_args: Vec<String>,
    /// Time allowed from start until the agent is ready.
    pub boot_timeout: Duration,
    /// Load virtio_balloon.ko at boot (`realguest.insmod=0` otherwise).
    pub load_balloon_module: bool,
    /// Console log level while the agent runs (`realguest.printk=`);
    /// `None` keeps init's default of 1 (only emergencies on the console).
    pub console_log_level: Option<u8>,
}

impl Default for UmlConfig {
    fn default() -> Self {
        UmlConfig {
            mem_mib: 512,
            socket: PathBuf::new(),
            device_id: BALLOON_DEVICE_ID,
            extra_args: Vec::new(),
            boot_timeout: Duration::from_secs(120),
            load_balloon_module: true,
            console_log_level: None,
        }
    }
}

/// What `scripts/real-guest/setup.sh` built.
#[derive(Clone, Debug)]
pub struct GuestSetup {
    /// Output directory of setup.sh.
    pub dir: PathBuf,
    /// The UML kernel binary.
    pub linux: PathBuf,
    /// Its version (e.g. `6.1.176`).
    pub kernel_version: String,
    /// The initramfs.
    pub initrd: PathBuf,
    /// Path of virtio_balloon.ko inside the guest.
    pub balloon_module: String,
}

impl GuestSetup {
    /// Directory holding the setup output: `$REAL_GUEST_DIR`, or
    /// `<repo>/target/real-guest`.
    pub fn dir() -> PathBuf {
        match std::env::var_os("REAL_GUEST_DIR") {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("real-guest"),
        }
    }

    /// Runs `scripts/real-guest/setup.sh` once per test process (it is
    /// idempotent and takes a fraction of a second once built; a first run
    /// installs user-mode-linux and busybox-static with apt-get, which needs
    /// root). `REAL_GUEST_NO_SETUP=1` skips it, for a setup made elsewhere.
    fn ensure_setup(dir: &Path) -> Result<(), String> {
        static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        DONE.get_or_init(|| {
            if std::env::var_os("REAL_GUEST_NO_SETUP").is_some() {
                return Ok(());
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("scripts")
                .join("real-guest")
                .join("setup.sh");
            let out = Command::new("bash")
                .arg(&script)
                .env("REAL_GUEST_DIR", dir)
                .output()
                .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{} failed ({}):\n{}{}",
                    script.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ))
            }
        })
        .clone()
    }

    /// Runs setup.sh if needed and reads `<dir>/env`, failing with
    /// instructions when the setup is missing.
    pub fn locate() -> Result<GuestSetup, String> {
        let dir = GuestSetup::dir();
        GuestSetup::ensure_setup(&dir)?;
        let env_path = dir.join("env");
        let hint = "run `scripts/real-guest/setup.sh` from the repository root first \
                    (it installs user-mode-linux and busybox-static and builds the \
                    guest initramfs; set REAL_GUEST_DIR to use another output directory)";
        let text = std::fs::read_to_string(&env_path).map_err(|e| {
            format!(
                "real-guest setup not found: cannot read {}: {e}; {hint}",
                env_path.display()
            )
        })?;
        let vars: HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let get = |key: &str| {
            vars.get(key)
                .map(|v| v.to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("{} lacks {key}; {hint}", env_path.display()))
        };
        let setup = GuestSetup {
            linux: PathBuf::from(get("UML_LINUX")?),
            kernel_version: get("UML_KERNEL_VERSION")?,
            initrd: PathBuf::from(get("INITRD")?),
            balloon_module: get("BALLOON_MODULE")?,
            dir,
        };
        if get("AGENT_PROTOCOL")? != AGENT_PROTOCOL.to_string() {
            return Err(format!(
                "{} was made for another agent protocol; {hint}",
                env_path.display()
            ));
        }
        for path in [&setup.linux, &setup.initrd] {
            if !path.is_file() {
                return Err(format!("{} does not exist; {hint}", path.display()));
            }
        }
        Ok(setup)
    }
}

/// One answer of the agent.
#[derive(Clone, Debug)]
pub struct Reply {
    /// Sequence number of the command.
    pub seq: u64,
    /// Whether the agent answered `ok`.
    pub ok: bool,
    /// The message after `error` (empty when ok).
    pub message: String,
    /// Body lines, without their `@@n ` prefix, joined with '\n'.
    pub body: String,
}

impl Reply {
    /// The body's `key=value` lines.
    pub fn kv(&self) -> HashMap<String, String> {
        parse_kv(&self.body)
    }

    /// A `key=value` of the body parsed as an integer.
    pub fn kv_u64(&self, key: &str) -> Option<u64> {
        self.kv().get(key).and_then(|v| v.parse().ok())
    }
}

/// A running UML guest. Dropping it kills UML's whole process group.
pub struct Uml {
    child: Child,
    pgid: libc::pid_t,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: Arc<Mutex<Vec<String>>>,
    next_seq: u64,
    boot_time: Duration,
    module_loaded: Option<bool>,
    exit_status: Option<ExitStatus>,
    setup: GuestSetup,
    /// The command sent with [`Uml::send`] whose answer was not read yet.
    outstanding: Option<u64>,
    /// The processes [`Uml::stop`] stopped.
    stopped: Vec<libc::pid_t>,
}

fn spawn_reader<R: Read + Send + 'static>(
    stream: R,
    prefix: &'static str,
    tx: Sender<String>,
    log: Arc<Mutex<Vec<String>>>,
) {
    thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let text = String::from_utf8_lossy(&buf);
            let line: String = text
                .trim_end_matches(['\n', '\r'])
                .chars()
                .filter(|&c| c != '\r')
                .collect();
            let line = format!("{prefix}{line}");
            if let Ok(mut log) = log.lock() {
                log.push(line.clone());
            }
            // The receiver may be gone (Uml dropped): keep draining anyway
            // so UML never blocks on a full pipe.
            let _ = tx.send(line);
        }
    });
}

impl Uml {
    /// Boots UML and waits for the agent's `@@READY`.
    pub fn boot(config: &UmlConfig) -> Result<Uml, String> {
        let setup = GuestSetup::locate()?;
        if config.mem_mib == 0 {
            return Err("UmlConfig::mem_mib must not be 0".into());
        }
        let mut args = vec![
            format!("mem={}M", config.mem_mib),
            format!("initrd={}", setup.initrd.display()),
        ];
        if !config.socket.as_os_str().is_empty() {
            let socket = config.socket.to_str().ok_or("socket path is not UTF-8")?;
            if socket.contains([':', ',', ' ', '\t', '\n']) {
                return Err(format!(
                    "socket path {socket:?} cannot be passed to virtio_uml \
                     (no ':', ',' or blanks allowed)"
                ));
            }
            args.push(format!("virtio_uml.device={socket}:{}", config.device_id));
        }
        args.extend(["con0=fd:0,fd:1", "con=null", "ssl=null"].map(String::from));
        if !config.load_balloon_module {
            args.push("realguest.insmod=0".into());
        }
        if let Some(level) = config.console_log_level {
            args.push(format!("realguest.printk={level}"));
        }
        args.extend(config.extra_args.iter().cloned());

        let mut command = Command::new(&setup.linux);
        command
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // UML forks helper processes: give it a group of its own so that
            // Drop can kill them all.
            .process_group(0);
        if Path::new("/dev/shm").is_dir() {
            // Guest memory is a file in TMPDIR; tmpfs keeps it off disk.
            command.env("TMPDIR", "/dev/shm");
        }
        let start = Instant::now();
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", setup.linux.display()))?;
        let pgid = child.id() as libc::pid_t;
        let log = Arc::new(Mutex::new(vec![format!(
            "[host] {} {}",
            setup.linux.display(),
            args.join(" ")
        )]));
        let (tx, rx) = mpsc::channel();
        // Unwraps cannot fail: all three streams were piped above.
        spawn_reader(
            child.stdout.take().expect("piped stdout"),
            "",
            tx.clone(),
            log.clone(),
        );
        spawn_reader(
            child.stderr.take().expect("piped stderr"),
            "[stderr] ",
            tx,
            log.clone(),
        );
        let stdin = child.stdin.take();
        let mut uml = Uml {
            child,
            pgid,
            stdin,
            lines: rx,
            log,
            next_seq: 1,
            boot_time: Duration::ZERO,
            module_loaded: None,
            exit_status: None,
            setup,
            outstanding: None,
            stopped: Vec::new(),
        };
        let mut module_loaded = None;
        let ready = uml.wait_for_line(
            |line| {
                if line.starts_with("@@INIT module virtio_balloon loaded") {
                    module_loaded = Some(true);
                } else if line.starts_with("@@INIT module virtio_balloon FAILED") {
                    module_loaded = Some(false);
                }
                line.starts_with("@@READY")
            },
            config.boot_timeout,
        );
        let ready =
            ready.map_err(|e| format!("UML did not boot: {e}\n{}", uml.console_tail(60)))?;
        if ready.trim() != format!("@@READY {AGENT_PROTOCOL}") {
            return Err(format!(
                "agent speaks another protocol ({ready:?}); rerun scripts/real-guest/setup.sh"
            ));
        }
        uml.module_loaded = module_loaded;
        uml.boot_time = start.elapsed();
        Ok(uml)
    }

    /// Time from spawning UML to the agent being ready.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Whether /init reported virtio_balloon.ko as loaded (`None`: not tried).
    pub fn balloon_module_loaded(&self) -> Option<bool> {
        self.module_loaded
    }

    /// What setup.sh built.
    pub fn setup(&self) -> &GuestSetup {
        &self.setup
    }

    /// Process id of the main UML process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a console line matching `pred`, consuming (but logging)
    /// the lines before it.
    pub fn wait_for_line(
        &mut self,
        mut pred: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if pred(&line) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("timed out after {timeout:?} waiting for a line"));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.try_exit_status();
                    return Err(format!("UML closed its console (exit status: {status})"));
                }
            }
        }
    }

    fn try_exit_status(&mut self) -> String {
        // The pipes close a moment before the process is reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exit_status = Some(status);
                    return status.to_string();
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => return "still running".into(),
                Err(e) => return format!("unknown: {e}"),
            }
        }
    }

    /// Sends one command and returns the agent's answer, `ok` or not.
    pub fn cmd_reply(&mut self, cmd: &str, timeout: Duration) -> Result<Reply, String> {
        let seq = self.send(cmd)?;
        self.wait_reply(seq, cmd, timeout)
    }

    /// Sends one command without waiting for its answer: read it with
    /// [`wait_reply`](Self::wait_reply) before sending anything else (the
    /// agent answers one command after the other).
    pub fn send(&mut self, cmd: &str) -> Result<u64, String> {
        if let Some(seq) = self.outstanding {
            return Err(format!(
                "command #{seq} is still unanswered: wait_reply first"
            ));
        }
        if cmd.trim().is_empty() || cmd.len() > 4000 || cmd.chars().any(|c| c.is_control()) {
            return Err(format!(
                "invalid agent command {cmd:?} (must be one non-empty line)"
            ));
        }
        let seq = self.next_seq;
        let stdin = self.stdin.as_mut().ok_or("UML console already closed")?;
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("cannot send {cmd:?} to UML: {e}"))?;
        // The agent counts every line it receives, answered or not.
        self.next_seq = seq.checked_add(1).ok_or("sequence number overflow")?;
        self.outstanding = Some(seq);
        Ok(seq)
    }

    /// Waits for the answer to command `seq` (sent as `cmd`) from
    /// [`send`](Self::send).
    pub fn wait_reply(&mut self, seq: u64, cmd: &str, timeout: Duration) -> Result<Reply, String> {
        if self.outstanding != Some(seq) {
            return Err(format!(
                "command #{seq} is not the one waiting for its answer"
            ));
        }
        let reply = self.read_reply(seq, cmd, timeout);
        // On a timeout the command may still answer later: its lines are skipped then.
        self.outstanding = None;
        reply
    }

    fn read_reply(&mut self, seq: u64, cmd: &str, timeout: Duration) -> Result<Reply, String> {
        let body_tag = format!("@@{seq}");
        let end_tag = format!("@@END {seq} ");
        let mut body = Vec::new();
        let mut end = None;
        self.wait_for_line(
            |line| {
                if let Some(rest) = line.strip_prefix(&end_tag) {
                    end = Some(rest.to_string());
                    return true;
                }
                if let Some(rest) = line.strip_prefix(&body_tag) {
                    if rest.is_empty() {
                        body.push(String::new());
                    } else if let Some(text) = rest.strip_prefix(' ') {
                        body.push(text.to_string());
                    }
                }
                false
            },
            timeout,
        )
        .map_err(|e| {
            format!(
                "agent command {cmd:?} (#{seq}): {e}\n{}",
                self.console_tail(40)
            )
        })?;
        let end = end.unwrap_or_default();
        let (ok, message) = if end.trim_end() == "ok" {
            (true, String::new())
        } else if let Some(msg) = end.strip_prefix("error") {
            (false, msg.trim().to_string())
        } else {
            (false, format!("malformed END line: {end:?}"))
        };
        Ok(Reply {
            seq,
            ok,
            message,
            body: body.join("\n"),
        })
    }

    /// Sends one command; `Ok(body)` when the agent answered `ok`.
    pub fn cmd(&mut self, cmd: &str, timeout: Duration) -> Result<String, String> {
        let reply = self.cmd_reply(cmd, timeout)?;
        if reply.ok {
            Ok(reply.body)
        } else {
            Err(format!(
                "agent command {cmd:?} failed: {}\n{}",
                reply.message, reply.body
            ))
        }
    }

    /// /proc/meminfo, in kB (counts for the few unit-less fields).
    pub fn meminfo(&mut self) -> Result<HashMap<String, u64>, String> {
        Ok(parse_meminfo(
            &self.cmd("meminfo", Duration::from_secs(30))?,
        ))
    }

    /// Free blocks per order, summed over zones.
    pub fn buddyinfo(&mut self) -> Result<Vec<u64>, String> {
        Ok(parse_buddyinfo(
            &self.cmd("buddyinfo", Duration::from_secs(30))?,
        ))
    }

    /// /proc/vmstat counters.
    pub fn vmstat(&mut self) -> Result<HashMap<String, u64>, String> {
        Ok(parse_vmstat(&self.cmd("vmstat", Duration::from_secs(30))?))
    }

    /// The kernel log buffer.
    pub fn dmesg(&mut self) -> Result<String, String> {
        self.cmd("dmesg", Duration::from_secs(30))
    }

    /// Negotiated balloon features (`features`, `features_hex`,
    /// `feature_bits`, `feature_names`, `driver`, `status`, ...).
    pub fn features(&mut self) -> Result<HashMap<String, String>, String> {
        Ok(parse_kv(&self.cmd("features", Duration::from_secs(30))?))
    }

    /// Negotiated feature bits of the balloon device as a mask (bits 0..63).
    pub fn feature_mask(&mut self) -> Result<u64, String> {
        let features = self.features()?;
        let hex = features
            .get("features_hex")
            .ok_or("agent did not report features_hex")?;
        u64::from_str_radix(hex.trim_start_matches("0x"), 16)
            .map_err(|e| format!("bad features_hex {hex:?}: {e}"))
    }

    /// Writes `mib` MiB of guest memory and frees it again; returns the
    /// agent's `key=value` report (`ms`, `touch_ms`, `free_ms`, ...).
    pub fn dirty(&mut self, mib: u64) -> Result<HashMap<String, String>, String> {
        let body = self.cmd(&format!("dirty {mib}"), memory_timeout(mib))?;
        Ok(parse_kv(&body))
    }

    /// Allocates and holds `mib` MiB; the reply tells how much was got
    /// (`got_mib`) when the allocation was killed by the OOM killer.
    pub fn alloc(&mut self, mib: u64) -> Result<Reply, String> {
        self.cmd_reply(&format!("alloc {mib}"), memory_timeout(mib))
    }

    /// Writes `mib` MiB of non-zero data into a file on a tmpfs of its own
    /// through the page cache and deletes it: the guest's pages were used and
    /// freed as with [`dirty`](Self::dirty), about ten times faster under UML
    /// (no user page faults). Returns the agent's `key=value` report.
    pub fn fill(&mut self, mib: u64) -> Result<HashMap<String, String>, String> {
        let body = self.cmd(&format!("fill {mib}"), memory_timeout(mib / 8))?;
        Ok(parse_kv(&body))
    }

    /// Stops the guest: SIGSTOP to every process of UML's group but the
    /// guest's own processes, which UML ptraces (a tracee stopped by a signal
    /// makes UML kill it: "userspace - child stopped with signal 19"). A
    /// tracee stops at its next trap into UML, within a timer tick: this
    /// returns once every process of the group is stopped, so nothing of the
    /// guest runs.
    pub fn stop(&mut self) -> Result<Duration, String> {
        if !self.stopped.is_empty() {
            return Err("the guest is already stopped".into());
        }
        let start = Instant::now();
        let procs = group_processes(self.pgid);
        for p in procs.iter().filter(|p| p.tracer == 0) {
            // SAFETY: plain syscall on a process of UML's group.
            if unsafe { libc::kill(p.pid, libc::SIGSTOP) } == 0 {
                self.stopped.push(p.pid);
            }
        }
        if self.stopped.is_empty() {
            return Err("no process of UML's group could be stopped".into());
        }
        let deadline = start + Duration::from_secs(10);
        loop {
            let running: Vec<GroupProcess> = group_processes(self.pgid)
                .into_iter()
                .filter(|p| !matches!(p.state, 'T' | 't' | 'Z' | 'X'))
                .collect();
            if running.is_empty() {
                return Ok(start.elapsed());
            }
            if Instant::now() > deadline {
                return Err(format!("UML's processes did not stop: {running:?}"));
            }
            thread::sleep(Duration::from_millis(1));
        }
    }

    /// Resumes the guest [`stop`](Self::stop) stopped.
    pub fn resume(&mut self) -> Result<(), String> {
        if self.stopped.is_empty() {
            return Err("the guest is not stopped".into());
        }
        for pid in self.stopped.drain(..) {
            // SAFETY: plain syscall on a process this guest stopped.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
            }
        }
        Ok(())
    }

    /// Frees everything `alloc` holds.
    pub fn release(&mut self) -> Result<HashMap<String, String>, String> {
        Ok(parse_kv(&self.cmd("release", Duration::from_secs(60))?))
    }

    /// Runs a shell command in the guest; `Ok(output)` if it exits with 0.
    pub fn sh(&mut self, command: &str, timeout: Duration) -> Result<String, String> {
        self.cmd(&format!("sh {command}"), timeout)
    }

    /// Powers the guest off and waits for UML to exit.
    pub fn poweroff(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        // The END line may or may not make it out before UML stops.
        let _ = self.cmd_reply("poweroff", timeout);
        self.wait_exit(deadline.saturating_duration_since(Instant::now()))
    }

    /// Waits for UML to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        if let Some(status) = self.exit_status {
            return Ok(status);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exit_status = Some(status);
                    self.stdin = None;
                    // Helpers left behind, if any.
                    kill_group(self.pgid);
                    return Ok(status);
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    return Err(format!(
                        "UML did not exit within {timeout:?}\n{}",
                        self.console_tail(40)
                    ))
                }
                Err(e) => return Err(format!("waiting for UML: {e}")),
            }
        }
    }

    /// Every console line so far (stdout, and stderr prefixed `[stderr] `).
    pub fn console_log(&self) -> String {
        match self.log.lock() {
            Ok(log) => log.join("\n"),
            Err(_) => String::from("(console log unavailable)"),
        }
    }

    /// The last `n` console lines.
    pub fn console_tail(&self, n: usize) -> String {
        match self.log.lock() {
            Ok(log) => {
                let start = log.len().saturating_sub(n);
                format!(
                    "--- last {} console lines ---\n{}\n---",
                    log.len() - start,
                    log[start..].join("\n")
                )
            }
            Err(_) => String::from("(console log unavailable)"),
        }
    }
}

/// A host process of UML's process group.
#[derive(Clone, Copy, Debug)]
pub struct GroupProcess {
    /// Its pid.
    pub pid: libc::pid_t,
    /// Its state letter from /proc/<pid>/stat (`R`, `S`, `T`, `t`, ...).
    pub state: char,
    /// The pid of the process tracing it, 0 if none.
    pub tracer: libc::pid_t,
}

/// Every process of the process group `pgid`, from /proc.
pub fn group_processes(pgid: libc::pid_t) -> Vec<GroupProcess> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold anything but ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let pgrp = fields.nth(1).and_then(|s| s.parse::<libc::pid_t>().ok());
        if pgrp != Some(pgid) {
            continue;
        }
        let tracer = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("TracerPid:"))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0);
        out.push(GroupProcess { pid, state, tracer });
    }
    out
}

fn kill_group(pgid: libc::pid_t) {
    if pgid > 1 {
        // SAFETY: plain syscall; a group that is already gone gives ESRCH.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

impl Drop for Uml {
    fn drop(&mut self) {
        self.stdin = None;
        if !self.stopped.is_empty() {
            // Killing a stopped group works, but let the console drain first.
            let _ = self.resume();
        }
        if self.exit_status.is_none() {
            kill_group(self.pgid);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!("=== UML console log (pid {}) ===", self.child.id());
            eprintln!("{}", self.console_log());
            eprintln!("=== end of UML console log ===");
        }
    }
}

/// A generous timeout for touching `mib` MiB in UML, whose page faults
/// are slow (tens of MiB/s).
pub fn memory_timeout(mib: u64) -> Duration {
    Duration::from_millis(mib.saturating_mul(200).saturating_add(60_000))
}

/// Parses /proc/meminfo: field name to value (in kB for the fields given
/// in kB, a plain count for the others).
pub fn parse_meminfo(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (key, rest) = line.split_once(':')?;
            let value = rest.split_whitespace().next()?.parse().ok()?;
            Some((key.trim().to_string(), value))
        })
        .collect()
}

/// Parses /proc/buddyinfo: free blocks per order, summed over all nodes
/// and zones.
pub fn parse_buddyinfo(text: &str) -> Vec<u64> {
    let mut orders: Vec<u64> = Vec::new();
    for line in text.lines() {
        // "Node 0, zone   Normal   c0 c1 c2 ..."
        let Some((_, rest)) = line.split_once("zone") else {
            continue;
        };
        let counts = rest.split_whitespace().skip(1);
        for (order, count) in counts.enumerate() {
            let Ok(count) = count.parse::<u64>() else {
                break;
            };
            if orders.len() <= order {
                orders.resize(order + 1, 0);
            }
            orders[order] = orders[order].saturating_add(count);
        }
    }
    orders
}

/// Total free pages described by per-order block counts.
pub fn buddy_free_pages(orders: &[u64]) -> u64 {
    orders
        .iter()
        .enumerate()
        .map(|(order, &count)| {
            u32::try_from(order)
                .ok()
                .and_then(|o| 1u64.checked_shl(o))
                .map_or(u64::MAX, |pages| count.saturating_mul(pages))
        })
        .fold(0u64, u64::saturating_add)
}

/// Parses /proc/vmstat ("name value" lines).
pub fn parse_vmstat(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let key = words.next()?;
            let value = words.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// Parses the agent's `key=value` body lines.
pub fn parse_kv(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            let key = key.trim();
            if key.is_empty() || key.contains(char::is_whitespace) {
                return None;
            }
            Some((key.to_string(), value.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn meminfo() {
        let m = parse_meminfo(
            "MemTotal:         497936 kB\nMemFree:          480000 kB\nHugePages_Total:       0\n",
        );
        assert_eq!(m["MemTotal"], 497936);
        assert_eq!(m["MemFree"], 480000);
        assert_eq!(m["HugePages_Total"], 0);
    }

    #[test]
    fn buddyinfo() {
        let b = parse_buddyinfo(
            "Node 0, zone      DMA      1      0      2\n\
             Node 0, zone   Normal      3      4      5      6\n",
        );
        assert_eq!(b, vec![4, 4, 7, 6]);
        assert_eq!(buddy_free_pages(&b), 4 + 8 + 28 + 48);
    }

    #[test]
    fn kv() {
        let kv = parse_kv("ms=12\nfeature_names=A,B\nnot a pair\n x y=1");
        assert_eq!(kv["ms"], "12");
        assert_eq!(kv["feature_names"], "A,B");
        assert_eq!(kv.len(), 2);
    }
}
