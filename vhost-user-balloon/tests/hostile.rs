// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon binary against a hostile vhost-user frontend: memory tables larger than their
//! file or shrunk under the daemon, pipes and regular files as kick and call descriptors, a
//! frontend that leaves its memory behind, and thousands of connections that leave half-way.
//!
//! Each test runs `vhost-user-balloon` as a child process of its own, so a crash (SIGBUS), a
//! hang or a leak of descriptors, threads or mappings shows; every wait is bounded, and the
//! daemon's log is printed when a test fails. Each test also checks that the control socket
//! still answers and that the next well-behaved frontend is served.

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::ManuallyDrop;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_balloon::control;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod vhost_frontend;
use vhost_frontend::{memfd, ring_config, send_with_fds};

/// How long any one wait may take: a socket read, an answer, a change to show.
const T: Duration = Duration::from_secs(5);
const QUEUE_SIZE: u16 = 256;
/// The inflate queue.
const INFLATE: usize = 0;
/// Not acknowledged, so that every used buffer asks for a notification.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// Where the tests put the PFN arrays of their inflate elements.
const PFN_LIST: u64 = 0x9000;
/// `VHOST_USER_SET_MEM_TABLE`.
const SET_MEM_TABLE: u32 = 5;

// ---------------------------------------------------------------------------------------------
// The daemon as a child process.

/// The daemon binary, with its sockets and log in a directory of its own; killed on drop.
struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    control: PathBuf,
    log: PathBuf,
}

/// Sets the soft limit of open files (keeping the hard one) in the child before `exec`.
fn set_nofile(limit: u64) -> io::Result<()> {
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

fn signal_name(sig: i32) -> &'static str {
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

fn describe(st: ExitStatus) -> String {
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
    fn start(name: &str) -> Daemon {
        Self::start_with(name, None)
    }

    /// Starts the daemon with default flags; with `nofile`, under that soft limit of open
    /// files.
    fn start_with(name: &str, nofile: Option<u64>) -> Daemon {
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the daemon ended, if it did.
    fn dead(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(describe(st)),
            Ok(None) => None,
            Err(e) => Some(format!("cannot tell (try_wait: {e})")),
        }
    }

    /// "still running" or how it ended, for messages.
    fn state(&mut self) -> String {
        self.dead().unwrap_or_else(|| "still running".into())
    }

    /// Panics if the daemon ended.
    fn assert_alive(&mut self, when: &str) {
        if let Some(why) = self.dead() {
            panic!("the daemon died {when}: {why}");
        }
    }

    /// Watches the daemon for `period`: panics as soon as it ends.
    fn watch_alive(&mut self, period: Duration, when: &str) {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            self.assert_alive(when);
            thread::sleep(Duration::from_millis(10));
        }
        self.assert_alive(when);
    }

    /// `status` on the control socket, answered within [`T`].
    fn status(&self) -> Result<Value, String> {
        status_on(&self.control)
    }

    /// `status`, which must answer within [`T`].
    fn assert_status(&mut self, when: &str) -> Value {
        match self.status() {
            Ok(v) => v,
            Err(e) => {
                let state = self.state();
                panic!("status {when}: {e} (the daemon is {state})")
            }
        }
    }

    fn log_text(&self) -> String {
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

fn status_on(control_path: &Path) -> Result<Value, String> {
    let v = control::request(control_path, &json!({"cmd": "status"}), T)
        .map_err(|e| format!("no answer within {T:?}: {e}"))?;
    if v["ok"] == json!(true) {
        Ok(v)
    } else {
        Err(format!("refused: {v}"))
    }
}

// ---------------------------------------------------------------------------------------------
// What /proc tells about the daemon.

fn proc_path(pid: u32, what: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{what}"))
}

fn count_entries(path: &Path) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn maps(pid: u32) -> String {
    std::fs::read_to_string(proc_path(pid, "maps")).unwrap_or_default()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(proc_path(pid, "status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon's private directories (one exists while a connection is set up).
fn tmpdirs(pid: u32) -> usize {
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
fn fds_naming(pid: u32, name: &str) -> Vec<String> {
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
struct Usage {
    fds: usize,
    threads: usize,
    maps: usize,
    tmpdirs: usize,
}

fn usage(pid: u32) -> Usage {
    Usage {
        fds: count_entries(&proc_path(pid, "fd")),
        threads: count_entries(&proc_path(pid, "task")),
        maps: maps(pid).lines().count(),
        tmpdirs: tmpdirs(pid),
    }
}

/// Waits until the daemon's descriptors, threads, mappings and private directories stay the
/// same for 250 ms (the last connection torn down), up to 10 s.
fn wait_idle(d: &mut Daemon, when: &str) -> Usage {
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

// ---------------------------------------------------------------------------------------------
// The frontend.

/// A pipe (close-on-exec): (read end, write end).
fn pipe() -> (File, File) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a valid array of two.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(rd), File::from(wr))
}

fn set_nonblocking(f: &File, on: bool) {
    // SAFETY: F_GETFL on an open descriptor reads its flags and touches no memory.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", io::Error::last_os_error());
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: F_SETFL on an open descriptor sets its flags and touches no memory.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags) };
    assert_eq!(r, 0, "F_SETFL: {}", io::Error::last_os_error());
}

/// Fills a pipe through its write end until not one more byte fits; leaves it blocking
/// again (the daemon gets the same open file, flags included). Returns the bytes written.
fn fill_pipe(wr: &File) -> usize {
    set_nonblocking(wr, true);
    let mut written = 0;
    for chunk in [4096usize, 1] {
        let buf = vec![0xa5u8; chunk];
        loop {
            match (&*wr).write(&buf) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("filling the pipe: {e}"),
            }
        }
    }
    set_nonblocking(wr, false);
    written
}

/// `fd` seen as an eventfd for `vhost`'s frontend API, which only sends it: the
/// `ManuallyDrop` keeps the caller the owner.
fn lend_as_eventfd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the EventFd is never dropped (ManuallyDrop), so it never closes `fd`, which
    // the caller keeps open and owns; it is only read as a raw descriptor to send it.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

/// Sends `fd` with `send` if given (lent: the caller keeps it), else a fresh eventfd, which
/// is returned for the caller to keep.
fn send_event_fd(
    fd: Option<RawFd>,
    send: impl FnOnce(&EventFd) -> Result<(), String>,
) -> Result<Option<EventFd>, String> {
    match fd {
        Some(fd) => send(&lend_as_eventfd(fd)).map(|()| None),
        None => {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            send(&evt)?;
            Ok(Some(evt))
        }
    }
}

/// Guest memory in a named memfd, mapped by the test as the frontend's own memory.
struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
    size: usize,
}

impl Guest {
    fn new(name: &CStr, size: usize) -> Guest {
        let file = memfd(name, size);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Guest { file, mem, size }
    }

    /// The frontend's address of guest address 0.
    fn host_base(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.host_base(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Writes the PFN array of an inflate element at `addr`: `count` PFNs from `first` on.
    fn write_pfns(&self, addr: u64, first: u32, count: u32) {
        let list: Vec<u8> = (0..count).flat_map(|i| (first + i).to_le_bytes()).collect();
        self.mem.write_slice(&list, GuestAddress(addr)).unwrap();
    }
}

fn ring_addr(index: usize) -> u64 {
    0x10_0000 + 0x1_0000 * index as u64
}

/// Connects to `path` (retrying while the daemon is not listening yet), with read and
/// write timeouts of [`T`] so no reply is awaited for ever.
fn connect_stream(path: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + T;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => {
                s.set_read_timeout(Some(T)).unwrap();
                s.set_write_timeout(Some(T)).unwrap();
                return Ok(s);
            }
            Err(e)
                if Instant::now() < deadline
                    && matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::NotFound
                            | io::ErrorKind::WouldBlock
                    ) =>
            {
                thread::sleep(Duration::from_millis(5))
            }
            Err(e) => return Err(format!("cannot connect to {}: {e}", path.display())),
        }
    }
}

fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Runs `f`, a request that waits for the daemon's reply on `conn`. `vhost` retries a read
/// that timed out, so a timeout on the socket does not end the wait: if no reply came within
/// [`T`], the connection is shut down, which makes `f` return.
fn bounded<R, E: std::fmt::Display>(
    conn: &UnixStream,
    what: &str,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, String> {
    let (done, wait) = mpsc::channel::<()>();
    let watched = conn.try_clone().unwrap();
    let watchdog = thread::spawn(move || {
        let expired = wait.recv_timeout(T) == Err(mpsc::RecvTimeoutError::Timeout);
        if expired {
            let _ = watched.shutdown(Shutdown::Both);
        }
        expired
    });
    let r = f();
    let _ = done.send(());
    let expired = watchdog.join().unwrap();
    match r {
        Err(_) if expired => Err(format!("{what}: no answer within {T:?}")),
        r => step(what, r),
    }
}

/// A frontend connection: negotiated, then (with [`Session::set_up`]) its memory table and
/// every vring.
struct Session<'g> {
    fe: Frontend,
    /// A second handle on the connection, to see the daemon close it.
    raw: UnixStream,
    num_queues: usize,
    /// Our end of the backend channel.
    _channel: UnixStream,
    queues: Vec<MockSplitQueue<'g, GuestMemoryMmap<()>>>,
    kicks: Vec<Option<EventFd>>,
    _calls: Vec<Option<EventFd>>,
    next_desc: u16,
}

impl<'g> Session<'g> {
    /// Connects and negotiates as QEMU or UML does: owner, features, protocol features,
    /// queue count, backend channel.
    fn connect(path: &Path) -> Result<Session<'g>, String> {
        let stream = connect_stream(path)?;
        let raw = stream.try_clone().unwrap();
        let mut fe = Frontend::from_stream(stream, 8);
        step("SET_OWNER", fe.set_owner())?;
        let offered = bounded(&raw, "GET_FEATURES", || fe.get_features())?;
        let proto = bounded(&raw, "GET_PROTOCOL_FEATURES", || fe.get_protocol_features())?;
        step("SET_PROTOCOL_FEATURES", fe.set_protocol_features(proto))?;
        let num_queues = bounded(&raw, "GET_QUEUE_NUM", || fe.get_queue_num())? as usize;
        step(
            "SET_FEATURES",
            fe.set_features(offered & !VIRTIO_RING_F_EVENT_IDX),
        )?;
        let (ours, theirs) = UnixStream::pair().unwrap();
        step("SET_BACKEND_REQ_FD", fe.set_backend_request_fd(&theirs))?;
        Ok(Session {
            fe,
            raw,
            num_queues,
            _channel: ours,
            queues: Vec::new(),
            kicks: Vec::new(),
            _calls: Vec::new(),
            next_desc: 0,
        })
    }

    /// Sends `guest`'s memory table and sets up every vring in it, enabled, with fresh
    /// eventfds except the inflate queue's kick or call when given; then waits for an answer
    /// (so the daemon handled all of it).
    fn set_up(
        &mut self,
        guest: &'g Guest,
        kick0: Option<RawFd>,
        call0: Option<RawFd>,
    ) -> Result<(), String> {
        step("SET_MEM_TABLE", self.fe.set_mem_table(&[guest.region()]))?;
        let base = guest.host_base();
        for i in 0..self.num_queues {
            let q = MockSplitQueue::create(&guest.mem, GuestAddress(ring_addr(i)), QUEUE_SIZE);
            step("SET_VRING_NUM", self.fe.set_vring_num(i, QUEUE_SIZE))?;
            step(
                "SET_VRING_ADDR",
                self.fe.set_vring_addr(
                    i,
                    &ring_config(
                        QUEUE_SIZE,
                        base + q.desc_table_addr().0,
                        base + q.avail_addr().0,
                        base + q.used_addr().0,
                    ),
                ),
            )?;
            step("SET_VRING_BASE", self.fe.set_vring_base(i, 0))?;
            self.queues.push(q);
            let call = send_event_fd(call0.filter(|_| i == INFLATE), |e| {
                step("SET_VRING_CALL", self.fe.set_vring_call(i, e))
            })?;
            self._calls.push(call);
            let kick = send_event_fd(kick0.filter(|_| i == INFLATE), |e| {
                step("SET_VRING_KICK", self.fe.set_vring_kick(i, e))
            })?;
            self.kicks.push(kick);
            step("SET_VRING_ENABLE", self.fe.set_vring_enable(i, true))?;
        }
        self.ask("GET_FEATURES after the set-up", |fe| fe.get_features())?;
        Ok(())
    }

    /// A well-behaved connection with every vring set up in `guest`.
    fn open(path: &Path, guest: &'g Guest) -> Result<Session<'g>, String> {
        let mut s = Self::connect(path)?;
        s.set_up(guest, None, None)?;
        Ok(s)
    }

    /// Reads the configuration space (Linux does first; the device activates then at the
    /// latest).
    fn read_config(&mut self) -> Result<(), String> {
        self.ask("GET_CONFIG", |fe| {
            fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        })
        .map(|_| ())
    }

    /// A request that waits for the daemon's reply, at most [`T`].
    fn ask<R, E: std::fmt::Display>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> Result<R, E>,
    ) -> Result<R, String> {
        let fe = &mut self.fe;
        bounded(&self.raw, what, || f(fe))
    }

    /// Posts one single-descriptor element on the inflate queue, without kicking.
    fn post_inflate(&mut self, addr: u64, len: u32) {
        let i = self.next_desc;
        self.next_desc = (i + 1) % QUEUE_SIZE;
        let desc = RawDescriptor::from(Descriptor::new(addr, len, 0, 0));
        self.queues[INFLATE].add_desc_chains(&[desc], i).unwrap();
    }

    fn kick(&self, q: usize) {
        self.kicks[q]
            .as_ref()
            .expect("a queue kicked through its own eventfd")
            .write(1)
            .unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    /// Whether the daemon closes the connection within `within`. Uses the connection's
    /// socket directly: call it last.
    fn closed_by_peer(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        self.raw
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut buf = [0u8; 256];
        loop {
            match (&self.raw).read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return true,
            }
            if Instant::now() >= deadline {
                return false;
            }
        }
    }
}

/// A well-behaved frontend is served: full set-up, then an inflate element of four PFNs is
/// used (the used index advances).
fn assert_served(d: &mut Daemon, when: &str) {
    let guest = Guest::new(c"vub-hostile-next", 32 << 20);
    guest.write_pfns(PFN_LIST, 0x200, 4);
    let mut s = match Session::open(&d.socket, &guest) {
        Ok(s) => s,
        Err(e) => {
            let state = d.state();
            panic!("{when}: the next frontend was not served: {e} (the daemon is {state})")
        }
    };
    s.post_inflate(PFN_LIST, 16);
    s.kick(INFLATE);
    let deadline = Instant::now() + T;
    while s.used_idx(INFLATE) != 1 {
        if Instant::now() >= deadline {
            let state = d.state();
            panic!(
                "{when}: the next frontend's inflate element was not used within {T:?} \
                 (used idx {}, the daemon is {state})",
                s.used_idx(INFLATE)
            );
        }
        thread::sleep(Duration::from_millis(5));
    }
    d.assert_alive(when);
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// A region of 32 MiB over a memfd of 1 MiB: the vrings lie past the end of the file, where
/// a read of the mapping raises SIGBUS.
#[test]
fn memory_past_the_end_of_its_file_is_refused() {
    let mut d = Daemon::start("past-the-end");
    let file = memfd(c"vub-hostile-short", 1 << 20);
    // The frontend's address of the region: only translated, never dereferenced here.
    let base = 0x7e00_0000_0000u64;
    let mut s = Session::connect(&d.socket).expect("negotiation");
    let table = s.fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: 32 << 20,
        userspace_addr: base,
        mmap_offset: 0,
        mmap_handle: file.as_raw_fd(),
    }]);
    // The set-up a frontend sends next; once the daemon refused the table these fail.
    let mut events = Vec::new();
    let mut refused = None;
    for i in 0..s.num_queues {
        let ring = base + ring_addr(i);
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        let r =
            s.fe.set_vring_num(i, QUEUE_SIZE)
                .and_then(|_| {
                    s.fe.set_vring_addr(
                        i,
                        &ring_config(QUEUE_SIZE, ring, ring + 0x1000, ring + 0x2000),
                    )
                })
                .and_then(|_| s.fe.set_vring_base(i, 0))
                .and_then(|_| s.fe.set_vring_call(i, &call))
                .and_then(|_| s.fe.set_vring_kick(i, &kick))
                .and_then(|_| s.fe.set_vring_enable(i, true));
        events.push((kick, call));
        if let Err(e) = r {
            refused = Some(format!("vring {i}: {e}"));
            break;
        }
    }
    let answer = s.ask("GET_FEATURES", |fe| fe.get_features());
    eprintln!(
        "past-the-end: SET_MEM_TABLE {:?}, set-up {}, then GET_FEATURES {}",
        table.map(|_| ()),
        refused.as_deref().unwrap_or("sent"),
        match &answer {
            Ok(_) => "answered".to_string(),
            Err(e) => format!("failed ({e})"),
        }
    );
    d.watch_alive(
        Duration::from_millis(300),
        "after a memory table past the end of its file and a vring set-up in it",
    );
    let status = d.assert_status("after a memory table past the end of its file");
    assert!(
        status["shim"]["refused"].as_u64() >= Some(1),
        "the table was not refused: {status}"
    );
    assert!(
        d.log_text().contains("runs past the end of its file"),
        "no log line names the region past the end of its file"
    );
    drop(s);
    assert_served(&mut d, "after a memory table past the end of its file");
}

/// The frontend shrinks its memory file under the daemon after a valid set-up, then kicks:
/// the device's reads of the rings and PFN arrays fall past the end of the file.
#[test]
fn memory_shrunk_after_the_table_does_not_kill_the_daemon() {
    let mut d = Daemon::start("shrunk");
    let guest = Guest::new(c"vub-hostile-shrunk", 32 << 20);
    guest.write_pfns(PFN_LIST, 0x200, 4);
    let mut s = Session::open(&d.socket, &guest).expect("a valid set-up");
    s.read_config().expect("configuration read");
    // The element is in the ring before the file shrinks; the test never touches its own
    // mapping of the file afterwards.
    s.post_inflate(PFN_LIST, 16);
    guest.file.set_len(0).unwrap();
    s.kick(INFLATE);
    d.watch_alive(
        Duration::from_secs(1),
        "after the frontend shrank its memory file to 0 and kicked the inflate queue",
    );
    // The guard replaced what the device touched past the end, and ended the connection.
    let deadline = Instant::now() + T;
    loop {
        let status = d.assert_status("after the memory file shrank");
        if status["pages_past_end_of_file"].as_u64() >= Some(1)
            && status["frontend"]["connected"] == json!(false)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{T:?} after the shrink, no page was replaced or the connection is still up: \
             {status}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    assert!(d.log_text().contains("past the end of its file"));
    drop(s);
    drop(guest);
    assert_served(&mut d, "after a frontend shrank its memory file");
}

/// A pipe holding 3 bytes as the inflate queue's kick: an 8-byte read of it blocks the
/// vring worker, and the teardown of the connection waits for that worker.
#[test]
fn a_pipe_as_kick_fd_is_refused() {
    let mut d = Daemon::start("pipe-kick");
    let guest = Guest::new(c"vub-hostile-pipe-kick", 32 << 20);
    let (rd, wr) = pipe();
    (&wr).write_all(&[1, 2, 3]).unwrap();
    let mut s = Session::connect(&d.socket).expect("negotiation");
    let setup = s.set_up(&guest, Some(rd.as_raw_fd()), None);
    eprintln!("pipe-kick: set-up with a pipe as kick fd: {setup:?}");
    // Let the vring worker see the readable pipe.
    thread::sleep(Duration::from_millis(200));
    d.assert_alive("after a pipe as kick fd");
    d.assert_status("while a frontend with a pipe as kick fd is connected");
    drop(s);
    // The test keeps the write end open, as a hostile frontend can: a read of the pipe
    // never sees its end.
    assert_served(
        &mut d,
        "after a frontend with 3 bytes in a pipe as kick fd left",
    );
    d.assert_status("after the frontend with a pipe as kick fd left");
    assert!(
        d.log_text().contains("kick descriptor of vring"),
        "no log line says why the kick was refused"
    );
    drop((rd, wr));
}

/// A full pipe's write end as the inflate queue's call (pipes are legitimate call fds: UML
/// uses one): the used-buffer notification cannot be written, and must not stall the device
/// or the control socket.
#[test]
fn a_full_pipe_as_call_fd_does_not_stall_the_device() {
    const ELEMENTS: u16 = 4;
    let mut d = Daemon::start("pipe-call");
    let guest = Guest::new(c"vub-hostile-pipe-call", 32 << 20);
    for e in 0..u64::from(ELEMENTS) {
        guest.write_pfns(PFN_LIST + e * 64, 0x200 + 4 * e as u32, 4);
    }
    let (rd, wr) = pipe();
    let filled = fill_pipe(&wr);
    let mut s = Session::connect(&d.socket).expect("negotiation");
    s.set_up(&guest, None, Some(wr.as_raw_fd()))
        .expect("a pipe is a valid call fd");
    s.read_config().expect("configuration read");

    // The control socket, asked again and again while the device works.
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = {
        let (path, stop) = (d.control.clone(), stop.clone());
        thread::spawn(move || {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let t0 = Instant::now();
                let r = status_on(&path);
                let failed = r.is_err();
                answers.push((t0.elapsed(), r.map(|_| ())));
                if failed {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            answers
        })
    };
    for e in 0..u64::from(ELEMENTS) {
        s.post_inflate(PFN_LIST + e * 64, 16);
    }
    s.kick(INFLATE);
    thread::sleep(Duration::from_millis(100));
    s.kick(INFLATE);
    let deadline = Instant::now() + T;
    while s.used_idx(INFLATE) != ELEMENTS && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let used = s.used_idx(INFLATE);
    // A second more of status requests after the device's work.
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let answers = pinger.join().unwrap();
    let slowest = answers.iter().map(|(t, _)| *t).max().unwrap_or_default();
    eprintln!(
        "pipe-call: pipe filled with {filled} bytes; used idx {used}/{ELEMENTS}; {} status \
         requests, slowest {slowest:?}",
        answers.len()
    );
    d.assert_alive("with a full pipe as call fd");
    assert!(!answers.is_empty(), "no status request was made");
    for (t, r) in &answers {
        if let Err(e) = r {
            panic!(
                "status while the call pipe is full: {e} after {t:?} (used idx {used}/{ELEMENTS})"
            );
        }
        assert!(*t < T, "status took {t:?} while the call pipe is full");
    }
    assert_eq!(
        used, ELEMENTS,
        "the device used {used} of {ELEMENTS} inflate elements with a full pipe as call fd"
    );
    let status = d.assert_status("with a full pipe as call fd");
    assert!(
        status["notifications"]["calls_dropped"].as_u64() >= Some(1),
        "no notification counted as dropped: {status}"
    );
    drop(s);
    assert_served(&mut d, "after a frontend with a full pipe as call fd left");
    drop((rd, wr));
}

/// A regular file as the inflate queue's kick, then as its call: neither can be an event
/// descriptor; the daemon ends each connection and serves the next frontend.
#[test]
fn a_regular_file_as_kick_or_call_fd_is_refused() {
    let mut d = Daemon::start("file-fd");
    let guest = Guest::new(c"vub-hostile-file-fd", 32 << 20);
    for role in ["kick", "call"] {
        let path = d.dir.join(format!("{role}.file"));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8).unwrap();
        let fd = Some(file.as_raw_fd());
        let mut s = Session::connect(&d.socket).expect("negotiation");
        let setup = match role {
            "kick" => s.set_up(&guest, fd, None),
            _ => s.set_up(&guest, None, fd),
        };
        eprintln!("file-fd: set-up with a regular file as {role} fd: {setup:?}");
        let t0 = Instant::now();
        let closed = s.closed_by_peer(T);
        d.assert_alive(&format!("after a regular file as {role} fd"));
        assert!(
            closed,
            "the daemon kept serving a connection whose {role} fd is a regular file for {T:?} \
             (set-up: {setup:?})"
        );
        eprintln!(
            "file-fd: the connection with a regular file as {role} fd was closed after {:?}",
            t0.elapsed()
        );
        drop(s);
        d.assert_status(&format!("after a regular file as {role} fd"));
        assert_served(
            &mut d,
            &format!("after a frontend with a regular file as {role} fd"),
        );
    }
}

/// The memory of a frontend that left is unmapped and its file closed, not kept until the
/// next memory table.
#[test]
fn a_departed_frontends_memory_is_released() {
    const NAME: &str = "vub-hostile-departed";
    let mut d = Daemon::start("departed");
    let pid = d.pid();
    let guest = Guest::new(c"vub-hostile-departed", 64 << 20);
    let s = Session::open(&d.socket, &guest).expect("a valid set-up");
    assert!(
        maps(pid).contains(NAME),
        "the daemon does not map the connected frontend's memory"
    );
    let regions = d.assert_status("while connected")["memory"].clone();
    assert_eq!(
        regions.as_array().map(Vec::len),
        Some(1),
        "memory while connected: {regions}"
    );
    drop(s);
    drop(guest);
    let deadline = Instant::now() + T;
    loop {
        d.assert_alive("after the frontend left");
        let mapped = maps(pid)
            .lines()
            .filter(|l| l.contains(NAME))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let fds = fds_naming(pid, NAME);
        let memory = d.assert_status("after the frontend left")["memory"].clone();
        if mapped.is_empty() && fds.is_empty() && memory == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{T:?} after the frontend left, the daemon still holds its memory: mappings \
             {mapped:?}, descriptors {fds:?}, status memory {memory}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_served(
        &mut d,
        "after the memory of a departed frontend was released",
    );
}

/// One connect-and-leave cycle of the churn test, by its number.
fn churn_cycle(n: usize, socket: &Path, guest: &Guest) -> Result<(), String> {
    match n % 5 {
        // Connect and close at once.
        0 => drop(connect_stream(socket)?),
        // Half a header.
        1 => {
            let mut s = connect_stream(socket)?;
            s.write_all(&[1, 0, 0, 0, 1])
                .map_err(|e| format!("half a header: {e}"))?;
        }
        // A SET_MEM_TABLE header announcing 40 bytes, 20 of them with the memory file
        // attached, then close.
        2 => {
            let s = connect_stream(socket)?;
            let mut msg = Vec::new();
            for v in [SET_MEM_TABLE, 1, 40] {
                msg.extend_from_slice(&v.to_le_bytes());
            }
            msg.extend_from_slice(&1u32.to_le_bytes());
            msg.extend_from_slice(&[0u8; 16]);
            send_with_fds(&s, &msg, &[guest.file.as_raw_fd()])
                .map_err(|e| format!("half a memory table: {e}"))?;
        }
        // A memory table, then close.
        3 => {
            let s = connect_stream(socket)?;
            let fe = Frontend::from_stream(s, 8);
            step("SET_OWNER", fe.set_owner())?;
            step("SET_MEM_TABLE", fe.set_mem_table(&[guest.region()]))?;
        }
        // A whole set-up, then close. Its replies also mean every earlier connection ended.
        _ => drop(Session::open(socket, guest)?),
    }
    Ok(())
}

/// Thousands of frontends that come and go, most of them half-way through a message or a
/// set-up: the daemon's descriptors, threads, mappings, private directories and memory stay
/// flat, under a limit of 1024 open files.
#[test]
fn churn_keeps_descriptors_threads_and_mappings_flat() {
    const WARM_UP: usize = 50;
    const CYCLES: usize = 2000;
    let mut d = Daemon::start_with("churn", Some(1024));
    let pid = d.pid();
    let guest = Guest::new(c"vub-hostile-churn", 4 << 20);
    let t0 = Instant::now();
    let run = |d: &mut Daemon, cycles: std::ops::Range<usize>, warm: Option<Usage>| {
        for n in cycles {
            if let Err(e) = churn_cycle(n, &d.socket, &guest) {
                let state = d.state();
                panic!(
                    "churn cycle {n} failed: {e} (the daemon is {state}; now {:?}, after the \
                     warm-up {warm:?})",
                    usage(pid)
                );
            }
            if n % 250 == 249 {
                eprintln!(
                    "churn: after {} cycles ({:?}): {:?}",
                    n + 1,
                    t0.elapsed(),
                    usage(pid)
                );
            }
        }
    };
    run(&mut d, 0..WARM_UP, None);
    let before = wait_idle(&mut d, "after the warm-up");
    let rss_before = rss_kib(pid);
    d.assert_status("after the warm-up");
    run(&mut d, WARM_UP..CYCLES, Some(before));
    let after = wait_idle(&mut d, "after the churn");
    let rss_after = rss_kib(pid);
    eprintln!(
        "churn: cycles={CYCLES} fds {}->{} threads {}->{} maps {}->{} rss_kib {}->{} tmpdirs \
         {}->{} ({:?})",
        before.fds,
        after.fds,
        before.threads,
        after.threads,
        before.maps,
        after.maps,
        rss_before,
        rss_after,
        before.tmpdirs,
        after.tmpdirs,
        t0.elapsed()
    );
    d.assert_alive("after the churn");
    d.assert_status("after the churn");
    assert_eq!(after.fds, before.fds, "descriptors leaked");
    assert!(
        after.threads <= before.threads + 2,
        "threads leaked: {} -> {}",
        before.threads,
        after.threads
    );
    assert!(
        after.maps <= before.maps + 2,
        "mappings leaked: {} -> {}",
        before.maps,
        after.maps
    );
    assert_eq!(after.tmpdirs, 0, "private directories left behind");
    assert!(
        rss_after < rss_before + 32 * 1024,
        "resident memory grew from {rss_before} KiB to {rss_after} KiB"
    );
    let connected = d.log_text().matches(" connected").count();
    eprintln!("churn: {connected} connections logged");
    assert_served(&mut d, "after the churn");
}
