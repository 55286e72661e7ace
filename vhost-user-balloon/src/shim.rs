// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A vhost-user message shim between the frontend's connection and `vhost`'s request handler.
//!
//! The shim forwards whole vhost-user messages in both directions between the frontend's
//! socket and a socket whose other end `vhost`'s `BackendReqHandler` serves, with the file
//! descriptors attached to them. It closes two gaps of `vhost` 0.18 using only public APIs:
//!
//! * **Oversized memory tables.** `vhost` refuses a `VHOST_USER_SET_MEM_TABLE` whose payload
//!   is longer than `8 + num_regions * 32` bytes, but User-Mode Linux's `virtio_uml` always
//!   sends the whole 8-region array whatever `num_regions` says (libvhost-user accepts the
//!   trailing bytes). The shim cuts such a message to the length its `num_regions` needs and
//!   fixes the header's size field. A message with `num_regions` of 0 or above 8, or shorter
//!   than its regions, passes unchanged so `vhost` judges (and refuses) it.
//! * **Configuration change notifications.** `vhost` 0.18 cannot send
//!   `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend channel. The shim keeps a
//!   duplicate of the channel the frontend hands over with `VHOST_USER_SET_BACKEND_REQ_FD`
//!   (still forwarding the message, so `vhost` gets its own copy) in a shared
//!   [`ConfigChannel`], whose [`send_config_change`](ConfigChannel::send_config_change)
//!   writes the notification.
//!
//! The frontend is untrusted: a payload larger than [`MAX_PAYLOAD`], more than [`MAX_FDS`]
//! attached descriptors, or a connection closed in the middle of a message ends the
//! connection with a log line; nothing is allocated in proportion to what the frontend
//! sends (each direction has one fixed buffer).

use std::io;
use std::mem;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// The size of a vhost-user message header: request, flags and size, each a `u32` LE.
pub const HEADER_SIZE: usize = 12;

/// The largest payload the shim forwards: `vhost`'s `MAX_MSG_SIZE` (0x1000) plus a margin,
/// so that `vhost` itself judges messages near its limit. A larger size field closes the
/// connection.
pub const MAX_PAYLOAD: usize = 0x1000 + 0x100;

/// The most file descriptors one message may carry (`vhost`'s `MAX_ATTACHED_FD_ENTRIES`).
/// More close the connection.
pub const MAX_FDS: usize = 32;

/// `VHOST_USER_SET_MEM_TABLE`.
pub const SET_MEM_TABLE: u32 = 5;

/// `VHOST_USER_SET_BACKEND_REQ_FD`.
pub const SET_BACKEND_REQ_FD: u32 = 21;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, a request on the backend channel.
pub const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;

/// The most memory regions a `SET_MEM_TABLE` carries in the baseline protocol
/// (`VHOST_MEMORY_BASELINE_NREGIONS`); only tables up to this size are trimmed.
pub const MEMORY_BASELINE_NREGIONS: u32 = 8;

/// The header flags of version 1 of the protocol (no REPLY, no NEED_REPLY).
const VERSION_1: u32 = 0x1;
/// The REPLY flag.
const FLAG_REPLY: u32 = 0x4;
/// `VhostUserMemory`: `num_regions` and padding.
const MEM_TABLE_HEADER: usize = 8;
/// One `VhostUserMemoryRegion`.
const MEM_REGION_SIZE: usize = 32;
/// How long [`ConfigChannel::send_config_change`] waits for room on the channel.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);
/// Room for the control message of [`MAX_FDS`] descriptors (checked against `CMSG_SPACE`).
const CMSG_WORDS: usize = 32;

/// The counters of one shim, shared with whoever wants to read them while it runs.
#[derive(Debug, Default)]
pub struct ShimCounters {
    to_backend: AtomicU64,
    to_frontend: AtomicU64,
    mem_tables_trimmed: AtomicU64,
    backend_channels: AtomicU64,
    fds_forwarded: AtomicU64,
    refused: AtomicU64,
}

/// A snapshot of [`ShimCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ShimStats {
    /// Messages forwarded from the frontend to the backend.
    pub messages_to_backend: u64,
    /// Messages forwarded from the backend to the frontend (replies).
    pub messages_to_frontend: u64,
    /// `SET_MEM_TABLE` messages cut to the length their `num_regions` needs.
    pub mem_tables_trimmed: u64,
    /// Backend channels kept from `SET_BACKEND_REQ_FD`.
    pub backend_channels: u64,
    /// File descriptors forwarded (both directions).
    pub fds_forwarded: u64,
    /// Requests refused (see [`admit`](crate::admit)); each ended its connection.
    pub refused: u64,
}

impl ShimCounters {
    /// New counters, all zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current values.
    pub fn snapshot(&self) -> ShimStats {
        ShimStats {
            messages_to_backend: self.to_backend.load(Ordering::Relaxed),
            messages_to_frontend: self.to_frontend.load(Ordering::Relaxed),
            mem_tables_trimmed: self.mem_tables_trimmed.load(Ordering::Relaxed),
            backend_channels: self.backend_channels.load(Ordering::Relaxed),
            fds_forwarded: self.fds_forwarded.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

fn bump(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

#[derive(Debug, Default)]
struct ChannelInner {
    /// The kept backend channel and the id of the shim that set it.
    sock: Option<(u64, Arc<OwnedFd>)>,
    next_owner: u64,
    sent: u64,
}

/// The backend channel (`VHOST_USER_SET_BACKEND_REQ_FD`) as the shim kept it, to send
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`. Share one between the shim and the device.
///
/// The device does not offer `REPLY_ACK`, so the notification asks for no reply and the
/// frontend never writes to the channel because of it.
#[derive(Debug, Default)]
pub struct ConfigChannel {
    inner: Mutex<ChannelInner>,
}

impl ConfigChannel {
    /// A channel with no backend channel set.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, ChannelInner> {
        // Every field is valid on its own: a panic elsewhere cannot leave it inconsistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a backend channel is set.
    pub fn is_set(&self) -> bool {
        self.lock().sock.is_some()
    }

    /// Notifications sent so far.
    pub fn notifications_sent(&self) -> u64 {
        self.lock().sent
    }

    /// Drops the backend channel (call it when the frontend disconnects).
    pub fn reset(&self) {
        self.lock().sock = None;
    }

    fn new_owner(&self) -> u64 {
        let mut g = self.lock();
        g.next_owner = g.next_owner.wrapping_add(1);
        g.next_owner
    }

    fn set(&self, owner: u64, fd: OwnedFd) {
        self.lock().sock = Some((owner, Arc::new(fd)));
    }

    /// Drops the channel if the shim `owner` set it (a later connection may own it now).
    fn release(&self, owner: u64) {
        let mut g = self.lock();
        if g.sock.as_ref().is_some_and(|(o, _)| *o == owner) {
            g.sock = None;
        }
    }

    /// Sends `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (a 12-byte header: request 2, version 1,
    /// size 0) on the backend channel. Returns `Ok(false)` when no channel is set.
    ///
    /// Waits at most one second for room on the channel. A channel that is broken, or on
    /// which only part of the header could be written (the stream would be out of step), is
    /// dropped. No lock is held while it waits. Call it from one thread at a time (the
    /// daemon's notifier thread): two senders could interleave partial headers.
    pub fn send_config_change(&self) -> io::Result<bool> {
        // The channel is taken out of the lock for the send: nobody waits on this lock
        // while the frontend's socket is full.
        let Some((owner, fd)) = self.lock().sock.clone() else {
            return Ok(false);
        };
        let mut hdr = [0u8; HEADER_SIZE];
        hdr[0..4].copy_from_slice(&BACKEND_CONFIG_CHANGE_MSG.to_le_bytes());
        hdr[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
        let result = send_with_deadline(fd.as_raw_fd(), &hdr, Instant::now() + SEND_TIMEOUT);
        let mut g = self.lock();
        match result {
            Ok(()) => {
                g.sent = g.sent.wrapping_add(1);
                Ok(true)
            }
            Err((e, written)) => {
                let fatal = written > 0
                    || !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    );
                if fatal && g.sock.as_ref().is_some_and(|(o, _)| *o == owner) {
                    log::warn!(
                        "vhost-user: backend channel dropped after a failed config change \
                         notification ({written} of {HEADER_SIZE} bytes written): {e}"
                    );
                    g.sock = None;
                }
                Err(e)
            }
        }
    }
}

/// Writes all of `data` on a stream socket without blocking past `deadline`. On failure
/// returns the error and how many bytes were written.
fn send_with_deadline(fd: RawFd, data: &[u8], deadline: Instant) -> Result<(), (io::Error, usize)> {
    let mut off = 0usize;
    while off < data.len() {
        let rest = &data[off..];
        // SAFETY: `rest` is a valid, initialised buffer of `rest.len()` bytes for the whole
        // call; `send` only reads it. `fd` is a descriptor the caller keeps open.
        let n = unsafe {
            libc::send(
                fd,
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n > 0 {
            // n <= rest.len(), positive.
            off += n as usize;
            continue;
        }
        if n == 0 {
            return Err((io::Error::from(io::ErrorKind::WriteZero), off));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                let left = match deadline.checked_duration_since(Instant::now()) {
                    Some(d) if !d.is_zero() => d,
                    _ => return Err((io::Error::from(io::ErrorKind::TimedOut), off)),
                };
                let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(1000);
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: `pfd` is one valid pollfd that outlives the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            _ => return Err((e, off)),
        }
    }
    Ok(())
}

/// One message being forwarded, in a buffer allocated once per direction.
struct Message {
    buf: Vec<u8>,
    /// Header plus payload bytes in `buf`.
    len: usize,
    fds: Vec<OwnedFd>,
}

impl Message {
    fn new() -> Self {
        Message {
            buf: vec![0u8; HEADER_SIZE + MAX_PAYLOAD],
            len: 0,
            fds: Vec::with_capacity(MAX_FDS),
        }
    }

    fn field(&self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.buf[at..at + 4]);
        u32::from_le_bytes(b)
    }

    fn request(&self) -> u32 {
        self.field(0)
    }

    fn flags(&self) -> u32 {
        self.field(4)
    }

    fn payload(&self) -> &[u8] {
        &self.buf[HEADER_SIZE..self.len]
    }
}

/// Receives some bytes into `buf` (at most `buf.len()`), adding attached descriptors to
/// `fds`. Returns 0 at end of stream.
fn recv_some(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    let mut cmsg = [0u64; CMSG_WORDS];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32) } as usize;
    let space = space.min(mem::size_of_val(&cmsg));
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid (empty) value of this plain C struct.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: `msg` points at `iov` (which covers `buf`, valid for writes of
        // `buf.len()` bytes) and at `cmsg` (valid for writes of `space` bytes); all outlive
        // the call. The socket is open for as long as `sock` is borrowed.
        let r = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Take ownership of every received descriptor first, so all are closed on any error.
    let mut excess = false;
    // SAFETY: `msg` was filled by a successful recvmsg: CMSG_FIRSTHDR/CMSG_NXTHDR walk the
    // control data the kernel wrote inside `cmsg` (msg_controllen bounds it).
    let mut c = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !c.is_null() {
        // SAFETY: `c` is non-null and points at a complete cmsghdr inside `cmsg`.
        let hdr = unsafe { ptr::read_unaligned(c) };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN only computes a size.
            let base = unsafe { libc::CMSG_LEN(0) } as usize;
            let count = (hdr.cmsg_len as usize).saturating_sub(base) / mem::size_of::<RawFd>();
            // SAFETY: the data of this control message follows its header inside `cmsg`.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, and the kernel wrote `count` descriptors after the
                // header (cmsg_len covers them); read_unaligned makes no alignment claim.
                let fd = unsafe { ptr::read_unaligned(data.add(i)) };
                if fd < 0 {
                    continue;
                }
                // SAFETY: SCM_RIGHTS installed `fd` in this process for us alone: nothing
                // else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                if fds.len() < MAX_FDS {
                    fds.push(owned);
                } else {
                    excess = true;
                }
            }
        }
        // SAFETY: same walk as above; returns null after the last header.
        c = unsafe { libc::CMSG_NXTHDR(&msg, c) };
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || excess {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more than {MAX_FDS} file descriptors attached to a message"),
        ));
    }
    Ok(n)
}

/// Fills `buf` completely. Returns `Ok(false)` if the stream ended before the first byte
/// and `eof_ok` is set.
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    eof_ok: bool,
) -> io::Result<bool> {
    let mut filled = 0usize;
    // Each round trip consumes at least one byte, so this ends within `buf.len()` rounds.
    while filled < buf.len() {
        let n = recv_some(sock, &mut buf[filled..], fds)?;
        if n == 0 {
            if filled == 0 && eof_ok {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed in the middle of a message ({filled} of {} bytes)",
                    buf.len()
                ),
            ));
        }
        filled += n;
    }
    Ok(true)
}

/// Reads one whole message into `msg`. Returns `Ok(false)` at a clean end of stream.
fn recv_message(sock: &UnixStream, msg: &mut Message) -> io::Result<bool> {
    msg.fds.clear();
    msg.len = 0;
    let Message { buf, fds, .. } = msg;
    if !recv_exact(sock, &mut buf[..HEADER_SIZE], fds, true)? {
        return Ok(false);
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[8..12]);
    let size = u32::from_le_bytes(b) as usize;
    if size > MAX_PAYLOAD {
        b.copy_from_slice(&buf[0..4]);
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "request {} announces a {size}-byte payload (at most {MAX_PAYLOAD})",
                u32::from_le_bytes(b)
            ),
        ));
    }
    let end = HEADER_SIZE + size;
    recv_exact(sock, &mut buf[HEADER_SIZE..end], fds, false)?;
    msg.len = end;
    Ok(true)
}

/// Writes `data` with `fds` attached to its first byte.
fn send_message(sock: &UnixStream, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    let mut cmsg = [0u64; CMSG_WORDS];
    let mut off = 0usize;
    let mut fds_sent = fds.is_empty();
    while off < data.len() || !fds_sent {
        let rest = &data[off..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // SAFETY: an all-zero msghdr is a valid (empty) value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds_sent {
            let bytes = mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes.
            let (space, len) =
                unsafe { (libc::CMSG_SPACE(bytes as u32), libc::CMSG_LEN(bytes as u32)) };
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = (space as usize).min(mem::size_of_val(&cmsg)) as _;
            // SAFETY: msg_control points at `cmsg`, large enough for one header with
            // MAX_FDS descriptors (CMSG_WORDS is sized for it), so CMSG_FIRSTHDR is non-null
            // and its data area can hold `fds.len()` descriptors.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = len as _;
                let data = libc::CMSG_DATA(c).cast::<RawFd>();
                for (i, fd) in fds.iter().enumerate() {
                    ptr::write_unaligned(data.add(i), fd.as_raw_fd());
                }
            }
        }
        // SAFETY: `msg` points at `iov` (covering `rest`, only read) and, if set, at `cmsg`
        // filled above; all outlive the call. The descriptors in it are open (owned by
        // `fds`) and the socket is open while `sock` is borrowed.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 && !rest.is_empty() {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        fds_sent = true;
        off += n as usize;
    }
    Ok(())
}

/// Cuts a UML-style `SET_MEM_TABLE` to the length its `num_regions` needs. Returns the new
/// payload size, or `None` to leave the message alone.
fn trim_mem_table(msg: &mut Message) -> Option<usize> {
    let payload = msg.payload();
    if payload.len() < MEM_TABLE_HEADER {
        return None;
    }
    let mut b = [0u8; 4];
    b.copy_from_slice(&payload[0..4]);
    let regions = u32::from_le_bytes(b);
    if regions == 0 || regions > MEMORY_BASELINE_NREGIONS {
        return None;
    }
    // regions <= 8: no overflow.
    let needed = MEM_TABLE_HEADER + regions as usize * MEM_REGION_SIZE;
    if payload.len() <= needed {
        return None;
    }
    msg.buf[8..12].copy_from_slice(&(needed as u32).to_le_bytes());
    msg.len = HEADER_SIZE + needed;
    Some(needed)
}

/// Which way a message goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToBackend,
    ToFrontend,
}

struct Ctx<'a> {
    channel: &'a ConfigChannel,
    owner: u64,
    counters: &'a ShimCounters,
}

/// Looks at a frontend request before it is forwarded; an error refuses it (and ends the
/// connection).
fn inspect_request(msg: &mut Message, ctx: &Ctx<'_>) -> io::Result<()> {
    if msg.flags() & FLAG_REPLY != 0 {
        return Ok(());
    }
    if msg.request() == SET_MEM_TABLE {
        let before = msg.payload().len();
        if let Some(size) = trim_mem_table(msg) {
            bump(&ctx.counters.mem_tables_trimmed, 1);
            log::debug!(
                "vhost-user shim: SET_MEM_TABLE cut from {before} to {size} bytes \
                 (the frontend sent the whole region array)"
            );
        }
    }
    crate::admit::check_request(msg.request(), msg.payload(), &msg.fds).map_err(|e| {
        bump(&ctx.counters.refused, 1);
        io::Error::new(io::ErrorKind::InvalidData, format!("request refused: {e}"))
    })?;
    if msg.request() == SET_BACKEND_REQ_FD {
        match msg.fds.as_slice() {
            [fd] if crate::admit::is_unix_stream(fd.as_fd()) => match fd.try_clone() {
                Ok(dup) => {
                    ctx.channel.set(ctx.owner, dup);
                    bump(&ctx.counters.backend_channels, 1);
                    log::debug!("vhost-user shim: backend channel kept for config changes");
                }
                Err(e) => log::warn!("vhost-user shim: cannot keep the backend channel: {e}"),
            },
            fds => log::warn!(
                "vhost-user shim: SET_BACKEND_REQ_FD with {} descriptors that are not one \
                 Unix stream socket: not kept",
                fds.len()
            ),
        }
    }
    Ok(())
}

/// Forwards messages from `src` to `dst` until `src` ends or something fails.
fn forward(src: &UnixStream, dst: &UnixStream, dir: Direction, ctx: &Ctx<'_>) -> io::Result<()> {
    let mut msg = Message::new();
    let (from, counter) = match dir {
        Direction::ToBackend => ("frontend", &ctx.counters.to_backend),
        Direction::ToFrontend => ("backend", &ctx.counters.to_frontend),
    };
    loop {
        match recv_message(src, &mut msg) {
            Ok(true) => {}
            Ok(false) => return Ok(()),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("bad message from the {from}: {e}"),
                ))
            }
        }
        if dir == Direction::ToBackend {
            inspect_request(&mut msg, ctx)?;
        }
        // Counted before the send, so a peer that has received a message sees it counted.
        bump(counter, 1);
        bump(&ctx.counters.fds_forwarded, msg.fds.len() as u64);
        send_message(dst, &msg.buf[..msg.len], &msg.fds)?;
        // Our copies of the descriptors are closed here; the receiver has its own.
        msg.fds.clear();
    }
}

/// Runs the shim between `frontend` (the frontend's connection) and `backend` (a socket
/// whose peer `vhost`'s request handler serves) until either side closes or fails. Then both
/// sockets are shut down, the backend channel this connection set is dropped from
/// `channel`, and the first error is returned (`Ok(())` when a side simply closed).
///
/// Requests go frontend → backend on the calling thread, replies backend → frontend on a
/// second thread. `counters` counts what passed.
pub fn run_shim(
    frontend: UnixStream,
    backend: UnixStream,
    channel: Arc<ConfigChannel>,
    counters: Arc<ShimCounters>,
) -> io::Result<()> {
    let owner = channel.new_owner();
    let closing = Arc::new(AtomicBool::new(false));
    let (f2, b2) = (frontend.try_clone()?, backend.try_clone()?);
    let shut = |a: &UnixStream, b: &UnixStream, closing: &AtomicBool| {
        closing.store(true, Ordering::SeqCst);
        let _ = a.shutdown(Shutdown::Both);
        let _ = b.shutdown(Shutdown::Both);
    };
    let replies = {
        let (channel, counters, closing) = (channel.clone(), counters.clone(), closing.clone());
        thread::Builder::new()
            .name("vhost-user-shim".into())
            .spawn(move || {
                let ctx = Ctx {
                    channel: &channel,
                    owner,
                    counters: &counters,
                };
                let r = forward(&b2, &f2, Direction::ToFrontend, &ctx);
                let first = !closing.load(Ordering::SeqCst);
                shut(&b2, &f2, &closing);
                if first {
                    r
                } else {
                    Ok(())
                }
            })?
    };
    let ctx = Ctx {
        channel: &channel,
        owner,
        counters: &counters,
    };
    let r = forward(&frontend, &backend, Direction::ToBackend, &ctx);
    let first = !closing.load(Ordering::SeqCst);
    shut(&frontend, &backend, &closing);
    let r = if first { r } else { Ok(()) };
    let r2 = replies
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("the shim's reply thread panicked")));
    channel.release(owner);
    let result = r.and(r2);
    match &result {
        Ok(()) => log::info!(
            "vhost-user shim: connection closed ({:?})",
            counters.snapshot()
        ),
        Err(e) => log::warn!(
            "vhost-user shim: connection closed: {e} ({:?})",
            counters.snapshot()
        ),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::thread::JoinHandle;

    use vhost::vhost_user::message::VhostUserProtocolFeatures;
    use vhost::vhost_user::Listener;
    use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::epoll::EventSet;
    use vmm_sys_util::event::{
        new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
    };
    use vmm_sys_util::tempdir::TempDir;
    use vmm_sys_util::tempfile::TempFile;

    const GET_FEATURES: u32 = 1;

    fn header(req: u32, flags: u32, size: usize) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&req.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&(size as u32).to_le_bytes());
        v
    }

    /// A UML-style memory table: `regions` used entries in a whole 8-entry array.
    fn uml_mem_table(regions: u32, region_size: u64) -> Vec<u8> {
        let payload_len = MEM_TABLE_HEADER + 8 * MEM_REGION_SIZE;
        let mut v = header(SET_MEM_TABLE, VERSION_1, payload_len);
        v.extend_from_slice(&regions.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for i in 0..8u64 {
            // guest_phys_addr, memory_size, user_addr, mmap_offset
            for f in [
                i * region_size,
                region_size,
                0x7f00_0000_0000 + i * region_size,
                0,
            ] {
                v.extend_from_slice(&f.to_le_bytes());
            }
        }
        v
    }

    fn memfile(size: u64) -> File {
        let f = TempFile::new().unwrap().into_file();
        f.set_len(size).unwrap();
        f
    }

    fn owned(f: &File) -> OwnedFd {
        f.as_fd().try_clone_to_owned().unwrap()
    }

    /// Receives one message from a test socket.
    fn recv(sock: &UnixStream) -> (Vec<u8>, Vec<OwnedFd>) {
        let mut m = Message::new();
        assert!(
            recv_message(sock, &mut m).unwrap(),
            "unexpected end of stream"
        );
        (m.buf[..m.len].to_vec(), std::mem::take(&mut m.fds))
    }

    struct Running {
        front: UnixStream,
        back: UnixStream,
        channel: Arc<ConfigChannel>,
        counters: Arc<ShimCounters>,
        shim: JoinHandle<io::Result<()>>,
    }

    fn start() -> Running {
        let (front, front_shim) = UnixStream::pair().unwrap();
        let (back_shim, back) = UnixStream::pair().unwrap();
        let channel = Arc::new(ConfigChannel::new());
        let counters = Arc::new(ShimCounters::new());
        let (c, n) = (channel.clone(), counters.clone());
        let shim = thread::spawn(move || run_shim(front_shim, back_shim, c, n));
        Running {
            front,
            back,
            channel,
            counters,
            shim,
        }
    }

    fn is_eof(sock: &UnixStream) -> bool {
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!((&*sock).read(&mut b), Ok(0))
    }

    #[test]
    fn uml_mem_table_is_trimmed_and_keeps_its_fd() {
        let r = start();
        let mut file = memfile(0x1_0000);
        let msg = uml_mem_table(1, 0x1_0000);
        assert_eq!(msg.len(), HEADER_SIZE + 264);
        send_message(&r.front, &msg, &[owned(&file)]).unwrap();
        let (got, fds) = recv(&r.back);
        assert_eq!(got.len(), HEADER_SIZE + 40);
        assert_eq!(&got[..8], &msg[..8]);
        assert_eq!(u32::from_le_bytes(got[8..12].try_into().unwrap()), 40);
        assert_eq!(&got[HEADER_SIZE..], &msg[HEADER_SIZE..HEADER_SIZE + 40]);
        // The forwarded descriptor is the same file.
        assert_eq!(fds.len(), 1);
        let mut other = File::from(fds.into_iter().next().unwrap());
        other.write_all(b"balloon").unwrap();
        let mut s = [0u8; 7];
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_exact(&mut s).unwrap();
        assert_eq!(&s, b"balloon");
        drop(r.front);
        r.shim.join().unwrap().unwrap();
        assert!(is_eof(&r.back));
        // Counted after forwarding: read once the shim has finished.
        let stats = r.counters.snapshot();
        assert_eq!(stats.mem_tables_trimmed, 1);
        assert_eq!(stats.messages_to_backend, 1);
        assert_eq!(stats.fds_forwarded, 1);
    }

    #[test]
    fn other_mem_tables_pass_unchanged() {
        let r = start();
        // Exactly sized (QEMU), zero regions, more than 8 regions, shorter than announced.
        let mut exact = header(SET_MEM_TABLE, VERSION_1, 40);
        exact.extend_from_slice(&1u32.to_le_bytes());
        exact.extend_from_slice(&[0u8; 36]);
        let mut zero = uml_mem_table(0, 0x1000);
        zero[HEADER_SIZE] = 0;
        let mut nine = uml_mem_table(9, 0x1000);
        nine[HEADER_SIZE] = 9;
        let mut short = header(SET_MEM_TABLE, VERSION_1, 8 + 32);
        short.extend_from_slice(&2u32.to_le_bytes());
        short.extend_from_slice(&[0u8; 36]);
        let mut tiny = header(SET_MEM_TABLE, VERSION_1, 4);
        tiny.extend_from_slice(&1u32.to_le_bytes());
        for m in [&exact, &zero, &nine, &short, &tiny] {
            send_message(&r.front, m, &[]).unwrap();
            assert_eq!(&recv(&r.back).0, m);
        }
        drop(r.front);
        r.shim.join().unwrap().unwrap();
        // Counted after forwarding: read once the shim has finished.
        assert_eq!(r.counters.snapshot().mem_tables_trimmed, 0);
        assert_eq!(r.counters.snapshot().messages_to_backend, 5);
    }

    #[test]
    fn backend_channel_carries_config_change() {
        let r = start();
        assert!(!r.channel.send_config_change().unwrap(), "no channel yet");
        let (dev_end, front_end) = UnixStream::pair().unwrap();
        let msg = header(SET_BACKEND_REQ_FD, VERSION_1, 0);
        send_message(&r.front, &msg, &[OwnedFd::from(dev_end)]).unwrap();
        let (got, fds) = recv(&r.back);
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 1, "vhost gets its own copy");
        assert!(r.channel.is_set());
        assert!(r.channel.send_config_change().unwrap());
        let mut hdr = [0u8; HEADER_SIZE];
        (&front_end).read_exact(&mut hdr).unwrap();
        assert_eq!(hdr, [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(r.channel.notifications_sent(), 1);

        // A new channel replaces the old one.
        let (dev2, front2) = UnixStream::pair().unwrap();
        send_message(&r.front, &msg, &[OwnedFd::from(dev2)]).unwrap();
        let _ = recv(&r.back);
        assert!(r.channel.send_config_change().unwrap());
        (&front2).read_exact(&mut hdr).unwrap();
        assert_eq!(hdr[0], 2);
        assert_eq!(r.counters.snapshot().backend_channels, 2);
        // The old channel got nothing more: vhost's copy went away with `fds`, ours was
        // replaced, so the old peer sees end of stream.
        drop(fds);
        assert!(is_eof(&front_end));

        r.channel.reset();
        assert!(!r.channel.send_config_change().unwrap());
        drop(r.front);
        r.shim.join().unwrap().unwrap();
    }

    #[test]
    fn channel_is_released_when_the_connection_ends() {
        let r = start();
        let (dev_end, _front_end) = UnixStream::pair().unwrap();
        send_message(
            &r.front,
            &header(SET_BACKEND_REQ_FD, VERSION_1, 0),
            &[OwnedFd::from(dev_end)],
        )
        .unwrap();
        let _ = recv(&r.back);
        assert!(r.channel.is_set());
        drop(r.front);
        r.shim.join().unwrap().unwrap();
        assert!(!r.channel.is_set());
    }

    #[test]
    fn backend_channel_that_is_not_a_socket_is_not_kept() {
        let r = start();
        let file = memfile(0x1000);
        send_message(
            &r.front,
            &header(SET_BACKEND_REQ_FD, VERSION_1, 0),
            &[owned(&file)],
        )
        .unwrap();
        let (_, fds) = recv(&r.back);
        assert_eq!(fds.len(), 1, "forwarded anyway: vhost refuses it");
        assert!(!r.channel.is_set());
        assert!(!r.channel.send_config_change().unwrap());
        drop(r.front);
        r.shim.join().unwrap().unwrap();
    }

    #[test]
    fn broken_backend_channel_is_dropped() {
        let channel = ConfigChannel::new();
        let (dev_end, front_end) = UnixStream::pair().unwrap();
        channel.set(1, OwnedFd::from(dev_end));
        drop(front_end);
        assert!(channel.send_config_change().is_err());
        assert!(!channel.is_set());
        // Another connection's release does not drop a channel it did not set.
        let (dev_end, _front_end) = UnixStream::pair().unwrap();
        channel.set(2, OwnedFd::from(dev_end));
        channel.release(1);
        assert!(channel.is_set());
        channel.release(2);
        assert!(!channel.is_set());
    }

    #[test]
    fn replies_are_forwarded_with_fds() {
        let r = start();
        let mut reply = header(GET_FEATURES, VERSION_1 | FLAG_REPLY, 8);
        reply.extend_from_slice(&0x1234u64.to_le_bytes());
        let file = memfile(0x1000);
        send_message(&r.back, &reply, &[owned(&file)]).unwrap();
        let (got, fds) = recv(&r.front);
        assert_eq!(got, reply);
        assert_eq!(fds.len(), 1);
        assert_eq!(r.counters.snapshot().messages_to_frontend, 1);
        // The backend closing ends the shim too.
        drop(r.back);
        r.shim.join().unwrap().unwrap();
        assert!(is_eof(&r.front));
    }

    #[test]
    fn oversized_payload_closes_the_connection() {
        let r = start();
        send_message(&r.front, &header(GET_FEATURES, VERSION_1, 0x2000), &[]).unwrap();
        let err = r.shim.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("8192-byte payload"), "{err}");
        assert!(is_eof(&r.back));
        assert!(is_eof(&r.front));
        assert_eq!(r.counters.snapshot().messages_to_backend, 0);
    }

    #[test]
    fn largest_payload_passes() {
        let r = start();
        let mut m = header(99, VERSION_1, MAX_PAYLOAD);
        m.extend(std::iter::repeat_n(0xa5u8, MAX_PAYLOAD));
        send_message(&r.front, &m, &[]).unwrap();
        assert_eq!(recv(&r.back).0, m);
        drop(r.front);
        r.shim.join().unwrap().unwrap();
    }

    #[test]
    fn truncated_message_closes_the_connection() {
        let r = start();
        let mut m = header(GET_FEATURES, VERSION_1, 16);
        m.extend_from_slice(&[0u8; 5]);
        (&r.front).write_all(&m).unwrap();
        drop(r.front);
        let err = r.shim.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(is_eof(&r.back));
    }

    #[test]
    fn truncated_header_closes_the_connection() {
        let r = start();
        (&r.front).write_all(&[1, 0, 0]).unwrap();
        drop(r.front);
        let err = r.shim.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn too_many_fds_close_the_connection() {
        let r = start();
        let file = memfile(0x1000);
        let fds: Vec<OwnedFd> = (0..MAX_FDS + 1).map(|_| owned(&file)).collect();
        // Build the control message by hand: send_message refuses more than MAX_FDS.
        let data = header(SET_MEM_TABLE, VERSION_1, 0);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let bytes = mem::size_of_val(raw.as_slice());
        let mut cmsg = vec![0u64; 64];
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        // SAFETY: an all-zero msghdr is a valid value.
        let mut msg: libc::msghdr = unsafe { mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cmsg.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(bytes as u32) } as _;
        // SAFETY: `cmsg` (512 bytes) holds one header and 33 descriptors; the pointers in
        // `msg` stay valid during sendmsg, which only reads them.
        let n = unsafe {
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c).cast::<RawFd>(), raw.len());
            libc::sendmsg(r.front.as_raw_fd(), &msg, 0)
        };
        assert_eq!(n, data.len() as isize);
        let err = r.shim.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(is_eof(&r.back));
    }

    #[test]
    fn garbage_is_forwarded_for_vhost_to_judge() {
        let r = start();
        // Unknown request codes and bad flags are vhost's business, not the shim's.
        for (req, flags) in [
            (0xdead_beef, 0),
            (0, 0xffff_ffff),
            (SET_MEM_TABLE, FLAG_REPLY),
        ] {
            let mut m = header(req, flags, 3);
            m.extend_from_slice(&[1, 2, 3]);
            send_message(&r.front, &m, &[]).unwrap();
            assert_eq!(recv(&r.back).0, m);
        }
        drop(r.front);
        r.shim.join().unwrap().unwrap();
    }

    // End to end: a real vhost-user backend behind the shim.

    struct TrivialBackend {
        mem_updates: std::sync::atomic::AtomicUsize,
        regions: std::sync::atomic::AtomicUsize,
    }

    impl VhostUserBackend for TrivialBackend {
        type Bitmap = ();
        type Vring = VringRwLock;

        fn num_queues(&self) -> usize {
            1
        }

        fn max_queue_size(&self) -> usize {
            256
        }

        fn features(&self) -> u64 {
            1 << 32
        }

        fn protocol_features(&self) -> VhostUserProtocolFeatures {
            VhostUserProtocolFeatures::CONFIG
        }

        fn set_event_idx(&self, _enabled: bool) {}

        // Without an exit event the daemon's worker thread never ends and dropping the
        // daemon waits for it forever.
        fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
            new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
        }

        fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
            use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
            self.regions
                .store(mem.memory().num_regions(), Ordering::SeqCst);
            self.mem_updates.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }

        fn handle_event(
            &self,
            _device_event: u16,
            _evset: EventSet,
            _vrings: &[VringRwLock],
            _thread_id: usize,
        ) -> io::Result<()> {
            Ok(())
        }
    }

    type Daemon = VhostUserDaemon<Arc<TrivialBackend>>;

    /// A daemon serving one connection on a socket in `dir`; returns it, its backend and the
    /// connected client end.
    fn daemon(dir: &TempDir) -> (Daemon, Arc<TrivialBackend>, UnixStream) {
        let path = dir.as_path().join("vhost.sock");
        let mut listener = Listener::new(&path, true).unwrap();
        let backend = Arc::new(TrivialBackend {
            mem_updates: Default::default(),
            regions: Default::default(),
        });
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut d = VhostUserDaemon::new("test".into(), backend.clone(), mem).unwrap();
        // The connection waits in the listen backlog until the daemon accepts it.
        let client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        d.start(&mut listener).unwrap();
        (d, backend, client)
    }

    fn get_features(sock: &UnixStream) -> u64 {
        send_message(sock, &header(GET_FEATURES, VERSION_1, 0), &[]).unwrap();
        let (reply, _) = recv(sock);
        assert_eq!(reply.len(), HEADER_SIZE + 8);
        u64::from_le_bytes(reply[HEADER_SIZE..].try_into().unwrap())
    }

    #[test]
    fn vhost_refuses_uml_mem_table_without_the_shim() {
        let dir = TempDir::new_with_prefix("/tmp/vub-shim").unwrap();
        let (mut d, backend, client) = daemon(&dir);
        assert_eq!(get_features(&client), 1 << 32);
        let file = memfile(0x1_0000);
        send_message(&client, &uml_mem_table(1, 0x1_0000), &[owned(&file)]).unwrap();
        // vhost refuses the message and drops the connection.
        assert!(is_eof(&client));
        let err = d.wait().unwrap_err();
        assert!(format!("{err:?}").contains("InvalidMessage"), "{err:?}");
        assert_eq!(backend.mem_updates.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn vhost_accepts_uml_mem_table_through_the_shim() {
        let dir = TempDir::new_with_prefix("/tmp/vub-shim").unwrap();
        let (mut d, backend, client) = daemon(&dir);
        let (front, front_shim) = UnixStream::pair().unwrap();
        let channel = Arc::new(ConfigChannel::new());
        let counters = Arc::new(ShimCounters::new());
        let c = counters.clone();
        let shim = thread::spawn(move || run_shim(front_shim, client, channel, c));

        let file = memfile(0x1_0000);
        send_message(&front, &uml_mem_table(1, 0x1_0000), &[owned(&file)]).unwrap();
        // Requests are handled in order: the reply to this one means the table was taken.
        assert_eq!(get_features(&front), 1 << 32);
        assert_eq!(backend.mem_updates.load(Ordering::SeqCst), 1);
        assert_eq!(backend.regions.load(Ordering::SeqCst), 1);
        assert_eq!(counters.snapshot().mem_tables_trimmed, 1);
        assert_eq!(counters.snapshot().messages_to_frontend, 1);

        drop(front);
        shim.join().unwrap().unwrap();
        // The frontend's disconnect reaches the daemon as the end of its connection.
        if let Err(e) = d.wait() {
            assert!(format!("{e:?}").contains("Disconnected"), "{e:?}");
        }
    }
}
