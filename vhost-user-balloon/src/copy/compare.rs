// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Comparing a copy with the memory it came from, page by page.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use serde_json::{json, Map, Value};
use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon_precopy::snapshot::SnapshotFile;
use virtio_balloon_precopy::Receiver;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::hints::*;

/// The most differing page addresses a `compare` answer lists.
pub const MAX_LISTED_PAGES: usize = 16;

/// Bytes of one page.
pub(super) const PAGE: usize = PAGE_SIZE as usize;
use crate::Mem;

/// Where `compare` reads the copy.
pub(super) enum Source {
    Snapshot(PathBuf),
    Stream(PathBuf),
}

/// The counts of a comparison.
#[derive(Default)]
pub(super) struct Differences {
    pub(super) pages: u64,
    pub(super) differing: u64,
    pub(super) hinted_clean: u64,
    pub(super) other: u64,
    pub(super) zero_in_copy: u64,
    pub(super) first: Vec<String>,
    pub(super) first_other: Vec<String>,
}

impl Differences {
    pub(super) fn page(&mut self, addr: GuestAddress, copy: &[u8; PAGE], hinted_clean: bool) {
        self.differing += 1;
        if copy.iter().all(|&b| b == 0) {
            self.zero_in_copy += 1;
        }
        let name = format!("{:#x}", addr.0);
        if self.first.len() < MAX_LISTED_PAGES {
            self.first.push(name.clone());
        }
        if hinted_clean {
            self.hinted_clean += 1;
        } else {
            self.other += 1;
            if self.first_other.len() < MAX_LISTED_PAGES {
                self.first_other.push(name);
            }
        }
    }
}

/// Compares the copy at `source` with `mem`, page by page.
pub(super) fn compare(
    mem: &Mem,
    hints: Option<&CopyHints>,
    source: &Source,
) -> Result<Value, String> {
    let guard = mem.memory();
    let mem: &GuestMemoryMmap<()> = &guard;
    let ranges: Vec<(GuestAddress, u64)> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    if ranges.is_empty() {
        return Err("no guest memory: no frontend has sent its memory table".into());
    }
    if let Some(h) = hints {
        if h.ranges() != ranges {
            return Err(
                "the guest memory's regions changed since the last copy: nothing to compare".into(),
            );
        }
    }
    let mut diff = Differences::default();
    let mut extra = Map::new();
    match source {
        Source::Snapshot(path) => {
            let file = SnapshotFile::open(path).map_err(|e| e.to_string())?;
            compare_pages(mem, hints, &mut diff, |addr, buf| {
                match file.read_page(addr, buf) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(format!(
                        "the snapshot does not hold the page at {:#x}",
                        addr.0
                    )),
                    Err(e) => Err(e.to_string()),
                }
            })?;
            extra.insert("source".into(), json!("snapshot"));
        }
        Source::Stream(path) => {
            let usize_ranges = ranges
                .iter()
                .map(|&(a, l)| usize::try_from(l).map(|l| (a, l)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| "a region is too large for this host".to_string())?;
            let dst = GuestMemoryMmap::<()>::from_ranges(&usize_ranges)
                .map_err(|e| format!("cannot map memory for the stream: {e}"))?;
            let file =
                File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
            let stats = Receiver::new(&dst)
                .map_err(|e| format!("cannot track the stream's memory: {e}"))?
                .receive(BufReader::with_capacity(1 << 20, file))
                .map_err(|e| format!("cannot apply {}: {e}", path.display()))?;
            compare_pages(mem, hints, &mut diff, |addr, buf| {
                dst.read_slice(&mut buf[..], addr)
                    .map_err(|e| format!("reading the stream's memory at {:#x}: {e}", addr.0))
            })?;
            extra.insert("source".into(), json!("stream"));
            extra.insert(
                "stream".into(),
                json!({
                    "pages": stats.pages,
                    "zero_pages": stats.zero_pages,
                    "iterations": stats.iterations,
                    "bytes": stats.bytes,
                }),
            );
        }
    }
    let mut v = json!({
        "pages_compared": diff.pages,
        "pages_differing": diff.differing,
        "differing_hinted_clean": diff.hinted_clean,
        "differing_other": diff.other,
        "differing_zero_in_copy": diff.zero_in_copy,
        "first_differing": diff.first,
        "first_differing_other": diff.first_other,
        "hinted_clean_pages": hints.map_or(0, CopyHints::hinted_clean_pages),
        "hinted_later_written": hints.map_or(0, CopyHints::hinted_later_written),
    });
    if let Some(obj) = v.as_object_mut() {
        obj.extend(extra);
    }
    Ok(v)
}

/// Compares every whole page of `mem` with what `copy` reads for it.
pub(super) fn compare_pages(
    mem: &GuestMemoryMmap<()>,
    hints: Option<&CopyHints>,
    diff: &mut Differences,
    mut copy: impl FnMut(GuestAddress, &mut [u8; PAGE]) -> Result<(), String>,
) -> Result<(), String> {
    let mut ours = Box::new([0u8; PAGE]);
    let mut theirs = Box::new([0u8; PAGE]);
    for region in mem.iter() {
        let start = region.start_addr().0;
        let pages = region.len() / PAGE_SIZE;
        for i in 0..pages {
            let Some(addr) = i
                .checked_mul(PAGE_SIZE)
                .and_then(|off| start.checked_add(off))
                .map(GuestAddress)
            else {
                break;
            };
            mem.read_slice(&mut ours[..], addr)
                .map_err(|e| format!("reading guest memory at {:#x}: {e}", addr.0))?;
            copy(addr, &mut theirs)?;
            diff.pages += 1;
            if ours[..] != theirs[..] {
                let clean = hints.is_some_and(|h| h.is_hinted_clean(addr));
                diff.page(addr, &theirs, clean);
            }
        }
    }
    Ok(())
}
