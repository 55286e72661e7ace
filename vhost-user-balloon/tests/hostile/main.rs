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

#[path = "../vhost_frontend/mod.rs"]
mod vhost_frontend;
use vhost_frontend::{memfd, ring_config, send_with_fds};

mod child;
mod session;
use child::*;
use session::*;

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
    let mut d = Daemon::start_with("churn", Some(1024), &[]);
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

/// A connection the daemon cannot set up (here: its temporary directory is a file, so the
/// private directory of the connection cannot be made) is closed and logged, and the daemon
/// goes on with the next one.
#[test]
fn a_connection_that_cannot_be_set_up_does_not_wedge_the_daemon() {
    let not_a_dir = std::env::temp_dir().join(format!("vub-hostile-{}-file", std::process::id()));
    File::create(&not_a_dir).unwrap();
    let mut d = Daemon::start_with("no-tmpdir", None, &[("TMPDIR", &not_a_dir)]);
    for i in 1..=2 {
        let mut s = connect_stream(&d.socket).expect("connect");
        let mut buf = [0u8; 64];
        let r = s.read(&mut buf);
        d.assert_alive(&format!("after connection {i} could not be set up"));
        assert!(
            matches!(r, Ok(0)),
            "connection {i}, which the daemon cannot set up, was not closed within {T:?}: {r:?}"
        );
    }
    d.assert_status("after two connections that could not be set up");
    let failed = d.log_text().matches("a connection failed").count();
    std::fs::remove_file(&not_a_dir).unwrap();
    assert_eq!(failed, 2, "each failed connection is logged once");
}
