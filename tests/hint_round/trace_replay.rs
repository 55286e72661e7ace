// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Replays captured free page hint rounds into the device, over each capture's memory layout,
//! through the guest model's rings and registers.
//!
//! A capture (format: `tests/data/README.md`) lists the buffers of one round in the order the
//! driver made them available. The replay posts the same descriptors (address, length, flags)
//! in the same order through a ring of the captured queue size, in batches that never exceed
//! the ring: a round longer than the queue wraps the ring and reuses heads, as the real driver
//! did. It then checks that the device started and ended the round, returned every buffer
//! unwritten, and handed the sink exactly the writable ranges, rounded inward to pages and
//! clipped to RAM, in order.
//!
//! `tests/data/linux-6.1-hint-round-4g.txt` is a round the real Linux 6.1 driver posted to
//! QEMU's device in a 4 GiB guest, read back from guest memory after the round. Every `.txt`
//! file in `tests/data` is replayed by `every_capture_in_tests_data_replays`, so a capture
//! dropped there is tested without touching this file. The other tests build small synthetic
//! captures in code: a Linux-like driver posting through a small ring (heads reused last in,
//! first out), `reused` lines, a `# cmd_id` header.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;

use guest_model::trace::{Capture, Entry, Line, Plan, FIRST_ROUND_ID};
use guest_model::*;
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::sink::{RecordedHint, RecordingSink};
use virtio_balloon::{HintMetrics, HintState};
use vm_memory::GuestAddress;

/// The Linux capture, kept in the repository so the test runs on any clone.
const LINUX_CAPTURE: &str = "linux-6.1-hint-round-4g.txt";

/// Descriptor flag: device-writable.
const F_WRITE: u16 = ring::VRING_DESC_F_WRITE;

/// How many rounds the replay may start to bring a fresh device to a capture's `# cmd_id`.
const MAX_ROUNDS_TO_CMD_ID: u32 = 1 << 16;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.checked_add(a - 1).map(|x| x & !(a - 1))
}

fn align_down(v: u64, a: u64) -> u64 {
    v & !(a - 1)
}

/// What the sink must receive for `hints` over guest memory `regions` (ascending): each
/// descriptor's range rounded inward to pages, cut at region boundaries, outside RAM dropped.
/// Also the number of hints that deliver anything.
fn expected_pieces(hints: &[Entry], regions: &[(GuestAddress, u64)]) -> (Vec<(u64, u64)>, u64) {
    let mut pieces = Vec::new();
    let mut accepted = 0;
    for e in hints {
        let Some(end) = e.addr.checked_add(u64::from(e.len)) else {
            continue;
        };
        let (Some(s), end) = (align_up(e.addr, PAGE_SIZE), align_down(end, PAGE_SIZE)) else {
            continue;
        };
        let before = pieces.len();
        for &(r, len) in regions {
            let lo = align_up(s.max(r.0), PAGE_SIZE).unwrap_or(u64::MAX);
            let hi = align_down(end.min(r.0 + len), PAGE_SIZE);
            if lo < hi {
                pieces.push((lo, hi - lo));
            }
        }
        accepted += u64::from(pieces.len() > before);
    }
    (pieces, accepted)
}

// ------------------------------------------------------------------------------------------
// Driving the device.

/// A 4 MiB-aligned 4 MiB block of RAM (above the first 4 MiB) that overlaps nothing the
/// replay hints or writes, for the model's rings and command slots.
fn free_block(ram: &[(GuestAddress, u64)], busy: &[(u64, u64)]) -> Option<GuestAddress> {
    for &(start, len) in ram {
        let end = start.0 + len;
        let mut b = align_up(start.0.max(HINT_BLOCK_BYTES), HINT_BLOCK_BYTES)?;
        while b + HINT_BLOCK_BYTES <= end {
            let b_end = b + HINT_BLOCK_BYTES;
            if busy.iter().all(|&(s, e)| e <= b || s >= b_end) {
                return Some(GuestAddress(b));
            }
            b = b_end;
        }
    }
    None
}

/// The harness for a capture: its RAM, its queue size, the model's own memory in a free
/// block of RAM (or, if the round hints all of it, in an extra region above everything).
/// Returns the harness and its memory regions.
fn harness(
    cap: &Capture,
    plan: &Plan,
    sink: Arc<RecordingSink>,
) -> (Harness, Vec<(GuestAddress, u64)>) {
    let busy = plan.busy();
    let mut regions = cap.ram.clone();
    let area = free_block(&regions, &busy).unwrap_or_else(|| {
        let top = regions
            .iter()
            .map(|&(s, l)| s.0 + l)
            .chain(busy.iter().map(|&(_, e)| e))
            .max()
            .unwrap_or(0);
        let base = align_up(top, 1 << 30).expect("room above the capture's memory");
        regions.push((GuestAddress(base), HINT_BLOCK_BYTES));
        GuestAddress(base)
    });
    let mut cfg = HarnessConfig::simple(HINT_BLOCK_BYTES * 2, 0);
    cfg.regions = regions.clone();
    cfg.balloon.free_page_queue_size = cap.queue_size;
    cfg.driver.driver_area = (area, HINT_BLOCK_BYTES);
    cfg.driver.free_blocks = Vec::new();
    let h = Harness::new(cfg, sink);
    let q = h.driver.free_page_queue().unwrap();
    assert_eq!(
        h.driver.ring_layout(q).unwrap().size,
        cap.queue_size,
        "{}: the free page queue's size",
        cap.name
    );
    (h, regions)
}

/// Starts a round whose id is `want` (a fresh device numbers rounds from 2, one per
/// `start_round`), or the next round if `want` is `None`. Returns the id.
fn start_round_at(h: &Harness, want: Option<u32>) -> u32 {
    let Some(want) = want else {
        return h.hints.start_round();
    };
    for _ in 0..MAX_ROUNDS_TO_CMD_ID {
        let id = h.hints.start_round();
        if id == want {
            return id;
        }
        assert!(
            id < want,
            "the device's round id {id} is already past the capture's cmd_id {want}"
        );
    }
    panic!(
        "cmd_id {want} is more than {MAX_ROUNDS_TO_CMD_ID} rounds from the device's first id \
         {FIRST_ROUND_ID}: a capture's cmd_id must be one this crate's device hands out"
    );
}

/// What one replay did.
#[derive(Debug)]
struct Replayed {
    /// Buffers made available (start and STOP included).
    posted: usize,
    /// The head each buffer got, in order.
    heads: Vec<u16>,
    /// The ring's avail index before and after.
    avail_from: u16,
    avail_to: u16,
    /// Most buffers outstanding at once.
    max_outstanding: u16,
    /// Batches made available.
    batches: usize,
}

#[derive(Clone, Copy)]
enum Buf<'a> {
    Start,
    Hint(&'a Entry),
    Stop,
}

fn overlap(a: (GuestAddress, u32), b: (GuestAddress, u32)) -> bool {
    let (a0, a1) = (a.0 .0, a.0 .0 + u64::from(a.1));
    let (b0, b1) = (b.0 .0, b.0 .0 + u64::from(b.1));
    a0 < b1 && b0 < a1
}

/// Replays `plan` with `start_id` in the start buffer: makes up to `batch` buffers (default:
/// the queue size) available at a time, kicks, waits until the device has returned them all
/// and reclaims them (each must come back with used length 0) before the next batch. Heads
/// come from the model's free list, reused last in, first out as Linux does.
fn replay(h: &Harness, plan: &Plan, start_id: u32, batch: Option<u16>) -> Replayed {
    let q = h.driver.free_page_queue().unwrap();
    let size = h.driver.ring_layout(q).unwrap().size;
    let batch = usize::from(batch.unwrap_or(size).clamp(1, size));
    let start = (
        plan.start
            .slot
            .unwrap_or_else(|| h.driver.cmd_id_active_slot()),
        plan.start.len,
    );
    let stop = (
        plan.stop
            .slot
            .unwrap_or_else(|| h.driver.cmd_id_stop_slot()),
        plan.stop.len,
    );
    let bufs: Vec<Buf> = std::iter::once(Buf::Start)
        .chain(plan.hints.iter().map(Buf::Hint))
        .chain(std::iter::once(Buf::Stop))
        .collect();
    let avail_from = h.driver.avail_idx(q).unwrap();
    let mut heads = Vec::with_capacity(bufs.len());
    let mut max_outstanding = 0;
    let mut batches = 0;
    let mut next = 0;
    while next < bufs.len() {
        // Everything made available so far has come back.
        assert_eq!(h.driver.num_free(q).unwrap(), size, "{}", h.driver.diag(q));
        let mut in_batch = 0;
        let mut start_in_batch = false;
        while next < bufs.len() && in_batch < batch {
            let part = match bufs[next] {
                Buf::Start => {
                    h.driver.write_u32(start.0, start_id).unwrap_or_else(|e| {
                        panic!("start slot {:#x}: {e}", start.0 .0);
                    });
                    start_in_batch = true;
                    Part::out(start.0, start.1)
                }
                Buf::Hint(e) => Part {
                    addr: GuestAddress(e.addr),
                    len: e.len,
                    writable: e.flags & F_WRITE != 0,
                },
                Buf::Stop => {
                    if start_in_batch && overlap(start, stop) {
                        // The STOP would overwrite an id the device has not read yet.
                        break;
                    }
                    h.driver
                        .write_u32(stop.0, cmd::STOP)
                        .unwrap_or_else(|e| panic!("stop slot {:#x}: {e}", stop.0 .0));
                    Part::out(stop.0, stop.1)
                }
            };
            let head = h
                .driver
                .post(q, &[part], false)
                .unwrap_or_else(|e| panic!("post {part:?}: {e}; {}", h.driver.diag(q)));
            heads.push(head);
            next += 1;
            in_batch += 1;
        }
        let outstanding = h
            .driver
            .avail_idx(q)
            .unwrap()
            .wrapping_sub(h.driver.last_used_idx(q).unwrap());
        assert!(outstanding <= size, "{outstanding} buffers outstanding");
        max_outstanding = max_outstanding.max(outstanding);
        h.driver.kick(q).expect("kick");
        h.driver
            .wait_all_used(q)
            .unwrap_or_else(|e| panic!("the device did not consume the batch: {e}"));
        let used = h.driver.reclaim(q).expect("reclaim");
        assert_eq!(used.len(), in_batch, "buffers returned by the batch");
        for u in &used {
            // Nothing is written into hint or command buffers.
            assert_eq!(
                u.len, 0,
                "head {} came back with used length {}",
                u.head, u.len
            );
        }
        batches += 1;
    }
    let avail_to = h.driver.avail_idx(q).unwrap();
    assert_eq!(
        usize::from(avail_to.wrapping_sub(avail_from)),
        bufs.len() % 0x1_0000
    );
    assert_eq!(h.driver.used_idx(q).unwrap(), avail_to);
    Replayed {
        posted: bufs.len(),
        heads,
        avail_from,
        avail_to,
        max_outstanding,
        batches,
    }
}

fn pieces(recs: &[RecordedHint]) -> Vec<(u64, u64)> {
    recs.iter().map(|r| (r.gpa.0, r.len)).collect()
}

/// `after - before` for the counters the replay checks.
fn delta(before: &HintMetrics, after: &HintMetrics) -> HintMetrics {
    {
        let mut m = HintMetrics::default();
        m.elements = after.elements - before.elements;
        m.malformed_elements = after.malformed_elements - before.malformed_elements;
        m.rounds_started = after.rounds_started - before.rounds_started;
        m.rounds_stopped_by_guest = after.rounds_stopped_by_guest - before.rounds_stopped_by_guest;
        m.stale_commands = after.stale_commands - before.stale_commands;
        m.hints_accepted = after.hints_accepted - before.hints_accepted;
        m.bytes_accepted = after.bytes_accepted - before.bytes_accepted;
        m.hints_wrong_state = after.hints_wrong_state - before.hints_wrong_state;
        m
    }
}

/// One capture replayed into a fresh device under the capture's id, checked.
struct Checked {
    cap: Capture,
    plan: Plan,
    h: Harness,
    sink: Arc<RecordingSink>,
    id: u32,
    replayed: Replayed,
    /// What the sink had to receive, in order.
    expected: Vec<(u64, u64)>,
}

/// Replays `cap` into a fresh device the way a migration meets a guest: the device starts a
/// round (the capture's `# cmd_id` if it has one), the guest reads the id after the config
/// interrupt, the round is replayed under it. Asserts that the device started and ended the
/// round, returned every buffer with used length 0, handed the sink exactly the expected
/// pieces in order under that id, and counted it all.
fn replay_capture(cap: Capture, batch: Option<u16>) -> Checked {
    let plan = Plan::new(&cap).unwrap_or_else(|e| panic!("{e}"));
    let sink = Arc::new(RecordingSink::default());
    let (h, regions) = harness(&cap, &plan, sink.clone());
    let (expected, accepted) = expected_pieces(&plan.hints, &regions);
    let before = h.hints.status().metrics;

    let id = start_round_at(&h, cap.cmd_id);
    // The guest learns the id the Linux way: config interrupt, then one config read.
    h.driver.wait_config_change().unwrap();
    assert_eq!(h.driver.cmd_id_received(), id, "{}", cap.name);
    let replayed = replay(&h, &plan, id, batch);

    let recs = sink.hints();
    for rec in &recs {
        assert_eq!(rec.cmd_id, id, "{}: {rec:?}", cap.name);
    }
    assert_eq!(
        pieces(&recs),
        expected,
        "{}: what the sink received",
        cap.name
    );
    let bytes: u64 = expected.iter().map(|p| p.1).sum();
    assert_eq!(sink.total_bytes(), bytes, "{}", cap.name);
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Stop, "{}: {st:?}", cap.name);
    assert_eq!(st.cmd_id, id, "{}", cap.name);
    assert!(st.round_complete, "{}: {st:?}", cap.name);
    assert!(h.hints.wait_round_complete(DEADLINE), "{}", cap.name);
    let d = delta(&before, &st.metrics);
    assert_eq!(
        d,
        {
            let mut m = HintMetrics::default();
            m.elements = replayed.posted as u64;
            m.rounds_started = 1;
            m.rounds_stopped_by_guest = 1;
            m.hints_accepted = accepted;
            m.bytes_accepted = bytes;
            m
        },
        "{}: the device's counters",
        cap.name
    );
    h.assert_clean();
    Checked {
        cap,
        plan,
        h,
        sink,
        id,
        replayed,
        expected,
    }
}

/// Replays `cap` under a stale id (the device moved on to the next round): nothing may reach
/// the sink and the device keeps waiting for the current id. Then the same round under the
/// current id counts, in full.
fn replay_stale_then_current(cap: &Capture) {
    let plan = Plan::new(cap).unwrap_or_else(|e| panic!("{e}"));
    let sink = Arc::new(RecordingSink::default());
    let (h, regions) = harness(cap, &plan, sink.clone());
    let (expected, _) = expected_pieces(&plan.hints, &regions);

    let old = start_round_at(&h, cap.cmd_id);
    h.hints.stop_round();
    let new = h.hints.start_round();
    assert_ne!(old, new);
    replay(&h, &plan, old, None);
    assert!(
        sink.hints().is_empty(),
        "{}: {} hints of a stale round reached the sink",
        cap.name,
        sink.hints().len()
    );
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Requested, "{}: {st:?}", cap.name);
    assert_eq!(st.cmd_id, new);
    assert_eq!(
        st.metrics.hints_wrong_state,
        plan.hints.len() as u64,
        "{}: every hint of the stale round was refused",
        cap.name
    );

    replay(&h, &plan, new, None);
    let recs = sink.hints();
    assert!(recs.iter().all(|x| x.cmd_id == new), "{}", cap.name);
    assert_eq!(pieces(&recs), expected, "{}", cap.name);
    let st = h.hints.status();
    assert_eq!(st.state, HintState::Stop, "{}: {st:?}", cap.name);
    assert!(st.round_complete, "{}", cap.name);
    h.assert_clean();
}

// ------------------------------------------------------------------------------------------
// The Linux capture.

/// The Linux capture, with the checks that pin down what it is.
fn linux_capture() -> Capture {
    let cap = Capture::load(&data_dir().join(LINUX_CAPTURE));
    assert_eq!(
        cap.ram,
        [
            (GuestAddress(0), 0xc000_0000),
            (GuestAddress(0x1_0000_0000), 0x4000_0000)
        ],
        "the capture's memory layout"
    );
    assert_eq!(cap.queue_size, 1024);
    assert_eq!(cap.avail_idx, 982);
    assert_eq!(cap.cmd_id, None);
    assert_eq!(cap.lines.len(), 982);
    assert_eq!(cap.lines[0], Line::Reused { pos: 0, head: 0 });
    assert_eq!(cap.reused(), 1, "only the start buffer's head was reused");
    let plan = Plan::new(&cap).unwrap();
    assert!(
        !plan.start.captured,
        "position 0 is the (reused) start buffer"
    );
    assert!(plan.stop.captured);
    assert_eq!(plan.skipped, 0);
    assert_eq!(plan.hints.len(), 980);
    for e in &plan.hints {
        assert_eq!((e.len, e.flags), (4 << 20, F_WRITE), "{e:?}");
        assert_eq!(e.addr % (4 << 20), 0, "{e:?}");
    }
    let Some(Line::Desc(stop)) = cap.lines.last() else {
        panic!("the last position is the STOP buffer");
    };
    assert_eq!((stop.len, stop.flags), (4, 0), "the STOP buffer");
    // Linux keeps the start id 4 bytes below the STOP slot.
    assert_eq!(plan.start.slot, Some(GuestAddress(stop.addr - 4)));
    cap
}

#[test]
fn linux_round_replays_to_exactly_its_blocks() {
    let c = replay_capture(linux_capture(), None);
    let recs = c.sink.hints();
    assert_eq!(recs.len(), 980, "hints delivered");
    for rec in &recs {
        assert_eq!(rec.len, HINT_BLOCK_BYTES, "{rec:?}");
    }
    let got: BTreeSet<(u64, u64)> = pieces(&recs).into_iter().collect();
    let blocks: BTreeSet<(u64, u64)> = c
        .plan
        .hints
        .iter()
        .map(|e| (e.addr, u64::from(e.len)))
        .collect();
    assert_eq!(got, blocks);
    assert_eq!(c.sink.total_bytes(), 980 * HINT_BLOCK_BYTES);
    // One batch: the round fits the ring, so every used element is still there, each with
    // length 0 (nothing was written into the buffers).
    assert_eq!(c.replayed.batches, 1);
    let q = c.h.driver.free_page_queue().unwrap();
    assert_eq!(c.h.driver.used_idx(q).unwrap(), 982);
    for pos in 0..982u16 {
        let (id, len) = c.h.driver.used_elem(q, pos).unwrap();
        assert_eq!(len, 0, "used[{pos}] (id {id}) has length {len}");
    }
}

#[test]
fn linux_round_under_a_stale_id_hints_nothing() {
    replay_stale_then_current(&linux_capture());
}

// ------------------------------------------------------------------------------------------
// Every capture in tests/data.

#[test]
fn every_capture_in_tests_data_replays() {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(data_dir())
        .expect("tests/data")
        .map(|e| e.expect("tests/data entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    paths.sort();
    assert!(
        paths.iter().any(|p| p.ends_with(LINUX_CAPTURE)),
        "the Linux capture is among {paths:?}"
    );
    for path in &paths {
        let c = replay_capture(Capture::load(path), None);
        assert_eq!(c.sink.hints().len(), c.expected.len());
        println!(
            "{}: queue size {}, {} positions, {} reused ({} skipped), {} hints, {} pieces, \
             {} batches, round id {}",
            c.cap.name,
            c.cap.queue_size,
            c.cap.lines.len(),
            c.plan.reused,
            c.plan.skipped,
            c.plan.hints.len(),
            c.expected.len(),
            c.replayed.batches,
            c.id
        );
        replay_stale_then_current(&c.cap);
    }
}

// ------------------------------------------------------------------------------------------
// Synthetic captures.

/// Guest RAM of the synthetic captures: 0–96 MiB and 128–192 MiB, a hole in between.
const SYNTH_RAM: [(u64, u64); 2] = [(0, 96 * MIB), (128 * MIB, 64 * MIB)];

/// Where the synthetic driver keeps its start id (the STOP id is 4 bytes above).
const SYNTH_SLOTS: u64 = 0x20_0040;

/// A capture of one round as a Linux-like driver posts it through a ring of `size`
/// descriptors: heads from a free list that starts 0, 1, 2, ... and takes reclaimed heads
/// back at its front (so they are reused last in, first out); a hint only while two
/// descriptors are free (one stays for the STOP). The device returns everything outstanding,
/// in order, whenever the driver finds the ring full and after every `device_every` buffers.
#[derive(Clone, Debug)]
struct Synth {
    size: u16,
    hints: Vec<(u64, u32)>,
    cmd_id: Option<u32>,
    first_pos: u16,
    device_every: usize,
}

impl Synth {
    fn new(size: u16, hints: Vec<(u64, u32)>) -> Self {
        Synth {
            size,
            hints,
            cmd_id: None,
            first_pos: 0,
            device_every: 5,
        }
    }

    fn lines(&self) -> Vec<Line> {
        let mut free: Vec<u16> = (0..self.size).rev().collect();
        let mut outstanding: VecDeque<u16> = VecDeque::new();
        let bufs = std::iter::once((SYNTH_SLOTS, 4, 0))
            .chain(self.hints.iter().map(|&(a, l)| (a, l, F_WRITE)))
            .chain(std::iter::once((SYNTH_SLOTS + 4, 4, 0)));
        let mut lines = Vec::new();
        for (k, (addr, len, flags)) in bufs.enumerate() {
            let needed = if flags & F_WRITE != 0 { 2 } else { 1 };
            if free.len() < needed || (k > 0 && k % self.device_every == 0) {
                // The device returns them in order; each reclaimed head goes to the front.
                free.extend(outstanding.drain(..));
            }
            let head = free.pop().expect("a free head after the device caught up");
            outstanding.push_back(head);
            lines.push(Line::Desc(Entry {
                pos: self.first_pos.wrapping_add(k as u16),
                head,
                addr,
                len,
                flags,
            }));
        }
        lines
    }

    fn render(&self, what: &str, lines: &[Line]) -> String {
        let end = self.first_pos.wrapping_add(lines.len() as u16);
        let mut s = format!(
            "# synthetic: {what}; free page vq size {}; avail idx {end}\n",
            self.size
        );
        if let Some(id) = self.cmd_id {
            writeln!(s, "# cmd_id {id}").unwrap();
        }
        for (start, len) in SYNTH_RAM {
            writeln!(
                s,
                "# mtree {start:016x}-{:016x} (prio 0, ram): synthetic.ram",
                start + len - 1
            )
            .unwrap();
        }
        for l in lines {
            match *l {
                Line::Desc(e) => writeln!(
                    s,
                    "{} {} {:#x} {} {}",
                    e.pos, e.head, e.addr, e.len, e.flags
                ),
                Line::Reused { pos, head } => writeln!(s, "{pos} {head} reused"),
            }
            .unwrap();
        }
        s
    }

    /// The capture, with the positions at `reused` (indexes into the lines) shown `reused`.
    fn capture(&self, what: &str, reused: &[usize]) -> Capture {
        let mut lines = self.lines();
        for &i in reused {
            lines[i] = Line::Reused {
                pos: lines[i].pos(),
                head: lines[i].head(),
            };
        }
        Capture::parse(what, &self.render(what, &lines)).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// `n` 4 MiB blocks from the top of RAM down, as Linux hands them out, leaving 0–12 MiB
/// alone; then two odd hints: one that runs into the hole past 96 MiB (only its first 2 MiB
/// are RAM) and one of 8 KiB that is not page aligned (one whole page inside).
fn synth_hints(n: usize) -> Vec<(u64, u32)> {
    let blocks = (0..16u64)
        .rev()
        .map(|i| 128 * MIB + 4 * MIB * i)
        .chain((3..23u64).rev().map(|i| 4 * MIB * i));
    let mut hints: Vec<(u64, u32)> = blocks.take(n).map(|b| (b, 4 << 20)).collect();
    assert_eq!(hints.len(), n, "at most 36 blocks");
    hints.insert(n.min(3), (94 * MIB, 4 << 20));
    hints.insert(n.min(7), (8 * MIB + 0x800, 0x2000));
    hints
}

#[test]
fn wrapped_round_with_heads_reused_lifo_replays_in_order() {
    let synth = Synth::new(8, synth_hints(30));
    let cap = synth.capture("wrap-q8", &[]);
    // The capture itself: positions run past the queue size and heads come back, last in
    // first out (the head returned last is the next one posted).
    assert_eq!(cap.lines.len(), 34);
    assert!(cap.lines.iter().any(|l| l.pos() >= 8));
    let heads: Vec<u16> = cap.lines.iter().map(Line::head).collect();
    assert_eq!(&heads[..5], &[0, 1, 2, 3, 4], "a fresh free list");
    assert_eq!(heads[5], 4, "the head returned last is reused first");
    assert!(heads.iter().all(|&h| h < 8));

    for batch in [None, Some(3), Some(1)] {
        let c = replay_capture(cap.clone(), batch);
        let r = &c.replayed;
        assert_eq!(r.posted, 34);
        assert_eq!((r.avail_from, r.avail_to), (0, 34), "the ring wrapped");
        let per_batch = usize::from(batch.unwrap_or(8));
        assert_eq!(r.batches, 34usize.div_ceil(per_batch), "batch {batch:?}");
        assert_eq!(usize::from(r.max_outstanding), per_batch.min(34));
        let distinct: BTreeSet<u16> = r.heads.iter().copied().collect();
        assert!(distinct.len() <= 8 && distinct.len() < r.heads.len());
        // 30 blocks, the block running into the hole clipped to its RAM half, the odd one
        // rounded inward to its one whole page: in the order posted.
        assert_eq!(c.expected.len(), 32);
        assert_eq!(c.expected[3], (94 * MIB, 2 * MIB));
        assert_eq!(c.expected[7], (8 * MIB + 0x1000, 0x1000));
        assert_eq!(pieces(&c.sink.hints()), c.expected);
    }
    replay_stale_then_current(&cap);
}

#[test]
fn positions_wrap_the_u16_counter() {
    let mut synth = Synth::new(4, synth_hints(10));
    synth.first_pos = 0xfffa;
    let cap = synth.capture("u16-wrap-q4", &[]);
    assert_eq!(cap.lines[0].pos(), 0xfffa);
    assert_eq!(cap.avail_idx, 8, "14 positions from 0xfffa end at 8");
    let c = replay_capture(cap, None);
    assert_eq!(c.replayed.posted, 14);
    assert_eq!(c.sink.hints().len(), 12);
    assert_eq!(pieces(&c.sink.hints()), c.expected);
}

#[test]
fn reused_lines_mid_round_are_skipped_and_counted() {
    let synth = Synth::new(16, synth_hints(10));
    let all = synth.capture("no-reused", &[]);
    let all_plan = Plan::new(&all).unwrap();
    assert_eq!(all_plan.hints.len(), 12);

    // The start buffer and positions 3 and 8 reused, as a read back from guest memory shows
    // descriptors the driver overwrote.
    let cap = synth.capture("reused-mid", &[0, 3, 8]);
    let c = replay_capture(cap, None);
    assert_eq!((c.plan.reused, c.plan.skipped), (3, 2));
    assert!(!c.plan.start.captured);
    // Linux's start id sits right below the STOP id.
    assert_eq!(c.plan.start.slot, Some(GuestAddress(SYNTH_SLOTS)));
    let kept: Vec<Entry> = all_plan
        .hints
        .iter()
        .enumerate()
        .filter(|&(i, _)| i + 1 != 3 && i + 1 != 8)
        .map(|(_, e)| *e)
        .collect();
    assert_eq!(c.plan.hints, kept, "the other hints, in order");
    assert_eq!(c.replayed.posted, 1 + 10 + 1);
    assert_eq!(c.sink.hints().len(), 10);

    // A reused STOP is rebuilt above the captured start id.
    let cap = synth.capture("reused-stop", &[5, 13]);
    assert_eq!(cap.lines.len(), 14);
    let c = replay_capture(cap, None);
    assert_eq!((c.plan.reused, c.plan.skipped), (2, 1));
    assert!(c.plan.start.captured && !c.plan.stop.captured);
    assert_eq!(c.plan.stop.slot, Some(GuestAddress(SYNTH_SLOTS + 4)));
    assert_eq!(c.sink.hints().len(), 11);
    assert_eq!(
        c.h.driver.read_u32(GuestAddress(SYNTH_SLOTS + 4)).unwrap(),
        cmd::STOP
    );

    // Neither command captured: the model's own slots carry them.
    let cap = synth.capture("reused-both", &[0, 13]);
    let c = replay_capture(cap, None);
    assert_eq!((c.plan.start.slot, c.plan.stop.slot), (None, None));
    assert_eq!(c.sink.hints().len(), 12);
}

#[test]
fn cmd_id_header_is_used_for_the_start_buffer() {
    let mut synth = Synth::new(16, synth_hints(6));
    synth.cmd_id = Some(5);
    let cap = synth.capture("cmd-id", &[]);
    assert_eq!(cap.cmd_id, Some(5));
    let c = replay_capture(cap.clone(), None);
    assert_eq!(c.id, 5);
    assert!(c.plan.start.captured);
    // The captured start buffer carried the captured id to the device.
    assert_eq!(c.h.driver.read_u32(GuestAddress(SYNTH_SLOTS)).unwrap(), 5);
    assert_eq!(c.h.hints.status().cmd_id, 5);
    let recs = c.sink.hints();
    assert_eq!(recs.len(), 8);
    assert!(recs.iter().all(|r| r.cmd_id == 5));
    // Under a stale id (the device moved on to 6) nothing counts.
    replay_stale_then_current(&cap);

    // Without the header the round runs under the device's next id, as before.
    synth.cmd_id = None;
    let c = replay_capture(synth.capture("no-cmd-id", &[]), None);
    assert_eq!(c.id, FIRST_ROUND_ID);
    assert!(c.sink.hints().iter().all(|r| r.cmd_id == FIRST_ROUND_ID));
}

#[test]
fn malformed_captures_are_refused_with_a_reason() {
    let synth = Synth::new(8, synth_hints(4));
    let good = synth.render("good", &synth.lines());
    assert!(Capture::parse("good", &good).is_ok());
    let refused = |text: &str, why: &str| {
        let e = Capture::parse("bad", text)
            .and_then(|c| Plan::new(&c))
            .expect_err(why);
        assert!(e.contains(why), "{e:?} should say {why:?}");
    };
    refused(&good.replace("\n3 ", "\n4 "), "consecutive");
    refused(
        &good.replace("vq size 8", "vq size 2"),
        "not below the queue size",
    );
    refused(&good.replace("avail idx 8", "avail idx 9"), "avail idx 9");
    refused(&format!("{good}# cmd_id 1\n"), "not a round id");
    let no_ram: String = good
        .lines()
        .filter(|l| !l.starts_with("# mtree"))
        .map(|l| format!("{l}\n"))
        .collect();
    refused(&no_ram, "no RAM");
    let mut lines = synth.lines();
    let Line::Desc(e) = &mut lines[2] else {
        unreachable!()
    };
    e.flags = 0;
    e.len = 4;
    refused(&synth.render("cmd", &lines), "in the middle of the round");
    let Line::Desc(e) = &mut lines[2] else {
        unreachable!()
    };
    e.flags = F_WRITE | ring::VRING_DESC_F_NEXT;
    e.len = 4 << 20;
    refused(&synth.render("chain", &lines), "cannot be replayed");
    let hints_only: Vec<Line> = synth.lines()[1..5].to_vec();
    let mut s = synth.clone();
    s.first_pos = 1;
    refused(&s.render("no start", &hints_only), "start buffer");
}
