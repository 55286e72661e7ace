// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon binary as a child process, and what `/proc` tells about it.

use super::*;

/// The daemon binary, with its sockets and log in a directory of its own; killed on drop.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    pub log: PathBuf,
}

/// Sets the soft limit of open files (keeping the hard one) in the child before `exec`.
pub fn set_nofile(limit: u64) -> io::Result<()> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into `r`, a valid, writable value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    r.rlim_cur = limit.min(r.rlim_max);
    // SAFETY: setrlimit reads one rlimit from `r`, a valid value.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGBUS => "SIGBUS",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => "another signal",
    }
}

pub fn describe(st: ExitStatus) -> String {
    match (st.signal(), st.code()) {
        (Some(sig), _) => format!(
            "killed by signal {sig} ({}){}",
            signal_name(sig),
            if st.core_dumped() {
                ", core dumped"
            } else {
                ""
            }
        ),
        (None, Some(code)) => format!("exited with code {code}"),
        (None, None) => format!("ended: {st}"),
    }
}

impl Daemon {
    pub fn start(name: &str) -> Daemon {
        Self::start_with(name, None, &[])
    }

    /// Starts the daemon with default flags; with `nofile`, under that soft limit of open
    /// files; with `env` set in its environment.
    pub fn start_with(name: &str, nofile: Option<u64>, env: &[(&str, &Path)]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vub-hostile-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("balloon.sock");
        let control = dir.join("control.sock");
        let log = dir.join("daemon.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vhost-user-balloon"));
        cmd.arg("--socket")
            .arg(&socket)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap());
        for (key, value) in env {
            cmd.env(key, value);
        }
        // SAFETY: the closure runs in the child between fork and exec; it only calls prctl,
        // getrlimit and setrlimit (async-signal-safe) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // The daemon goes with the test, even when the test process is killed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(io::Error::last_os_error());
                }
                match nofile {
                    Some(limit) => set_nofile(limit),
                    None => Ok(()),
                }
            });
        }
        let child = cmd.spawn().expect("start vhost-user-balloon");
        let mut d = Daemon {
            child,
            dir,
            socket,
            control,
            log,
        };
        let deadline = Instant::now() + T;
        while !(d.socket.exists() && d.control.exists()) {
            if let Some(why) = d.dead() {
                panic!("the daemon ended before its sockets appeared: {why}");
            }
            assert!(
                Instant::now() < deadline,
                "the daemon's sockets never appeared"
            );
            thread::sleep(Duration::from_millis(10));
        }
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the daemon ended, if it did.
    pub fn dead(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(describe(st)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot tell (try_wait: {e})")),
        }
    }

    /// "still running" or how it ended, for messages.
    pub fn state(&mut self) -> String {
        self.dead().unwrap_or_else(|| "still running".into())
    }

    /// Panics if the daemon ended.
    pub fn assert_alive(&mut self, when: &str) {
        if let Some(why) = self.dead() {
            panic!("the daemon died {when}: {why}");
        }
    }

    /// Watches the daemon for `period`: panics as soon as it ends.
    pub fn watch_alive(&mut self, period: Duration, when: &str) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.assert_alive(when);
            thread::sleep(Duration::from_millis(10));
        }
        self.assert_alive(when);
    }

    /// `status` on the control socket, answered within [`T`].
    pub fn status(&self) -> Result<Value, String> {
        status_on(&self.control)
    }

    /// `status`, which must answer within [`T`].
    pub fn assert_status(&mut self, when: &str) -> Value {
        match self.status() {
            Ok(v) => v,
            Err(e) => {
                let state = self.state();
                panic!("status {when}: {e} (the daemon is {state})")
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(200);
            eprintln!(
                "=== daemon log ({} lines, the last {} shown) ===\n{}\n=== end of daemon log ===",
                lines.len(),
                lines.len() - from,
                lines[from..].join("\n")
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn status_on(control_path: &Path) -> Result<Value, String> {
    let v = control::request(control_path, &json!({"cmd": "status"}), T)
        .map_err(|e| format!("no answer within {T:?}: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(format!("refused: {v}"))
    }
}

pub fn proc_path(pid: u32, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

pub fn count_entries(path: &Path) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

pub fn maps(pid: u32) -> String {
    std::fs::read_to_string(proc_path(pid, "maps")).unwrap_or_default()
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(proc_path(pid, "status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon's private directories (one exists while a connection is set up).
pub fn tmpdirs(pid: u32) -> usize {
    let prefix = format!("vhost-user-balloon-{pid}-");
    std::fs::read_dir(std::env::temp_dir())
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .count()
        })
        .unwrap_or(0)
}

/// The daemon's descriptors whose link names `name`.
pub fn fds_naming(pid: u32, name: &str) -> Vec<String> {
    std::fs::read_dir(proc_path(pid, "fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.contains(name))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub fds: usize,
    pub threads: usize,
    pub maps: usize,
    pub tmpdirs: usize,
}

pub fn usage(pid: u32) -> Usage {
    Usage {
        fds: count_entries(&proc_path(pid, "fd")),
        threads: count_entries(&proc_path(pid, "task")),
        maps: maps(pid).lines().count(),
        tmpdirs: tmpdirs(pid),
    }
}

/// Waits until the daemon's descriptors, threads, mappings and private directories stay the
/// same for 250 ms (the last connection torn down), up to 10 s.
pub fn wait_idle(d: &mut Daemon, when: &str) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = usage(d.pid());
    let mut since = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(20));
        d.assert_alive(when);
        let now = usage(d.pid());
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= Duration::from_millis(250) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: the daemon never settled (last {last:?})"
        );
    }
}
