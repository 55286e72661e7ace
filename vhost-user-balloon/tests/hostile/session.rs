// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The frontend: guest memory, a vhost-user session set up as QEMU or UML does it, and
//! descriptors of the wrong kind.

use super::*;

/// A pipe (close-on-exec): (read end, write end).
pub fn pipe() -> (File, File) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`, a valid array of two.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just created and nothing else owns them.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (File::from(rd), File::from(wr))
}

pub fn set_nonblocking(f: &File, on: bool) {
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
pub fn fill_pipe(wr: &File) -> usize {
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
pub fn lend_as_eventfd(fd: RawFd) -> ManuallyDrop<EventFd> {
    // SAFETY: the EventFd is never dropped (ManuallyDrop), so it never closes `fd`, which
    // the caller keeps open and owns; it is only read as a raw descriptor to send it.
    ManuallyDrop::new(unsafe { EventFd::from_raw_fd(fd) })
}

/// Sends `fd` with `send` if given (lent: the caller keeps it), else a fresh eventfd, which
/// is returned for the caller to keep.
pub fn send_event_fd(
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
pub struct Guest {
    pub file: File,
    pub mem: GuestMemoryMmap<()>,
    pub size: usize,
}

impl Guest {
    pub fn new(name: &CStr, size: usize) -> Guest {
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
    pub fn host_base(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: self.size as u64,
            userspace_addr: self.host_base(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Writes the PFN array of an inflate element at `addr`: `count` PFNs from `first` on.
    pub fn write_pfns(&self, addr: u64, first: u32, count: u32) {
        let list: Vec<u8> = (0..count).flat_map(|i| (first + i).to_le_bytes()).collect();
        self.mem.write_slice(&list, GuestAddress(addr)).unwrap();
    }
}

pub fn ring_addr(index: usize) -> u64 {
    0x10_0000 + 0x1_0000 * index as u64
}

/// Connects to `path` (retrying while the daemon is not listening yet), with read and
/// write timeouts of [`T`] so no reply is awaited for ever.
pub fn connect_stream(path: &Path) -> Result<UnixStream, String> {
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

pub fn step<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

/// Runs `f`, a request that waits for the daemon's reply on `conn`. `vhost` retries a read
/// that timed out, so a timeout on the socket does not end the wait: if no reply came within
/// [`T`], the connection is shut down, which makes `f` return.
pub fn bounded<R, E: std::fmt::Display>(
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
pub struct Session<'g> {
    pub fe: Frontend,
    /// A second handle on the connection, to see the daemon close it.
    pub raw: UnixStream,
    pub num_queues: usize,
    /// Our end of the backend channel.
    pub _channel: UnixStream,
    pub queues: Vec<MockSplitQueue<'g, GuestMemoryMmap<()>>>,
    pub kicks: Vec<Option<EventFd>>,
    pub _calls: Vec<Option<EventFd>>,
    pub next_desc: u16,
}

impl<'g> Session<'g> {
    /// Connects and negotiates as QEMU or UML does: owner, features, protocol features,
    /// queue count, backend channel.
    pub fn connect(path: &Path) -> Result<Session<'g>, String> {
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
    pub fn set_up(
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
    pub fn open(path: &Path, guest: &'g Guest) -> Result<Session<'g>, String> {
        let mut s = Self::connect(path)?;
        s.set_up(guest, None, None)?;
        Ok(s)
    }

    /// Reads the configuration space (Linux does first; the device activates then at the
    /// latest).
    pub fn read_config(&mut self) -> Result<(), String> {
        self.ask("GET_CONFIG", |fe| {
            fe.get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        })
        .map(|_| ())
    }

    /// A request that waits for the daemon's reply, at most [`T`].
    pub fn ask<R, E: std::fmt::Display>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Frontend) -> Result<R, E>,
    ) -> Result<R, String> {
        let fe = &mut self.fe;
        bounded(&self.raw, what, || f(fe))
    }

    /// Posts one single-descriptor element on the inflate queue, without kicking.
    pub fn post_inflate(&mut self, addr: u64, len: u32) {
        let i = self.next_desc;
        self.next_desc = (i + 1) % QUEUE_SIZE;
        let desc = RawDescriptor::from(Descriptor::new(addr, len, 0, 0));
        self.queues[INFLATE].add_desc_chains(&[desc], i).unwrap();
    }

    pub fn kick(&self, q: usize) {
        self.kicks[q]
            .as_ref()
            .expect("a queue kicked through its own eventfd")
            .write(1)
            .unwrap();
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    /// Whether the daemon closes the connection within `within`. Uses the connection's
    /// socket directly: call it last.
    pub fn closed_by_peer(&self, within: Duration) -> bool {
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
pub fn assert_served(d: &mut Daemon, when: &str) {
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
