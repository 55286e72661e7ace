// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon driven through `vhost`'s frontend API, as a VMM would: set-up, activation
//! from the vrings, inflate with holes punched in the shared memory file, a hint round with
//! configuration changes on the backend channel, and every kind of bad frontend input: the
//! daemon logs it, keeps its state consistent and serves the next connection.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vhost_user_balloon::daemon::{bind, empty_memory, Daemon};
use vhost_user_balloon::device::BalloonBackend;
use virtio_balloon::backend::MadviseBackend;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::VirtioDevice;
use virtio_balloon::{BalloonConfig, HintState};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod vhost_frontend;
use vhost_frontend::{memfd, ring_config, send_with_fds};

const MEM_SIZE: usize = 32 << 20;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const VRING_DESC_F_WRITE: u16 = 2;
/// Queues: inflate, deflate, stats, free page (the default configuration).
const INFLATE: usize = 0;
const FREE_PAGE: usize = 3;

/// Log lines, from every daemon in this test binary.
fn logs() -> &'static Mutex<Vec<String>> {
    static LOGS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    LOGS.get_or_init(|| Mutex::new(Vec::new()))
}

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = format!("{} {}", record.level(), record.args());
        eprintln!("{line}");
        logs().lock().unwrap().push(line);
    }
    fn flush(&self) {}
}

fn init_log() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = log::set_logger(&Capture);
        log::set_max_level(log::LevelFilter::Info);
    });
}

fn logged(what: &str) -> bool {
    logs().lock().unwrap().iter().any(|l| l.contains(what))
}

/// Waits until `cond` holds, up to 5 s.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

/// A daemon on its own socket, serving connections on a thread.
struct Running {
    path: PathBuf,
    backend: Arc<BalloonBackend>,
    sink: Arc<RecordingSink>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_daemon(name: &str) -> Running {
    init_log();
    let dir = std::env::temp_dir().join(format!("vub-frontend-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("balloon.sock");
    let cfg = BalloonConfig::default()
        .with_queue_size(QUEUE_SIZE)
        .with_free_page_queue_size(QUEUE_SIZE)
        .with_reporting_queue_size(QUEUE_SIZE)
        .with_hint_file_backed_memory(true);
    let sink = Arc::new(RecordingSink::default());
    let mut daemon = Daemon::new(
        cfg,
        empty_memory(),
        sink.clone(),
        Arc::new(MadviseBackend::new().punch_holes(true)),
    )
    .unwrap();
    let backend = daemon.backend().clone();
    let listener = bind(&path).unwrap();
    thread::spawn(move || {
        let stop = AtomicBool::new(false);
        let _ = daemon.run(&listener, &stop, false);
    });
    Running {
        path,
        backend,
        sink,
        _dir: TempDir(dir),
    }
}

/// Guest memory in a memfd, as a VMM shares it with a vhost-user backend.
struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
}

impl Guest {
    fn new() -> Self {
        let file = memfd(c"vub-guest", MEM_SIZE);
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .unwrap();
        Guest { file, mem }
    }

    fn host_base(&self) -> u64 {
        use vm_memory::GuestMemoryBackend;
        self.mem.get_host_address(GuestAddress(0)).unwrap() as u64
    }

    fn region(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM_SIZE as u64,
            userspace_addr: self.host_base(),
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// Bytes the memory file really holds.
    fn allocated(&self) -> u64 {
        // SAFETY: fstat fills the zeroed stat buffer for an open descriptor.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a valid, writable stat buffer and the descriptor is open.
        let r = unsafe { libc::fstat(self.file.as_raw_fd(), &mut st) };
        assert_eq!(r, 0);
        st.st_blocks as u64 * 512
    }

    fn ring_addr(index: usize) -> GuestAddress {
        GuestAddress(0x10_0000 + 0x1_0000 * index as u64)
    }

    fn queue(&self, index: usize) -> MockSplitQueue<'_, GuestMemoryMmap<()>> {
        MockSplitQueue::create(&self.mem, Self::ring_addr(index), QUEUE_SIZE)
    }
}

/// Sets up vring `i` at its place in `guest` (the used ring at the frontend address `used`
/// instead, if given), enabled, with fresh kick and call eventfds.
fn set_up_vring<'g>(
    fe: &mut Frontend,
    guest: &'g Guest,
    i: usize,
    used: Option<u64>,
) -> (MockSplitQueue<'g, GuestMemoryMmap<()>>, EventFd, EventFd) {
    let q = guest.queue(i);
    let base = guest.host_base();
    fe.set_vring_num(i, QUEUE_SIZE).unwrap();
    fe.set_vring_addr(
        i,
        &ring_config(
            QUEUE_SIZE,
            base + q.desc_table_addr().0,
            base + q.avail_addr().0,
            used.unwrap_or(base + q.used_addr().0),
        ),
    )
    .unwrap();
    fe.set_vring_base(i, 0).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(i, &call).unwrap();
    fe.set_vring_kick(i, &kick).unwrap();
    fe.set_vring_enable(i, true).unwrap();
    (q, kick, call)
}

/// A frontend connection set up the way QEMU or UML does it.
struct Conn<'g> {
    fe: Frontend,
    /// The driver side of each ring.
    queues: Vec<MockSplitQueue<'g, GuestMemoryMmap<()>>>,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Our end of the backend channel: configuration changes arrive here.
    channel: UnixStream,
    /// Where the next descriptor of each queue goes.
    next_desc: Vec<u16>,
}

fn connect(path: &PathBuf) -> Frontend {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match Frontend::connect(path, 4) {
            Ok(fe) => return fe,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

impl<'g> Conn<'g> {
    /// Sets up a connection; with `valid_features` false the driver acknowledges only the
    /// vhost-user protocol bit (no VERSION_1), which the device refuses.
    fn open(path: &PathBuf, guest: &'g Guest, valid_features: bool) -> Conn<'g> {
        let mut fe = connect(path);
        fe.set_owner().unwrap();
        let offered = fe.get_features().unwrap();
        assert!(offered & VIRTIO_F_VERSION_1 != 0 && offered & PROTOCOL_FEATURES != 0);
        let proto = fe.get_protocol_features().unwrap();
        assert!(proto.contains(VhostUserProtocolFeatures::CONFIG));
        assert!(proto.contains(VhostUserProtocolFeatures::BACKEND_REQ));
        fe.set_protocol_features(proto).unwrap();
        fe.set_features(if valid_features {
            offered
        } else {
            PROTOCOL_FEATURES
        })
        .unwrap();
        let (ours, theirs) = UnixStream::pair().unwrap();
        fe.set_backend_request_fd(&theirs).unwrap();
        fe.set_mem_table(&[guest.region()]).unwrap();
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        let mut queues = Vec::new();
        for i in 0..4 {
            let (q, kick, call) = set_up_vring(&mut fe, guest, i, None);
            calls.push(call);
            kicks.push(kick);
            queues.push(q);
        }
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        Conn {
            fe,
            queues,
            kicks,
            calls,
            channel: ours,
            next_desc: vec![0; 4],
        }
    }

    /// Posts one single-descriptor element on queue `q` and kicks.
    fn post(&mut self, q: usize, addr: u64, len: u32, flags: u16) {
        let i = self.next_desc[q];
        self.next_desc[q] = (i + 1) % QUEUE_SIZE;
        let desc = RawDescriptor::from(Descriptor::new(addr, len, flags, 0));
        self.queues[q].add_desc_chains(&[desc], i).unwrap();
        self.kicks[q].write(1).unwrap();
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.queues[q].used().idx().load()
    }

    /// Reads one backend request from the channel: (request code, payload size). The
    /// daemon never asks for a reply (flags = version 1 only): a backend waiting for an
    /// ack while the frontend waits for its GET_CONFIG answer would deadlock both.
    fn backend_request(&mut self) -> (u32, u32) {
        let mut hdr = [0u8; 12];
        self.channel.read_exact(&mut hdr).unwrap();
        let code = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
        let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
        let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap());
        assert_eq!(flags, 1, "no NEED_REPLY on a backend request");
        (code, size)
    }

    fn config_u32(&mut self, offset: u32) -> u32 {
        let buf = [0u8; 4];
        let (_, data) = self
            .fe
            .get_config(offset, 4, VhostUserConfigFlags::WRITABLE, &buf)
            .unwrap();
        u32::from_le_bytes(data[..4].try_into().unwrap())
    }
}

#[test]
fn inflate_punches_holes_and_a_hint_round_completes() {
    let d = start_daemon("happy");
    let guest = Guest::new();
    // The guest has touched 8 MiB at 16 MiB: the memory file holds it.
    let dirty = 16u64 << 20;
    guest
        .mem
        .write_slice(&vec![0x5au8; 8 << 20], GuestAddress(dirty))
        .unwrap();
    // The PFN lists of the eight inflate elements, written before measuring.
    let pfns = 0x8000u64;
    for e in 0..8u64 {
        let list: Vec<u8> = (0..256u32)
            .flat_map(|i| ((dirty >> 12) as u32 + e as u32 * 256 + i).to_le_bytes())
            .collect();
        guest
            .mem
            .write_slice(&list, GuestAddress(pfns + e * 1024))
            .unwrap();
    }
    let mut c = Conn::open(&d.path, &guest, true);
    let before = guest.allocated();
    assert!(before >= 8 << 20);
    // Activation happens on the first configuration access (Linux reads num_pages).
    assert_eq!(c.config_u32(0), 0);
    wait_for("activation", || d.backend.counters().activations == 1);

    // set_target: a configuration change message on the backend channel.
    d.backend.balloon().lock().unwrap().set_target(2048);
    assert_eq!(
        c.backend_request(),
        (2, 0),
        "VHOST_USER_BACKEND_CONFIG_CHANGE_MSG"
    );
    assert_eq!(c.config_u32(0), 2048);

    // The driver inflates the 8 MiB in elements of 256 PFNs.
    for e in 0..8u64 {
        c.post(INFLATE, pfns + e * 1024, 1024, 0);
    }
    wait_for("inflate elements used", || c.used_idx(INFLATE) == 8);
    assert!(
        c.calls[INFLATE].read().is_ok(),
        "used-buffer interrupt on the inflate call fd"
    );
    // The driver reports actual = target: the device discards what it merged.
    c.fe.set_config(4, VhostUserConfigFlags::WRITABLE, &2048u32.to_le_bytes())
        .unwrap();
    wait_for("holes punched", || {
        before.saturating_sub(guest.allocated()) >= (8 << 20) * 9 / 10
    });
    let metrics = d.backend.balloon().lock().unwrap().metrics();
    assert_eq!(metrics.pages.inflate_elements, 8);
    println!(
        "inflated 8 MiB: allocated {} -> {} bytes",
        before,
        guest.allocated()
    );

    // A hint round.
    let hint = d.backend.hint_control();
    let id = hint.start_round();
    assert_eq!(c.backend_request(), (2, 0));
    assert_eq!(c.config_u32(8), id);
    guest.mem.write_obj(id, GuestAddress(0x9000)).unwrap();
    c.post(FREE_PAGE, 0x9000, 4, 0);
    for b in 0..3u64 {
        c.post(FREE_PAGE, (4 << 20) * (b + 1), 4 << 20, VRING_DESC_F_WRITE);
    }
    guest.mem.write_obj(0u32, GuestAddress(0x9004)).unwrap();
    c.post(FREE_PAGE, 0x9004, 4, 0);
    assert!(hint.wait_round_complete(Duration::from_secs(5)));
    assert_eq!(d.sink.total_bytes(), 3 * (4 << 20));
    assert_eq!(hint.status().state, HintState::Stop);
    hint.done();
    assert_eq!(c.backend_request(), (2, 0));
    assert_eq!(c.config_u32(8), 1, "DONE");
}

#[test]
fn kicks_before_features_do_nothing_until_the_driver_is_set_up() {
    let d = start_daemon("early-kick");
    let guest = Guest::new();
    let mut c = Conn::open(&d.path, &guest, false);
    c.post(INFLATE, 0x8000, 4, 0);
    thread::sleep(Duration::from_millis(100));
    assert_eq!(c.used_idx(INFLATE), 0, "nothing served before features");
    assert_eq!(d.backend.counters().activations, 0);
    let features = c.fe.get_features().unwrap();
    c.fe.set_features(features).unwrap();
    // The next kick activates the device and serves what waited.
    c.kicks[INFLATE].write(1).unwrap();
    wait_for("the early element", || c.used_idx(INFLATE) == 1);
    assert_eq!(d.backend.counters().activations, 1);
}

#[test]
fn garbage_messages_end_the_connection_and_the_next_one_works() {
    let d = start_daemon("garbage");
    // An unknown request code with a payload vhost cannot parse.
    let mut raw = connect_raw(&d.path);
    use std::io::Write;
    let mut msg = Vec::new();
    msg.extend_from_slice(&0xdead_u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&8u32.to_le_bytes());
    msg.extend_from_slice(&[0xff; 8]);
    raw.write_all(&msg).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(raw.read(&mut buf).unwrap_or(0), 0, "connection closed");
    wait_for("the log line", || logged("connection ended"));
    // An oversized header: the shim refuses it before vhost sees it.
    let mut raw = connect_raw(&d.path);
    let mut msg = Vec::new();
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&u32::MAX.to_le_bytes());
    raw.write_all(&msg).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(raw.read(&mut buf).unwrap_or(0), 0, "connection closed");

    // The daemon still serves a well-behaved frontend.
    let guest = Guest::new();
    let mut c = Conn::open(&d.path, &guest, true);
    assert_eq!(c.config_u32(0), 0);
    wait_for("activation", || d.backend.counters().activations == 1);
}

fn connect_raw(path: &PathBuf) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return s,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot connect: {e}");
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

#[test]
fn bad_memory_tables_are_refused_and_the_daemon_serves_again() {
    let d = start_daemon("memtable");
    let guest = Guest::new();
    // Two regions that overlap in guest physical addresses.
    {
        let fe = connect(&d.path);
        fe.set_owner().unwrap();
        let a = guest.region();
        let mut b = guest.region();
        b.guest_phys_addr = 0x10_0000;
        b.memory_size = 0x10_0000;
        let _ = fe.set_mem_table(&[a, b]);
        // The daemon refused the table and closed the connection.
        wait_for("the refusal", || fe.get_features().is_err());
    }
    wait_for("the log line", || logged("connection ended"));
    // A region of zero bytes, sent raw (vhost's frontend refuses to send one).
    {
        let raw = connect_raw(&d.path);
        let mut payload = Vec::new();
        payload.extend_from_slice(&1u32.to_le_bytes()); // num_regions
        payload.extend_from_slice(&0u32.to_le_bytes()); // padding
        for v in [0u64, 0, guest.host_base(), 0] {
            payload.extend_from_slice(&v.to_le_bytes());
        }
        send_raw(&raw, 5, &payload, &[guest.file.as_raw_fd()]);
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!((&raw).read(&mut buf).unwrap_or(0), 0, "connection closed");
    }
    // Vring addresses outside the memory the frontend shared.
    {
        let fe = connect(&d.path);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        fe.set_mem_table(&[guest.region()]).unwrap();
        fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        let outside = guest.host_base() + MEM_SIZE as u64 + 0x1000;
        let _ = fe.set_vring_addr(0, &ring_config(QUEUE_SIZE, outside, outside, outside));
        wait_for("the refusal", || fe.get_features().is_err());
    }
    assert_eq!(d.backend.counters().activations, 0);
    // And a good frontend afterwards.
    let mut c = Conn::open(&d.path, &guest, true);
    assert_eq!(c.config_u32(0), 0);
    wait_for("activation", || d.backend.counters().activations == 1);
}

#[test]
fn a_ring_that_does_not_fit_in_memory_is_not_activated() {
    let d = start_daemon("badring");
    let guest = Guest::new();
    let mut fe = connect(&d.path);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features).unwrap();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(proto).unwrap();
    fe.set_mem_table(&[guest.region()]).unwrap();
    // The used ring starts inside memory but runs past its end.
    let tail = guest.host_base() + MEM_SIZE as u64 - 0x100;
    let kicks: Vec<EventFd> = (0..4)
        .map(|i| set_up_vring(&mut fe, &guest, i, (i == 1).then_some(tail)).1)
        .collect();
    kicks[0].write(1).unwrap();
    wait_for("the refused activation", || {
        d.backend.counters().activation_errors > 0
    });
    assert!(logged("cannot activate"));
    assert_eq!(d.backend.counters().activations, 0);
    // Configuration reads still answer.
    let (_, data) = fe
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0u8; 8])
        .unwrap();
    assert_eq!(data, [0u8; 8]);
}

#[test]
fn a_frontend_that_leaves_mid_round_resets_the_device() {
    let d = start_daemon("midround");
    let guest = Guest::new();
    let hint = d.backend.hint_control();
    {
        let mut c = Conn::open(&d.path, &guest, true);
        assert_eq!(c.config_u32(0), 0);
        wait_for("activation", || d.backend.counters().activations == 1);
        let id = hint.start_round();
        assert_eq!(c.backend_request(), (2, 0));
        guest.mem.write_obj(id, GuestAddress(0x9000)).unwrap();
        c.post(FREE_PAGE, 0x9000, 4, 0);
        c.post(FREE_PAGE, 4 << 20, 4 << 20, VRING_DESC_F_WRITE);
        wait_for("the round to start", || {
            hint.status().state == HintState::Start
        });
        // The frontend goes away without ending the round.
    }
    wait_for("the reset", || d.backend.counters().resets == 1);
    assert_eq!(hint.status().state, HintState::Stop);
    assert!(!hint.status().round_complete);
    assert!(!d.backend.balloon().lock().unwrap().is_activated());
    wait_for("the log line", || logged("disconnected"));

    // A new frontend (a fresh ring) runs a whole round.
    let guest = Guest::new();
    let mut c = Conn::open(&d.path, &guest, true);
    assert_eq!(c.config_u32(0), 0);
    wait_for("activation", || d.backend.counters().activations == 2);
    let id = hint.start_round();
    assert_eq!(c.backend_request(), (2, 0));
    guest.mem.write_obj(id, GuestAddress(0x9000)).unwrap();
    guest.mem.write_obj(0u32, GuestAddress(0x9004)).unwrap();
    c.post(FREE_PAGE, 0x9000, 4, 0);
    c.post(FREE_PAGE, 8 << 20, 4 << 20, VRING_DESC_F_WRITE);
    c.post(FREE_PAGE, 0x9004, 4, 0);
    assert!(hint.wait_round_complete(Duration::from_secs(5)));
}

/// Sends one vhost-user message with attached descriptors, bypassing vhost's own checks.
fn send_raw(sock: &UnixStream, code: u32, payload: &[u8], fds: &[i32]) {
    let mut msg = Vec::with_capacity(12 + payload.len());
    msg.extend_from_slice(&code.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    msg.extend_from_slice(payload);
    send_with_fds(sock, &msg, fds).unwrap();
}

#[test]
fn out_of_order_messages_are_refused_and_the_daemon_serves_again() {
    let d = start_daemon("order");
    let guest = Guest::new();
    // A vring address before any memory table: nothing to translate it with.
    {
        let fe = connect(&d.path);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        fe.set_vring_num(0, QUEUE_SIZE).unwrap();
        let q = guest.queue(0);
        let base = guest.host_base();
        let _ = fe.set_vring_addr(
            0,
            &ring_config(
                QUEUE_SIZE,
                base + q.desc_table_addr().0,
                base + q.avail_addr().0,
                base + q.used_addr().0,
            ),
        );
        wait_for("the refusal", || fe.get_features().is_err());
    }
    assert_eq!(d.backend.counters().activations, 0);

    // Features changed after the device went live: refused, the device keeps its own.
    let mut c = Conn::open(&d.path, &guest, true);
    assert_eq!(c.config_u32(0), 0);
    wait_for("activation", || d.backend.counters().activations == 1);
    let negotiated = d.backend.balloon().lock().unwrap().driver_features();
    let fewer = c.fe.get_features().unwrap() & !(1 << 1);
    c.fe.set_features(fewer).unwrap();
    wait_for("the refused change", || {
        d.backend.counters().feature_errors == 1
    });
    assert!(logged("after the device was activated"));
    assert_eq!(
        d.backend.balloon().lock().unwrap().driver_features(),
        negotiated
    );
    // And the device still serves its queues.
    guest.mem.write_obj(0x200u32, GuestAddress(0x9000)).unwrap();
    c.post(INFLATE, 0x9000, 4, 0);
    wait_for("the inflate element", || c.used_idx(INFLATE) == 1);
}
