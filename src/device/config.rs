// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The balloon's configuration space (the layout is in `docs/protocol.md`).
//!
//! Four little-endian `u32` fields: `num_pages` (device), `actual` (driver),
//! `free_page_hint_cmd_id` (device) and `poison_val` (driver). Its length is fixed by the
//! offered features: 8 bytes, 12 with free page hinting, 16 with page poison. Every read
//! regenerates the image from the device state; writes of any width are merged into that
//! image and only `actual` and `poison_val` are taken from it.

use crate::defs::config::{ACTUAL, MAX_LEN, POISON_VAL};
use crate::ratelimit::{warn_limited, RateLimit};

static READ_ONLY_WRITE: RateLimit = RateLimit::new();

/// The driver-written fields and the layout of the configuration space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ConfigSpace {
    /// The length fixed by the offered features.
    pub(super) len: usize,
    /// The target, in 4 KiB pages.
    pub(super) num_pages: u32,
    /// The driver's `actual`.
    pub(super) actual: u32,
    /// The driver's `poison_val` (0 unless PAGE_POISON was negotiated).
    pub(super) poison_val: u32,
}

/// What a driver write changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct ConfigWrite {
    pub(super) actual_changed: bool,
    pub(super) poison_changed: bool,
    /// The write covered a byte of `poison_val` (taken or not).
    pub(super) poison_touched: bool,
}

impl ConfigSpace {
    pub(super) fn new(len: usize) -> Self {
        ConfigSpace {
            len: len.min(MAX_LEN),
            ..Default::default()
        }
    }

    fn image(&self, cmd_id: u32) -> [u8; MAX_LEN] {
        let mut img = [0u8; MAX_LEN];
        for (i, v) in [self.num_pages, self.actual, cmd_id, self.poison_val]
            .into_iter()
            .enumerate()
        {
            img[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        img
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as `0xff`.
    pub(super) fn read(&self, offset: u64, data: &mut [u8], cmd_id: u32) {
        let img = self.image(cmd_id);
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < self.len)
                .map_or(0xff, |o| img[o]);
        }
    }

    /// Merges a driver write into the image and takes `actual` and (if `poison_ok`)
    /// `poison_val` from it. Bytes past the end and bytes of device-owned fields are dropped.
    pub(super) fn write(
        &mut self,
        offset: u64,
        data: &[u8],
        cmd_id: u32,
        poison_ok: bool,
    ) -> ConfigWrite {
        let mut img = self.image(cmd_id);
        let mut dropped = false;
        let mut poison_touched = false;
        for (i, &b) in data.iter().enumerate() {
            let Some(o) = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .filter(|&o| o < self.len)
            else {
                dropped = true;
                continue;
            };
            let field = (o / 4 * 4) as u64;
            poison_touched |= field == POISON_VAL;
            if field == ACTUAL || (field == POISON_VAL && poison_ok) {
                img[o] = b;
            } else {
                dropped = true;
            }
        }
        if dropped {
            warn_limited!(
                READ_ONLY_WRITE,
                "balloon config: driver write at {:#x} ({} bytes) to a read-only or missing field",
                offset,
                data.len()
            );
        }
        let field = |off: u64| {
            let o = off as usize;
            u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]])
        };
        let actual = field(ACTUAL);
        let poison = if poison_ok {
            field(POISON_VAL)
        } else {
            self.poison_val
        };
        let out = ConfigWrite {
            actual_changed: actual != self.actual,
            poison_changed: poison != self.poison_val,
            poison_touched,
        };
        self.actual = actual;
        self.poison_val = poison;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_u32(c: &ConfigSpace, off: u64, id: u32) -> u32 {
        let mut b = [0u8; 4];
        c.read(off, &mut b, id);
        u32::from_le_bytes(b)
    }

    #[test]
    fn layout_and_past_end() {
        let mut c = ConfigSpace::new(12);
        c.num_pages = 0x0102_0304;
        assert_eq!(read_u32(&c, 0, 7), 0x0102_0304);
        assert_eq!(read_u32(&c, 8, 7), 7);
        assert_eq!(read_u32(&c, 12, 7), u32::MAX, "poison_val is past the end");
        let mut b = [0u8; 4];
        c.read(10, &mut b, 0x1234_5678);
        assert_eq!(b, [0x34, 0x12, 0xff, 0xff]);
        c.read(u64::MAX - 1, &mut b, 0);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn byte_writes_merge_into_actual() {
        let mut c = ConfigSpace::new(16);
        c.write(4, &[0x78], 0, true);
        c.write(5, &[0x56, 0x34], 0, true);
        let w = c.write(7, &[0x12], 0, true);
        assert!(w.actual_changed);
        assert_eq!(c.actual, 0x1234_5678);
        // num_pages and cmd_id are device-owned.
        c.write(0, &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 5, true);
        assert_eq!(c.num_pages, 0);
        assert_eq!(c.actual, 0x0807_0605);
        assert_eq!(read_u32(&c, 8, 5), 5);
    }

    #[test]
    fn poison_needs_negotiation_and_room() {
        let mut c = ConfigSpace::new(16);
        c.write(12, &0xaaaa_aaaau32.to_le_bytes(), 0, false);
        assert_eq!(c.poison_val, 0);
        let w = c.write(12, &0xaaaa_aaaau32.to_le_bytes(), 0, true);
        assert!(w.poison_changed);
        assert_eq!(c.poison_val, 0xaaaa_aaaa);
        // Once latched, a write that may not change it keeps it.
        let w = c.write(12, &0u32.to_le_bytes(), 0, false);
        assert!(w.poison_touched && !w.poison_changed);
        assert_eq!(c.poison_val, 0xaaaa_aaaa);
        assert!(!c.write(4, &[1], 0, false).poison_touched);

        let mut short = ConfigSpace::new(12);
        short.write(12, &1u32.to_le_bytes(), 0, true);
        assert_eq!(short.poison_val, 0, "past the end is dropped");
        short.write(u64::MAX, &[1, 2], 0, true);
        assert_eq!(short.actual, 0);
    }
}
