// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon's hint sink: counts free page hints per round and, if asked, captures the
//! elements of the free page queue so a real round can be replayed.
//!
//! [`HintCounter`] counts the hints and bytes of the latest round and in total. A capturing
//! counter ([`HintCounter::capturing`]) also records every element the driver posts on the
//! free page queue and writes the most recent round with
//! [`write_capture`](HintCounter::write_capture) in the format of the crate's `tests/data/`:
//!
//! ```text
//! # guest <description>; free page vq size N; avail idx M
//! # cmd_id N
//! # mtree 0000000000000000-000000003fffffff (prio 0, ram): vhost-user.ram
//! 0 0 0x1001da908 4 0
//! 1 1 0x13b400000 4194304 2
//! ...
//! ```
//!
//! One line per element: its position counted from 0 at the round's start buffer (monotonic,
//! across wraps of the 16-bit ring index), its head, the head descriptor's address, length and
//! flags. `avail idx` is the last position plus one.
//!
//! A round is found from the hints: the first hint with a new `cmd_id` belongs to a round
//! whose start buffer is the last device-readable element posted before it. The round ends
//! at the next device-readable element (the guest's STOP). At most
//! [`DEFAULT_MAX_ELEMENTS`] elements (or the limit given) are kept per round; later ones
//! are counted as dropped and the capture says so.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;
use virtio_balloon::sink::{FreePageElement, FreePageSink};
use vm_memory::GuestAddress;

/// The default cap on the elements kept for one round (2^20 elements, 24 MiB).
pub const DEFAULT_MAX_ELEMENTS: usize = 1 << 20;

/// The most elements kept between a readable element (a possible start buffer) and the
/// first hint of its round.
const MAX_LEAD_IN: usize = 1024;

/// `VRING_DESC_F_WRITE`.
const DESC_F_WRITE: u16 = 2;

/// The counters of a [`HintCounter`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HintCounts {
    /// The id of the latest round that delivered a hint.
    pub round: Option<u32>,
    /// Hints (ranges) of that round.
    pub round_hints: u64,
    /// Bytes of that round.
    pub round_bytes: u64,
    /// Rounds that delivered at least one hint.
    pub rounds: u64,
    /// Hints in total.
    pub total_hints: u64,
    /// Bytes in total.
    pub total_bytes: u64,
    /// Whether elements are captured.
    pub capturing: bool,
    /// Elements kept for the capture of the latest round.
    pub captured_elements: u64,
    /// Elements of the latest round not kept (over the cap).
    pub dropped_elements: u64,
}

#[derive(Debug, Default)]
struct State {
    counts: HintCounts,
    /// The captured round: its start buffer and every element after it.
    elements: Vec<FreePageElement>,
    /// The last readable element and the ones after it, until a round claims them.
    lead_in: Vec<FreePageElement>,
}

/// The daemon's [`FreePageSink`]: counts hints per round, and captures elements if built
/// with [`capturing`](Self::capturing).
#[derive(Debug)]
pub struct HintCounter {
    state: Mutex<State>,
    capture: bool,
    max_elements: usize,
}

impl Default for HintCounter {
    fn default() -> Self {
        Self::new()
    }
}

impl HintCounter {
    /// A counter that does not capture elements.
    pub fn new() -> Self {
        HintCounter {
            state: Mutex::new(State::default()),
            capture: false,
            max_elements: 0,
        }
    }

    /// A counter that also captures up to `max_elements` elements of the latest round
    /// (at least 1; [`DEFAULT_MAX_ELEMENTS`] is a good choice).
    pub fn capturing(max_elements: usize) -> Self {
        let state = State {
            counts: HintCounts {
                capturing: true,
                ..HintCounts::default()
            },
            ..State::default()
        };
        HintCounter {
            state: Mutex::new(state),
            capture: true,
            max_elements: max_elements.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every field is valid on its own: keep going after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The counters.
    pub fn snapshot(&self) -> HintCounts {
        self.lock().counts
    }

    /// The elements of the latest round as they will be written: from its start buffer up to
    /// and including the guest's STOP (or everything recorded if the round is still
    /// running), with their monotonic positions. Empty if no round was captured.
    pub fn round_elements(&self) -> (Option<u32>, Vec<(u64, FreePageElement)>) {
        let g = self.lock();
        let round = g.counts.round;
        let end = g
            .elements
            .iter()
            .skip(1)
            .position(|e| e.flags & DESC_F_WRITE == 0)
            .map_or(g.elements.len(), |i| i + 2);
        let mut out = Vec::with_capacity(end);
        let mut pos = 0u64;
        let mut prev: Option<u16> = None;
        for e in &g.elements[..end] {
            if let Some(p) = prev {
                // The ring index wraps at 65536: the distance is taken modulo 2^16.
                pos = pos.saturating_add(u64::from(e.position.wrapping_sub(p)));
            }
            prev = Some(e.position);
            out.push((pos, *e));
        }
        (round, out)
    }

    /// Writes the capture of the latest round to `path` (see the [module](self) docs).
    /// `ram_regions` are the guest RAM regions as `(guest address, size)`; `queue_size` the
    /// free page queue's size. Returns the number of elements written; an error if no round
    /// was captured.
    pub fn write_capture(
        &self,
        path: &Path,
        ram_regions: &[(u64, u64)],
        queue_size: u16,
        description: &str,
    ) -> io::Result<usize> {
        let dropped = self.lock().counts.dropped_elements;
        let (round, elements) = self.round_elements();
        let (Some(cmd_id), Some(&(last, _))) = (round, elements.last()) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no hint round was captured",
            ));
        };
        // One line of description only: the header is line-based.
        let description: String = description
            .chars()
            .map(|c| if c.is_control() || c == ';' { ' ' } else { c })
            .collect();
        let mut w = BufWriter::new(File::create(path)?);
        writeln!(
            w,
            "# guest {description}; free page vq size {queue_size}; avail idx {}",
            last.saturating_add(1)
        )?;
        writeln!(w, "# cmd_id {cmd_id}")?;
        for &(start, size) in ram_regions {
            let Some(end) = size.checked_sub(1).and_then(|s| start.checked_add(s)) else {
                continue;
            };
            writeln!(
                w,
                "# mtree {start:016x}-{end:016x} (prio 0, ram): vhost-user.ram"
            )?;
        }
        if dropped > 0 {
            writeln!(
                w,
                "# {dropped} elements after these were not captured (cap {})",
                self.max_elements
            )?;
        }
        for (pos, e) in &elements {
            writeln!(w, "{pos} {} {:#x} {} {}", e.head, e.addr, e.len, e.flags)?;
        }
        w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(elements.len())
    }
}

impl FreePageSink for HintCounter {
    fn free_page_hint(&self, cmd_id: u32, _gpa: GuestAddress, len: u64) {
        let mut g = self.lock();
        let State {
            counts,
            elements,
            lead_in,
        } = &mut *g;
        if counts.round != Some(cmd_id) {
            counts.round = Some(cmd_id);
            counts.round_hints = 0;
            counts.round_bytes = 0;
            counts.rounds = counts.rounds.saturating_add(1);
            if self.capture {
                // The round started at the last readable element posted before this hint.
                elements.clear();
                elements.append(lead_in);
                counts.captured_elements = elements.len() as u64;
                counts.dropped_elements = 0;
            }
        }
        counts.round_hints = counts.round_hints.saturating_add(1);
        counts.round_bytes = counts.round_bytes.saturating_add(len);
        counts.total_hints = counts.total_hints.saturating_add(1);
        counts.total_bytes = counts.total_bytes.saturating_add(len);
    }

    fn records_elements(&self) -> bool {
        self.capture
    }

    fn free_page_element(&self, element: &FreePageElement) {
        if !self.capture {
            return;
        }
        let mut g = self.lock();
        let State {
            counts,
            elements,
            lead_in,
        } = &mut *g;
        if element.flags & DESC_F_WRITE == 0 {
            lead_in.clear();
        }
        if lead_in.len() < MAX_LEAD_IN {
            lead_in.push(*element);
        }
        if counts.round.is_some() {
            if elements.len() < self.max_elements {
                elements.push(*element);
                counts.captured_elements = elements.len() as u64;
            } else {
                counts.dropped_elements = counts.dropped_elements.saturating_add(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::tempdir::TempDir;

    fn start(pos: u16, head: u16) -> FreePageElement {
        FreePageElement {
            position: pos,
            head,
            addr: 0x1001_da908,
            len: 4,
            flags: 0,
        }
    }

    fn hint(pos: u16, head: u16, addr: u64) -> FreePageElement {
        FreePageElement {
            position: pos,
            head,
            addr,
            len: 0x40_0000,
            flags: DESC_F_WRITE,
        }
    }

    /// Feeds a round as the device would: each element, then its hint if writable.
    fn round(sink: &HintCounter, cmd_id: u32, first_pos: u16, hints: u16) -> u16 {
        let mut pos = first_pos;
        sink.free_page_element(&start(pos, 0));
        for i in 0..hints {
            pos = pos.wrapping_add(1);
            let addr = 0x1_0000_0000 + u64::from(i) * 0x40_0000;
            sink.free_page_element(&hint(pos, i % 8 + 1, addr));
            sink.free_page_hint(cmd_id, GuestAddress(addr), 0x40_0000);
        }
        pos = pos.wrapping_add(1);
        sink.free_page_element(&start(pos, 0)); // the guest's STOP
        pos.wrapping_add(1)
    }

    struct Parsed {
        header: Vec<String>,
        lines: Vec<(u64, u16, u64, u32, u16)>,
    }

    fn parse(text: &str) -> Parsed {
        let mut header = Vec::new();
        let mut lines = Vec::new();
        for l in text.lines() {
            if l.starts_with('#') {
                header.push(l.to_string());
                continue;
            }
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 5, "{l:?}");
            lines.push((
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                u64::from_str_radix(f[2].strip_prefix("0x").unwrap(), 16).unwrap(),
                f[3].parse().unwrap(),
                f[4].parse().unwrap(),
            ));
        }
        Parsed { header, lines }
    }

    #[test]
    fn counts_per_round_and_in_total() {
        let sink = HintCounter::new();
        assert!(!sink.records_elements());
        round(&sink, 2, 0, 3);
        let c = sink.snapshot();
        assert_eq!(
            (c.round, c.round_hints, c.round_bytes, c.rounds),
            (Some(2), 3, 0xc0_0000, 1)
        );
        round(&sink, 3, 5, 2);
        let c = sink.snapshot();
        assert_eq!((c.round, c.round_hints, c.rounds), (Some(3), 2, 2));
        assert_eq!((c.total_hints, c.total_bytes), (5, 5 * 0x40_0000));
        assert_eq!(c.captured_elements, 0);
        assert!(!c.capturing);
    }

    #[test]
    fn capture_parses_back() {
        let dir = TempDir::new_with_prefix("/tmp/vub-capture").unwrap();
        let path = dir.as_path().join("round.txt");
        let sink = HintCounter::capturing(DEFAULT_MAX_ELEMENTS);
        assert!(sink.records_elements());
        // Stale elements before any round are not captured.
        sink.free_page_element(&hint(0, 9, 0x5000_0000));
        round(&sink, 7, 1, 4);
        let n = sink
            .write_capture(
                &path,
                &[(0, 0x4000_0000), (0x1_0000_0000, 0x4000_0000), (5, 0)],
                1024,
                "UML 1G\nsecond line; x",
            )
            .unwrap();
        assert_eq!(n, 6);
        let p = parse(&std::fs::read_to_string(&path).unwrap());
        assert_eq!(
            p.header,
            [
                "# guest UML 1G second line  x; free page vq size 1024; avail idx 6",
                "# cmd_id 7",
                "# mtree 0000000000000000-000000003fffffff (prio 0, ram): vhost-user.ram",
                "# mtree 0000000100000000-000000013fffffff (prio 0, ram): vhost-user.ram",
            ]
        );
        assert_eq!(p.lines.len(), 6);
        assert_eq!(p.lines[0], (0, 0, 0x1001_da908, 4, 0));
        assert_eq!(p.lines[1], (1, 1, 0x1_0000_0000, 0x40_0000, 2));
        assert_eq!(p.lines[4].2, 0x1_00c0_0000);
        assert_eq!(p.lines[5], (5, 0, 0x1001_da908, 4, 0));
    }

    #[test]
    fn capture_keeps_the_latest_round_and_counts_across_wrap() {
        let dir = TempDir::new_with_prefix("/tmp/vub-capture").unwrap();
        let path = dir.as_path().join("round.txt");
        let sink = HintCounter::capturing(DEFAULT_MAX_ELEMENTS);
        let next = round(&sink, 2, 100, 2);
        // An element the device ignores between rounds, then the next round across the
        // ring index wrap.
        sink.free_page_element(&hint(next, 3, 0x9000_0000));
        round(&sink, 3, 65534, 3);
        let n = sink.write_capture(&path, &[], 256, "wrap").unwrap();
        assert_eq!(n, 5);
        let text = std::fs::read_to_string(&path).unwrap();
        let p = parse(&text);
        assert!(p.header[0].ends_with("avail idx 5"), "{}", p.header[0]);
        assert_eq!(p.header[1], "# cmd_id 3");
        let positions: Vec<u64> = p.lines.iter().map(|l| l.0).collect();
        assert_eq!(positions, [0, 1, 2, 3, 4]);
        let (round, els) = sink.round_elements();
        assert_eq!(round, Some(3));
        let ring: Vec<u16> = els.iter().map(|(_, e)| e.position).collect();
        assert_eq!(ring, [65534, 65535, 0, 1, 2]);
    }

    #[test]
    fn capture_is_capped() {
        let dir = TempDir::new_with_prefix("/tmp/vub-capture").unwrap();
        let path = dir.as_path().join("round.txt");
        let sink = HintCounter::capturing(3);
        round(&sink, 4, 0, 10);
        let c = sink.snapshot();
        assert_eq!(c.captured_elements, 3);
        assert_eq!(c.dropped_elements, 9);
        assert_eq!(c.round_hints, 10, "counting goes on past the cap");
        assert_eq!(sink.write_capture(&path, &[], 64, "cap").unwrap(), 3);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("# 9 elements after these were not captured (cap 3)"));
        assert_eq!(parse(&text).lines.len(), 3);
    }

    #[test]
    fn no_round_no_capture() {
        let dir = TempDir::new_with_prefix("/tmp/vub-capture").unwrap();
        let path = dir.as_path().join("round.txt");
        let sink = HintCounter::capturing(16);
        sink.free_page_element(&start(0, 0));
        let e = sink.write_capture(&path, &[], 64, "none").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(!path.exists());
        let e = HintCounter::new()
            .write_capture(&path, &[], 64, "none")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
