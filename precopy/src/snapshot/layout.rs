// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where each guest memory region lies in a snapshot file, and the side file that says so.
//!
//! The side file (the *description*) is small and binary, all integers little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `VBSNAPL\0` |
//! | 4 | format version ([`DESCRIPTION_VERSION`]) |
//! | 4 | number of regions `n` (at most [`MAX_REGIONS`]) |
//! | 8 | length of the memory file in bytes |
//! | 24 × `n` | per region, in ascending guest address order: guest physical address, length, file offset |
//! | 8 | FNV-1a 64 checksum of every byte before it |

use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::error::SnapshotError;
use virtio_balloon::defs::PAGE_SIZE;

/// The version of the description this crate writes and reads.
pub const DESCRIPTION_VERSION: u32 = 1;
/// The most regions a description may list.
pub const MAX_REGIONS: usize = 4096;

const MAGIC: &[u8; 8] = b"VBSNAPL\0";
const HEADER_LEN: usize = 24;
const ENTRY_LEN: usize = 24;
const CHECKSUM_LEN: usize = 8;

/// One guest memory region in a snapshot file: guest bytes `[gpa, gpa + len)` are file bytes
/// `[file_offset, file_offset + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotRegion {
    /// The region's first guest physical address (4 KiB aligned).
    pub gpa: GuestAddress,
    /// Its length in bytes (a non-zero multiple of 4 KiB).
    pub len: u64,
    /// Where it starts in the memory file (4 KiB aligned, so the region can be mapped from
    /// the file).
    pub file_offset: u64,
}

/// The regions of a snapshot file, checked: page-aligned, not overlapping in guest memory or
/// in the file, sorted by guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLayout {
    regions: Vec<SnapshotRegion>,
    file_len: u64,
}

/// The path of the description of the snapshot whose memory file is `memory_file`: the same
/// path with `.layout` appended. It is written last: a memory file without it is an
/// incomplete snapshot.
pub fn description_path(memory_file: &Path) -> PathBuf {
    let mut name = memory_file.as_os_str().to_owned();
    name.push(".layout");
    PathBuf::from(name)
}

fn bad_layout(what: String) -> SnapshotError {
    SnapshotError::Layout(what)
}

impl SnapshotLayout {
    /// Checks `regions` (in any order) and sorts them by guest address.
    ///
    /// # Errors
    ///
    /// [`SnapshotError::Layout`]: no region, more than [`MAX_REGIONS`], an empty or
    /// unaligned region, a region that runs past the top of the address space or of the
    /// file's offsets, two regions that overlap in guest memory or in the file.
    pub fn new(mut regions: Vec<SnapshotRegion>) -> Result<Self, SnapshotError> {
        if regions.is_empty() {
            return Err(bad_layout("a snapshot needs at least one region".into()));
        }
        if regions.len() > MAX_REGIONS {
            return Err(bad_layout(format!(
                "{} regions, at most {MAX_REGIONS} are supported",
                regions.len()
            )));
        }
        let mut file_len = 0u64;
        for r in &regions {
            if r.len == 0 || r.len % PAGE_SIZE != 0 {
                return Err(bad_layout(format!(
                    "region at {:#x}: length {:#x} is not a non-zero multiple of 4 KiB",
                    r.gpa.0, r.len
                )));
            }
            if r.gpa.0 % PAGE_SIZE != 0 || r.file_offset % PAGE_SIZE != 0 {
                return Err(bad_layout(format!(
                    "region at {:#x} (file offset {:#x}) is not 4 KiB aligned",
                    r.gpa.0, r.file_offset
                )));
            }
            let end = r.file_offset.checked_add(r.len).ok_or_else(|| {
                bad_layout(format!(
                    "region at {:#x} runs past the largest file offset",
                    r.gpa.0
                ))
            })?;
            // The last guest byte must be addressable too.
            r.gpa.0.checked_add(r.len - 1).ok_or_else(|| {
                bad_layout(format!(
                    "region at {:#x} runs past the top of the address space",
                    r.gpa.0
                ))
            })?;
            file_len = file_len.max(end);
        }
        if i64::try_from(file_len).is_err() {
            return Err(bad_layout(format!(
                "a memory file of {file_len:#x} bytes is too large"
            )));
        }
        regions.sort_by_key(|r| r.gpa);
        for pair in regions.windows(2) {
            if pair[1].gpa.0 - pair[0].gpa.0 < pair[0].len {
                return Err(bad_layout(format!(
                    "regions at {:#x} and {:#x} overlap",
                    pair[0].gpa.0, pair[1].gpa.0
                )));
            }
        }
        let mut by_file: Vec<&SnapshotRegion> = regions.iter().collect();
        by_file.sort_by_key(|r| r.file_offset);
        for pair in by_file.windows(2) {
            if pair[1].file_offset - pair[0].file_offset < pair[0].len {
                return Err(bad_layout(format!(
                    "regions at {:#x} and {:#x} overlap in the file",
                    pair[0].gpa.0, pair[1].gpa.0
                )));
            }
        }
        Ok(SnapshotLayout { regions, file_len })
    }

    /// Every region of `mem` at the file offset equal to its guest physical address: the
    /// file is as large as the highest guest address, and the gaps between regions are
    /// holes.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new).
    pub fn at_guest_addresses<M: GuestMemoryBackend>(mem: &M) -> Result<Self, SnapshotError> {
        Self::new(
            mem.iter()
                .map(|r| SnapshotRegion {
                    gpa: r.start_addr(),
                    len: r.len(),
                    file_offset: r.start_addr().0,
                })
                .collect(),
        )
    }

    /// Every region of `mem`, back to back from file offset 0 in guest address order.
    ///
    /// # Errors
    ///
    /// As for [`new`](Self::new).
    pub fn packed<M: GuestMemoryBackend>(mem: &M) -> Result<Self, SnapshotError> {
        let mut offset = 0u64;
        let mut regions = Vec::new();
        for r in mem.iter() {
            regions.push(SnapshotRegion {
                gpa: r.start_addr(),
                len: r.len(),
                file_offset: offset,
            });
            offset = offset.checked_add(r.len()).ok_or_else(|| {
                bad_layout("the regions together run past the largest file offset".into())
            })?;
        }
        Self::new(regions)
    }

    /// The regions, sorted by guest address.
    pub fn regions(&self) -> &[SnapshotRegion] {
        &self.regions
    }

    /// The length of the memory file: the end of the region that ends last in it.
    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// The region holding guest address `gpa`, if any.
    pub fn region_of(&self, gpa: GuestAddress) -> Option<&SnapshotRegion> {
        let i = self.regions.partition_point(|r| r.gpa <= gpa);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (gpa.0 - r.gpa.0 < r.len).then_some(r)
    }

    /// The file offset of guest address `gpa`, if a region holds it.
    pub fn file_offset_of(&self, gpa: GuestAddress) -> Option<u64> {
        let r = self.region_of(gpa)?;
        // Cannot overflow: the region's file range was checked.
        Some(r.file_offset + (gpa.0 - r.gpa.0))
    }

    /// Whether every byte of `[start, start + len)` lies in one region.
    pub fn covers(&self, start: GuestAddress, len: u64) -> bool {
        let Some(r) = self.region_of(start) else {
            return false;
        };
        len <= r.len - (start.0 - r.gpa.0)
    }

    /// Whether `mem` has exactly these regions (same addresses and lengths).
    pub fn matches<M: GuestMemoryBackend>(&self, mem: &M) -> bool {
        let mut ranges: Vec<(GuestAddress, u64)> =
            mem.iter().map(|r| (r.start_addr(), r.len())).collect();
        ranges.sort_by_key(|r| r.0);
        ranges.len() == self.regions.len()
            && ranges
                .iter()
                .zip(&self.regions)
                .all(|(m, r)| m.0 == r.gpa && m.1 == r.len)
    }

    /// The description's bytes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.regions.len() * ENTRY_LEN + 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&DESCRIPTION_VERSION.to_le_bytes());
        // At most MAX_REGIONS: fits.
        out.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.file_len.to_le_bytes());
        for r in &self.regions {
            out.extend_from_slice(&r.gpa.0.to_le_bytes());
            out.extend_from_slice(&r.len.to_le_bytes());
            out.extend_from_slice(&r.file_offset.to_le_bytes());
        }
        let sum = fnv1a(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    /// Parses and checks a description.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let bad = |what: &str| SnapshotError::BadDescription(what.to_string());
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN || &bytes[..8] != MAGIC {
            return Err(bad("not a snapshot description (no magic)"));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        let version = u32_at(8);
        if version != DESCRIPTION_VERSION {
            return Err(SnapshotError::Version {
                found: version,
                supported: DESCRIPTION_VERSION,
            });
        }
        let count = u32_at(12) as usize;
        if count > MAX_REGIONS {
            return Err(bad("more regions than supported"));
        }
        let body = HEADER_LEN + count * ENTRY_LEN;
        if bytes.len() != body + CHECKSUM_LEN {
            return Err(bad("its length does not match its region count"));
        }
        if fnv1a(&bytes[..body]) != u64_at(body) {
            return Err(bad("checksum mismatch"));
        }
        let file_len = u64_at(16);
        let regions = (0..count)
            .map(|i| {
                let at = HEADER_LEN + i * ENTRY_LEN;
                SnapshotRegion {
                    gpa: GuestAddress(u64_at(at)),
                    len: u64_at(at + 8),
                    file_offset: u64_at(at + 16),
                }
            })
            .collect();
        let layout = Self::new(regions)?;
        if layout.file_len != file_len {
            return Err(bad("its file length does not match its regions"));
        }
        Ok(layout)
    }
}

/// FNV-1a, 64 bits: catches a damaged description, not a forged one.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, len: u64, file_offset: u64) -> SnapshotRegion {
        SnapshotRegion {
            gpa: GuestAddress(gpa),
            len,
            file_offset,
        }
    }

    #[test]
    fn layouts_are_checked() {
        let ok = SnapshotLayout::new(vec![
            region(0x10_0000, 0x2000, 0),
            region(0, 0x1000, 0x2000),
        ])
        .unwrap();
        assert_eq!(ok.regions()[0].gpa, GuestAddress(0));
        assert_eq!(ok.file_len(), 0x3000);
        assert_eq!(ok.file_offset_of(GuestAddress(0x10_1fff)), Some(0x1fff));
        assert_eq!(ok.file_offset_of(GuestAddress(0x1000)), None);
        assert!(ok.covers(GuestAddress(0x10_0000), 0x2000));
        assert!(!ok.covers(GuestAddress(0x10_1000), 0x2000));
        for (bad, needle) in [
            (vec![], "at least one"),
            (vec![region(0, 0, 0)], "multiple of 4 KiB"),
            (vec![region(0, 0x1800, 0)], "multiple of 4 KiB"),
            (vec![region(0x800, 0x1000, 0)], "aligned"),
            (vec![region(0, 0x1000, 0x10)], "aligned"),
            (
                vec![region(0, 0x2000, 0), region(0x1000, 0x1000, 0x4000)],
                "overlap",
            ),
            (
                vec![region(0, 0x2000, 0), region(0x4000, 0x1000, 0x1000)],
                "in the file",
            ),
            (
                vec![region(u64::MAX - 0xfff, 0x2000, 0)],
                "top of the address space",
            ),
            (
                vec![region(0, 0x1000, u64::MAX - 0xfff)],
                "largest file offset",
            ),
            (vec![region(0, 0x1000, 1 << 63)], "too large"),
        ] {
            let err = SnapshotLayout::new(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{err} lacks {needle}");
        }
        let many = (0..=MAX_REGIONS as u64)
            .map(|i| region(i << 12, 0x1000, i << 12))
            .collect();
        assert!(SnapshotLayout::new(many).is_err());
    }

    #[test]
    fn descriptions_round_trip_and_damage_is_refused() {
        let layout =
            SnapshotLayout::new(vec![region(0, 0x1000, 0x1_0000), region(0x4000, 0x3000, 0)])
                .unwrap();
        let bytes = layout.encode();
        assert_eq!(SnapshotLayout::decode(&bytes).unwrap(), layout);
        // Any single flipped byte is refused.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(SnapshotLayout::decode(&bad).is_err(), "byte {i}");
        }
        for len in 0..bytes.len() {
            assert!(
                SnapshotLayout::decode(&bytes[..len]).is_err(),
                "length {len}"
            );
        }
        let mut newer = bytes.clone();
        newer[8] = 2;
        assert!(matches!(
            SnapshotLayout::decode(&newer),
            Err(SnapshotError::Version { found: 2, .. })
        ));
    }

    #[test]
    fn a_description_whose_length_field_disagrees_is_refused() {
        let layout = SnapshotLayout::new(vec![region(0, 0x1000, 0)]).unwrap();
        let mut bytes = layout.encode();
        // The file length field says 8 KiB; the checksum is recomputed so only the
        // disagreement is left.
        bytes[16..24].copy_from_slice(&0x2000u64.to_le_bytes());
        let body = bytes.len() - CHECKSUM_LEN;
        let sum = fnv1a(&bytes[..body]);
        bytes[body..].copy_from_slice(&sum.to_le_bytes());
        let err = SnapshotLayout::decode(&bytes).unwrap_err().to_string();
        assert!(err.contains("file length"), "{err}");
    }

    #[test]
    fn description_path_appends() {
        assert_eq!(
            description_path(Path::new("/a/mem.snap")),
            PathBuf::from("/a/mem.snap.layout")
        );
    }
}
