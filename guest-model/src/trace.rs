// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Captured free page hint rounds: the capture format (`tests/data/README.md` in the
//! virtio-balloon crate) and the round a replay posts from a capture.
//!
//! A capture lists the buffers of one round in the order the driver made them available:
//! `# mtree` header lines give the guest's RAM, a header line gives the free page queue size
//! and the avail index after the round, an optional `# cmd_id` line gives the start buffer's
//! id, then one line per buffer (`pos head addr len flags`, or `pos head reused` when the head
//! descriptor was overwritten before the capture read it back).

use std::path::Path;

use vm_memory::GuestAddress;

use crate::ring::VRING_DESC_F_WRITE as F_WRITE;

/// The first id a fresh device hands out (ids 0 and 1 mean STOP and DONE).
pub const FIRST_ROUND_ID: u32 = 2;

/// One buffer as the capture shows it: its position in the available ring (a u16 counter),
/// its head and the head descriptor's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Position in the available ring (a u16 counter, not taken modulo the queue size).
    pub pos: u16,
    /// The head descriptor's index.
    pub head: u16,
    /// The head descriptor's address.
    pub addr: u64,
    /// The head descriptor's length.
    pub len: u32,
    /// The head descriptor's flags.
    pub flags: u16,
}

impl Entry {
    /// A read-only buffer long enough to hold a command id.
    pub fn is_command(&self) -> bool {
        self.flags == 0 && self.len >= 4
    }
}

/// One line of a capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Line {
    /// A buffer whose head descriptor the capture shows.
    Desc(Entry),
    /// The head descriptor was overwritten after the buffer was posted (captures read back
    /// from guest memory): its fields are unknown.
    Reused {
        /// Position in the available ring.
        pos: u16,
        /// The head descriptor's index.
        head: u16,
    },
}

impl Line {
    /// Position in the available ring.
    pub fn pos(&self) -> u16 {
        match *self {
            Line::Desc(e) => e.pos,
            Line::Reused { pos, .. } => pos,
        }
    }

    /// The head descriptor's index.
    pub fn head(&self) -> u16 {
        match *self {
            Line::Desc(e) => e.head,
            Line::Reused { head, .. } => head,
        }
    }
}

/// One captured round: the guest's RAM, the queue and the buffers in the order the driver
/// made them available.
#[derive(Clone, Debug)]
pub struct Capture {
    /// Where it came from, for messages.
    pub name: String,
    /// Guest RAM as merged from the `# mtree` lines: (start, length), ascending.
    pub ram: Vec<(GuestAddress, u64)>,
    /// The free page queue's size.
    pub queue_size: u16,
    /// The avail index after the round (the position after the last line).
    pub avail_idx: u16,
    /// The id the start buffer carried, from `# cmd_id`.
    pub cmd_id: Option<u32>,
    /// Consecutive positions, in order.
    pub lines: Vec<Line>,
}

fn parse_num(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let v = match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    };
    v.map_err(|e| format!("bad number {s:?}: {e}"))
}

fn parse_small<T: TryFrom<u64>>(s: &str, what: &str) -> Result<T, String> {
    let v = parse_num(s)?;
    T::try_from(v).map_err(|_| format!("{what} {v} is out of range"))
}

/// A `# mtree` line's range if it is RAM or ROM (ROM inside a RAM block is RAM to the
/// device's memory map).
fn parse_mtree(rest: &str) -> Result<Option<(u64, u64)>, String> {
    // "0000000000100000-00000000bfffffff (prio 0, ram): pc.ram @..."
    let (span, kind) = rest
        .split_once(' ')
        .ok_or_else(|| format!("bad mtree line {rest:?}"))?;
    if !(kind.contains(", ram)") || kind.contains(", rom)")) {
        return Ok(None);
    }
    let (a, b) = span
        .split_once('-')
        .ok_or_else(|| format!("bad mtree range {span:?}"))?;
    let a = u64::from_str_radix(a, 16).map_err(|e| format!("mtree start {a:?}: {e}"))?;
    let b = u64::from_str_radix(b, 16).map_err(|e| format!("mtree end {b:?}: {e}"))?;
    if b < a {
        return Err(format!("mtree range {span:?} ends before it starts"));
    }
    Ok(Some((a, b)))
}

/// Merges inclusive ranges into (start, length) regions.
fn merge_inclusive(mut ranges: Vec<(u64, u64)>) -> Vec<(GuestAddress, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (a, b) in ranges {
        match merged.last_mut() {
            Some((_, end)) if a <= end.saturating_add(1) => *end = (*end).max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
        .into_iter()
        .map(|(a, b)| (GuestAddress(a), b - a + 1))
        .collect()
}

fn parse_line(line: &str) -> Result<Line, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    match f.as_slice() {
        [pos, head, "reused"] => Ok(Line::Reused {
            pos: parse_small(pos, "position")?,
            head: parse_small(head, "head")?,
        }),
        [pos, head, addr, len, flags] => Ok(Line::Desc(Entry {
            pos: parse_small(pos, "position")?,
            head: parse_small(head, "head")?,
            addr: parse_num(addr)?,
            len: parse_small(len, "length")?,
            flags: parse_small(flags, "flags")?,
        })),
        _ => Err(format!("cannot parse {line:?}")),
    }
}

impl Capture {
    /// Reads a capture file; a missing or bad file fails the test (it is never skipped).
    pub fn load(path: &Path) -> Capture {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
            panic!(
                "the capture {} is missing or unreadable ({e}); this test needs it and must \
                 not be skipped",
                path.display()
            )
        });
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        Capture::parse(&name, &text).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Parses the text of a capture; `name` prefixes every error message, which says what
    /// is wrong and on which line.
    pub fn parse(name: &str, text: &str) -> Result<Capture, String> {
        let mut ranges = Vec::new();
        let mut queue_size: Option<u16> = None;
        let mut avail_idx: Option<u16> = None;
        let mut cmd_id: Option<u32> = None;
        let mut lines = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            let at = |e: String| format!("{name}:{}: {e}", n + 1);
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            let Some(header) = line.strip_prefix('#') else {
                lines.push(parse_line(line).map_err(at)?);
                continue;
            };
            let header = header.trim();
            if let Some(rest) = header.strip_prefix("mtree ") {
                ranges.extend(parse_mtree(rest).map_err(at)?);
            } else if let Some(v) = header.strip_prefix("cmd_id ") {
                let id: u32 = parse_small(v, "cmd_id").map_err(at)?;
                if id < FIRST_ROUND_ID {
                    return Err(at(format!("cmd_id {id} is STOP or DONE, not a round id")));
                }
                if cmd_id.replace(id).is_some() {
                    return Err(at("a second cmd_id line".into()));
                }
            } else {
                // "guest MEM=4G ...; free page vq size 1024; avail idx 982"
                for part in header.split(';').map(str::trim) {
                    if let Some(v) = part.strip_prefix("free page vq size ") {
                        queue_size = Some(parse_small(v, "queue size").map_err(at)?);
                    } else if let Some(v) = part.strip_prefix("avail idx ") {
                        avail_idx = Some(parse_small(v, "avail idx").map_err(at)?);
                    }
                }
            }
        }
        let queue_size = queue_size
            .filter(|&s| s > 0)
            .ok_or_else(|| format!("{name}: no `free page vq size N` in the header"))?;
        let avail_idx =
            avail_idx.ok_or_else(|| format!("{name}: no `avail idx M` in the header"))?;
        if ranges.is_empty() {
            return Err(format!("{name}: no RAM (`# mtree ... ram)`) in the header"));
        }
        let first = lines
            .first()
            .ok_or_else(|| format!("{name}: no buffers"))?
            .pos();
        for (i, l) in lines.iter().enumerate() {
            let want = first.wrapping_add(i as u16);
            if l.pos() != want {
                return Err(format!(
                    "{name}: position {} where {want} was expected: positions must be \
                     consecutive (a u16 counter, not taken modulo the queue size)",
                    l.pos()
                ));
            }
            if l.head() >= queue_size {
                return Err(format!(
                    "{name}: position {}: head {} is not below the queue size {queue_size}",
                    l.pos(),
                    l.head()
                ));
            }
        }
        let end = first.wrapping_add(lines.len() as u16);
        if end != avail_idx {
            return Err(format!(
                "{name}: the buffers end at position {end} but the header says avail idx \
                 {avail_idx}"
            ));
        }
        Ok(Capture {
            name: name.to_string(),
            ram: merge_inclusive(ranges),
            queue_size,
            avail_idx,
            cmd_id,
            lines,
        })
    }

    /// The number of `reused` lines.
    pub fn reused(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| matches!(l, Line::Reused { .. }))
            .count()
    }
}

/// A command buffer (start or STOP) of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cmd {
    /// Where the id goes; `None`: the capture does not tell, use the driver model's slot.
    pub slot: Option<GuestAddress>,
    /// Its length.
    pub len: u32,
    /// The capture shows the buffer (its line is not `reused`).
    pub captured: bool,
}

/// One round as the replay posts it: the start buffer, the hints, the STOP buffer.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The start buffer.
    pub start: Cmd,
    /// The hints, in order.
    pub hints: Vec<Entry>,
    /// The STOP buffer.
    pub stop: Cmd,
    /// `reused` lines in the capture.
    pub reused: usize,
    /// `reused` lines between the start and the STOP: left out of the replay.
    pub skipped: usize,
}

impl Plan {
    /// The round a capture shows: the first position is the start buffer and the last the
    /// STOP (either may be `reused`: it is then rebuilt, as Linux lays the two ids out
    /// side by side); in between only single device-writable descriptors or `reused` lines.
    pub fn new(cap: &Capture) -> Result<Plan, String> {
        let name = &cap.name;
        let (first, rest) = cap
            .lines
            .split_first()
            .ok_or_else(|| format!("{name}: no buffers"))?;
        let (last, middle) = rest
            .split_last()
            .ok_or_else(|| format!("{name}: a round needs a start and a STOP buffer"))?;
        let command = |l: &Line, what: &str| -> Result<Option<Entry>, String> {
            match *l {
                Line::Reused { .. } => Ok(None),
                Line::Desc(e) if e.is_command() => Ok(Some(e)),
                Line::Desc(e) => Err(format!(
                    "{name}: position {} should be the {what} buffer (read-only, at least 4 \
                     bytes) or `reused`: {e:?}",
                    e.pos
                )),
            }
        };
        let start = command(first, "start")?;
        let stop = command(last, "STOP")?;
        let mut hints = Vec::new();
        let mut skipped = 0;
        for l in middle {
            match *l {
                Line::Reused { .. } => skipped += 1,
                Line::Desc(e) if e.flags == F_WRITE => hints.push(e),
                Line::Desc(e) if e.is_command() => {
                    return Err(format!(
                        "{name}: a command buffer at position {} in the middle of the round: \
                         a capture holds one round",
                        e.pos
                    ))
                }
                Line::Desc(e) => {
                    return Err(format!(
                        "{name}: position {}: flags {:#x} cannot be replayed (only single \
                         device-writable descriptors are hints; a chain's other descriptors \
                         are not captured): {e:?}",
                        e.pos, e.flags
                    ))
                }
            }
        }
        let start_cmd = match (start, stop) {
            (Some(s), _) => Cmd {
                slot: Some(GuestAddress(s.addr)),
                len: s.len,
                captured: true,
            },
            (None, stop) => Cmd {
                slot: stop.and_then(|s| s.addr.checked_sub(4)).map(GuestAddress),
                len: 4,
                captured: false,
            },
        };
        let stop_cmd = match (stop, start) {
            (Some(s), _) => Cmd {
                slot: Some(GuestAddress(s.addr)),
                len: s.len,
                captured: true,
            },
            (None, start) => Cmd {
                slot: start
                    .and_then(|s| s.addr.checked_add(u64::from(s.len)))
                    .map(GuestAddress),
                len: 4,
                captured: false,
            },
        };
        Ok(Plan {
            start: start_cmd,
            hints,
            stop: stop_cmd,
            reused: cap.reused(),
            skipped,
        })
    }

    /// Guest ranges the replay writes or hints: (start, end).
    pub fn busy(&self) -> Vec<(u64, u64)> {
        let mut busy: Vec<(u64, u64)> = self
            .hints
            .iter()
            .map(|e| (e.addr, e.addr.saturating_add(u64::from(e.len))))
            .collect();
        for c in [self.start, self.stop] {
            if let Some(s) = c.slot {
                busy.push((s.0, s.0.saturating_add(u64::from(c.len))));
            }
        }
        busy
    }
}
