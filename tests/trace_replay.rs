// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays one free page hint round that the real Linux 6.1 driver posted to QEMU (captured
//! from guest memory, see `../shared/reference/traces/README.md`) into the device, over the
//! captured machine's memory layout, through the guest model's rings and registers.

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use common::*;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::HintState;
use vm_memory::GuestAddress;

/// A copy of `../shared/reference/traces/linux-6.1-hint-round-4g.txt`, kept in the repository
/// so the test runs on any clone.
const TRACE: &str = "tests/data/linux-6.1-hint-round-4g.txt";

/// One buffer the driver made available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    pos: u32,
    head: u16,
    addr: u64,
    len: u32,
    flags: u16,
}

#[derive(Debug)]
struct Trace {
    /// Guest RAM as merged from the `# mtree` lines: (start, length).
    ram: Vec<(GuestAddress, u64)>,
    /// `vring-num` of the free page queue.
    queue_size: u16,
    /// `avail idx` from the header.
    avail_idx: u32,
    /// Position 0's head was reused, so the start buffer is not in the capture.
    start_reused: bool,
    /// Positions 1.., in order.
    entries: Vec<Entry>,
}

fn parse_num(s: &str) -> u64 {
    let s = s.trim();
    let v = if let Some(hex) = s.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else {
        s.parse()
    };
    v.unwrap_or_else(|e| panic!("bad number {s:?} in the trace: {e}"))
}

fn load_trace() -> Trace {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(TRACE);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "the Linux trace {} is missing or unreadable ({e}); this test needs it and must \
             not be skipped",
            path.display()
        )
    });
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut queue_size = None;
    let mut avail_idx = None;
    let mut start_reused = false;
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# mtree ") {
            // "0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @..."
            let (span, kind) = rest.split_once(' ').expect("mtree line");
            if kind.contains(", ram)") || kind.contains(", rom)") {
                let (a, b) = span.split_once('-').expect("mtree range");
                let a = u64::from_str_radix(a, 16).expect("mtree start");
                let b = u64::from_str_radix(b, 16).expect("mtree end");
                ranges.push((a, b));
            }
            continue;
        }
        if let Some(rest) = line.strip_prefix("# guest ") {
            for part in rest.split(';') {
                let part = part.trim();
                if let Some(v) = part.strip_prefix("free page vq size ") {
                    queue_size = Some(parse_num(v) as u16);
                }
                if let Some(v) = part.strip_prefix("avail idx ") {
                    avail_idx = Some(parse_num(v) as u32);
                }
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.as_slice() {
            [pos, _head, "reused"] => {
                assert_eq!(
                    parse_num(pos),
                    0,
                    "line {}: only position 0 may be reused",
                    n + 1
                );
                start_reused = true;
            }
            [pos, head, addr, len, flags] => entries.push(Entry {
                pos: parse_num(pos) as u32,
                head: parse_num(head) as u16,
                addr: parse_num(addr),
                len: parse_num(len) as u32,
                flags: parse_num(flags) as u16,
            }),
            _ => panic!("line {}: cannot parse {line:?}", n + 1),
        }
    }
    // Merge the RAM/ROM ranges (inclusive ends) into regions.
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, end)) if a <= end.saturating_add(1) => *end = (*end).max(b),
            _ => merged.push((a, b)),
        }
    }
    Trace {
        ram: merged
            .into_iter()
            .map(|(a, b)| (GuestAddress(a), b - a + 1))
            .collect(),
        queue_size: queue_size.expect("free page vq size in the header"),
        avail_idx: avail_idx.expect("avail idx in the header"),
        start_reused,
        entries,
    }
}

struct Replay {
    trace: Trace,
    hints: Vec<Entry>,
    stop: Entry,
    start_slot: GuestAddress,
}

fn checked_trace() -> Replay {
    let trace = load_trace();
    assert_eq!(
        trace.ram,
        [
            (GuestAddress(0), 0xc000_0000),
            (GuestAddress(0x1_0000_0000), 0x4000_0000)
        ],
        "the trace's memory layout"
    );
    assert_eq!(trace.queue_size, 1024);
    assert!(
        trace.start_reused,
        "position 0 should be the (reused) start buffer"
    );
    assert_eq!(trace.entries.len() as u32 + 1, trace.avail_idx);
    for (i, e) in trace.entries.iter().enumerate() {
        assert_eq!(e.pos as usize, i + 1, "positions must be consecutive");
    }
    let (stop, hints) = trace.entries.split_last().expect("entries");
    assert_eq!(hints.len(), 980);
    for e in hints {
        assert_eq!((e.len, e.flags), (4 << 20, 2), "{e:?}");
        assert_eq!(e.addr % (4 << 20), 0, "{e:?}");
    }
    assert_eq!(
        (stop.len, stop.flags),
        (4, 0),
        "last entry is the STOP buffer"
    );
    let start_slot = GuestAddress(stop.addr - 4);
    Replay {
        hints: hints.to_vec(),
        stop: *stop,
        start_slot,
        trace,
    }
}

/// A 4 MiB-aligned block of RAM that holds none of the hinted blocks nor the command slots,
/// for the model's rings.
fn driver_area(r: &Replay) -> (GuestAddress, u64) {
    let hinted: BTreeSet<u64> = r.hints.iter().map(|e| e.addr).collect();
    let slot_block = r.stop.addr & !(HINT_BLOCK_BYTES - 1);
    for &(start, len) in &r.trace.ram {
        let mut b = start.0.max(HINT_BLOCK_BYTES);
        while b + HINT_BLOCK_BYTES <= start.0 + len {
            if !hinted.contains(&b) && b != slot_block {
                return (GuestAddress(b), HINT_BLOCK_BYTES);
            }
            b += HINT_BLOCK_BYTES;
        }
    }
    panic!("no unhinted block for the driver's rings");
}

fn harness(r: &Replay, sink: Arc<RecordingSink>) -> Harness {
    let mut cfg = HarnessConfig::simple(HINT_BLOCK_BYTES * 2, 0);
    cfg.regions = r.trace.ram.clone();
    cfg.balloon.free_page_queue_size = r.trace.queue_size;
    cfg.driver.driver_area = driver_area(r);
    cfg.driver.free_blocks = Vec::new();
    let h = Harness::new(cfg, sink);
    let q = h.driver.free_page_queue().unwrap();
    assert_eq!(h.driver.ring_layout(q).unwrap().size, r.trace.queue_size);
    h
}

/// Posts one buffer the way the driver does (reclaiming used buffers first), waiting for
/// used progress if the ring is full, then kicks.
fn post(h: &Harness, q: u16, part: Part) {
    loop {
        h.driver.reclaim(q).expect("reclaim");
        match h.driver.post(q, &[part], false) {
            Ok(_) => break,
            Err(DriverError::Ring(ring::RingError::NoSpace { .. })) => {
                let last = h.driver.last_used_idx(q).unwrap();
                h.driver.wait_used(q, last, 1).expect("used progress");
            }
            Err(e) => panic!("post {part:?}: {e}"),
        }
    }
    h.driver.kick(q).expect("kick");
}

/// Replays the captured round with `start_id` in the start buffer.
fn replay(h: &Harness, r: &Replay, start_id: u32) {
    let q = h.driver.free_page_queue().unwrap();
    h.driver.write_u32(r.start_slot, start_id).unwrap();
    post(h, q, Part::out(r.start_slot, 4));
    for e in &r.hints {
        post(
            h,
            q,
            Part {
                addr: GuestAddress(e.addr),
                len: e.len,
                writable: e.flags & ring::VRING_DESC_F_WRITE != 0,
            },
        );
    }
    h.driver
        .write_u32(GuestAddress(r.stop.addr), cmd::STOP)
        .unwrap();
    post(h, q, Part::out(GuestAddress(r.stop.addr), r.stop.len));
    h.driver
        .wait_all_used(q)
        .unwrap_or_else(|e| panic!("device did not consume the replay: {e}"));
}

fn expected_blocks(r: &Replay) -> BTreeSet<(u64, u64)> {
    r.hints.iter().map(|e| (e.addr, u64::from(e.len))).collect()
}

#[test]
fn linux_round_replays_to_exactly_its_blocks() {
    let r = checked_trace();
    let sink = Arc::new(RecordingSink::default());
    let h = harness(&r, sink.clone());

    let id = h.hints.start_round();
    // The guest learns the id the Linux way: config interrupt, then one config read.
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.cmd_id_received(), id);
    replay(&h, &r, id);

    let recs = sink.hints();
    assert_eq!(recs.len(), 980, "hints delivered");
    for rec in &recs {
        assert_eq!(rec.cmd_id, id, "{rec:?}");
        assert_eq!(rec.len, HINT_BLOCK_BYTES, "{rec:?}");
    }
    let got: BTreeSet<(u64, u64)> = recs.iter().map(|x| (x.gpa.0, x.len)).collect();
    assert_eq!(got, expected_blocks(&r));
    assert_eq!(sink.total_bytes(), 980 * HINT_BLOCK_BYTES);
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Stop, "{st:?}");
    assert_eq!(st.cmd_id, id);
    assert!(h.hints.wait_round_complete(DEADLINE));
    // Every element came back with used length 0 (nothing was written into the buffers).
    let q = h.driver.free_page_queue().unwrap();
    assert_eq!(h.driver.used_idx(q).unwrap(), 982);
    for pos in 0..982u16 {
        let (id, len) = h.driver.used_elem(q, pos).unwrap();
        assert_eq!(len, 0, "used[{pos}] (id {id}) has length {len}");
    }
    h.assert_clean();
}

#[test]
fn linux_round_under_a_stale_id_hints_nothing() {
    let r = checked_trace();
    let sink = Arc::new(RecordingSink::default());
    let h = harness(&r, sink.clone());

    let old = h.hints.start_round();
    h.hints.stop_round();
    let new = h.hints.start_round();
    assert_ne!(old, new);
    replay(&h, &r, old);
    assert!(
        sink.hints().is_empty(),
        "{} hints of a stale round reached the sink",
        sink.hints().len()
    );
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Requested, "{st:?}");
    assert_eq!(st.cmd_id, new);

    // The same round under the current id then counts, in full.
    replay(&h, &r, new);
    let recs = sink.hints();
    assert!(recs.iter().all(|x| x.cmd_id == new));
    let got: BTreeSet<(u64, u64)> = recs.iter().map(|x| (x.gpa.0, x.len)).collect();
    assert_eq!(recs.len(), 980);
    assert_eq!(got, expected_blocks(&r));
    assert_eq!(h.hints.status().state, HintState::Stop);
    h.assert_clean();
}
