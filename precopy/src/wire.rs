// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The precopy stream: the frames the [`Precopy`](crate::Precopy) loop writes and a
//! destination applies with [`Receiver`].
//!
//! Every frame starts with a 16-byte little-endian header: `kind: u32`, `count: u32`,
//! `gpa: u64`.
//!
//! | kind | frame | count | gpa | payload |
//! | --- | --- | --- | --- | --- |
//! | 1 | stream start | format version (1) | page size (4096) | none |
//! | 2 | page | 1 | page address | 4096 bytes |
//! | 3 | zero pages | pages in the run | first page address | none |
//! | 4 | end of an iteration | iteration number | 0 | none |
//! | 5 | end of the stream | 0 | 0 | none |
//!
//! A page of zeros travels as a header only, as in QEMU: a run of consecutive zero pages
//! costs 16 bytes. The destination writes zeros only over pages it has already received
//! with data (its memory starts zeroed), so an untouched guest page costs neither side a
//! write.
//!
//! The destination treats the stream as untrusted: every address and count is checked
//! against its own memory before anything is written, and the work a frame causes is
//! bounded by the memory it names.

use std::io::{self, Read, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use virtio_balloon::defs::PAGE_SIZE;
use virtio_balloon::migration::MigrationBitmap;

/// The format version this crate writes and reads.
pub const WIRE_VERSION: u32 = 1;
/// Bytes in a frame header.
pub const FRAME_HEADER_LEN: usize = 16;
/// Bytes of guest memory in a page frame.
pub const WIRE_PAGE_SIZE: usize = PAGE_SIZE as usize;

/// Frame kinds.
mod kind {
    pub const START: u32 = 1;
    pub const PAGE: u32 = 2;
    pub const ZERO: u32 = 3;
    pub const END_ITERATION: u32 = 4;
    pub const END: u32 = 5;
}

/// Writes frames to any `Write`, counting the bytes, and merges consecutive zero pages into
/// one frame.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    out: W,
    bytes: u64,
    /// A run of zero pages not written yet: (first page, pages).
    zero_run: Option<(u64, u32)>,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps `out`; nothing is written yet.
    pub fn new(out: W) -> Self {
        FrameWriter {
            out,
            bytes: 0,
            zero_run: None,
        }
    }

    /// Bytes written so far, including a pending zero run's header.
    pub fn bytes(&self) -> u64 {
        self.bytes + if self.zero_run.is_some() { 16 } else { 0 }
    }

    fn header(&mut self, kind: u32, count: u32, gpa: u64) -> io::Result<()> {
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&count.to_le_bytes());
        h[8..16].copy_from_slice(&gpa.to_le_bytes());
        self.out.write_all(&h)?;
        self.bytes += FRAME_HEADER_LEN as u64;
        Ok(())
    }

    fn flush_zero_run(&mut self) -> io::Result<()> {
        if let Some((gpa, count)) = self.zero_run.take() {
            self.header(kind::ZERO, count, gpa)?;
        }
        Ok(())
    }

    /// The stream start frame.
    pub fn start(&mut self) -> io::Result<()> {
        self.header(kind::START, WIRE_VERSION, PAGE_SIZE)
    }

    /// One page with its contents.
    pub fn page(&mut self, gpa: GuestAddress, data: &[u8; WIRE_PAGE_SIZE]) -> io::Result<()> {
        self.flush_zero_run()?;
        self.header(kind::PAGE, 1, gpa.0)?;
        self.out.write_all(data)?;
        self.bytes += WIRE_PAGE_SIZE as u64;
        Ok(())
    }

    /// One page of zeros: extends the pending run when it follows it.
    pub fn zero_page(&mut self, gpa: GuestAddress) -> io::Result<()> {
        if let Some((first, count)) = self.zero_run.as_mut() {
            let next = u64::from(*count)
                .checked_mul(PAGE_SIZE)
                .and_then(|off| first.checked_add(off));
            if next == Some(gpa.0) && *count < u32::MAX {
                *count += 1;
                return Ok(());
            }
        }
        self.flush_zero_run()?;
        self.zero_run = Some((gpa.0, 1));
        Ok(())
    }

    /// The end of an iteration.
    pub fn end_iteration(&mut self, iteration: u32) -> io::Result<()> {
        self.flush_zero_run()?;
        self.header(kind::END_ITERATION, iteration, 0)
    }

    /// The end of the stream; flushes the writer.
    pub fn end(&mut self) -> io::Result<()> {
        self.flush_zero_run()?;
        self.header(kind::END, 0, 0)?;
        self.out.flush()
    }

    /// Flushes the underlying writer (and a pending zero run).
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_zero_run()?;
        self.out.flush()
    }

    /// The underlying writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// Errors of [`Receiver::receive`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// Reading the stream failed (an early end of stream included).
    #[error("reading the migration stream failed: {0}")]
    Io(#[from] io::Error),
    /// The stream does not begin with a start frame of this format version and page size.
    #[error(
        "stream starts with version {version} and page size {page_size}, expected version {} \
     and page size {}",
        WIRE_VERSION,
        PAGE_SIZE
    )]
    BadStart {
        /// The version it announced.
        version: u32,
        /// The page size it announced.
        page_size: u64,
    },
    /// A frame of an unknown kind.
    #[error("frame {frame} has unknown kind {kind}")]
    UnknownFrame {
        /// Its kind.
        kind: u32,
        /// Its position in the stream (frames counted from 0).
        frame: u64,
    },
    /// A page or zero run that is not page aligned, has no pages, or lies (partly) outside
    /// the destination's memory.
    #[error("frame of {count} pages at {gpa:#x} is not aligned or not in guest memory")]
    BadRange {
        /// The frame's address.
        gpa: u64,
        /// Its page count.
        count: u32,
    },
    /// Writing destination memory failed.
    #[error("writing guest memory at {gpa:#x} failed")]
    Memory {
        /// Where.
        gpa: u64,
    },
}

/// What a destination received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReceiveStats {
    /// Page frames applied.
    pub pages: u64,
    /// Zero pages announced (in runs).
    pub zero_pages: u64,
    /// Zero pages that had to be written because the page had received data before.
    pub zero_pages_written: u64,
    /// End-of-iteration frames seen.
    pub iterations: u32,
    /// Bytes read.
    pub bytes: u64,
}

/// The destination side: applies a precopy stream to guest memory.
///
/// The memory must start zeroed (freshly mapped), as a destination VM's does: a zero page
/// is only written over a page that received data earlier in the stream.
#[derive(Debug)]
pub struct Receiver<'a, M: GuestMemoryBackend> {
    mem: &'a M,
    /// Pages that hold data received earlier in this stream.
    written: MigrationBitmap,
    stats: ReceiveStats,
}

impl<'a, M: GuestMemoryBackend> Receiver<'a, M> {
    /// A receiver writing into `mem`.
    ///
    /// # Errors
    ///
    /// When `mem`'s regions cannot be tracked (see [`MigrationBitmap::new`]).
    pub fn new(mem: &'a M) -> Result<Self, virtio_balloon::migration::Error> {
        Ok(Receiver {
            mem,
            written: MigrationBitmap::new(mem)?,
            stats: ReceiveStats::default(),
        })
    }

    /// Counters so far.
    pub fn stats(&self) -> ReceiveStats {
        self.stats
    }

    /// Whether `[gpa, gpa + count pages)` is page aligned, not empty, and wholly inside
    /// guest memory. Returns its length in bytes.
    fn check(&self, gpa: u64, count: u32) -> Result<u64, WireError> {
        let bad = || WireError::BadRange { gpa, count };
        if count == 0 || gpa % PAGE_SIZE != 0 {
            return Err(bad());
        }
        let len = u64::from(count).checked_mul(PAGE_SIZE).ok_or_else(bad)?;
        let len_usize = usize::try_from(len).map_err(|_| bad())?;
        gpa.checked_add(len).ok_or_else(bad)?;
        if !self.mem.check_range(GuestAddress(gpa), len_usize) {
            return Err(bad());
        }
        Ok(len)
    }

    /// Reads frames from `input` and applies them until the end-of-stream frame.
    ///
    /// # Errors
    ///
    /// [`WireError`]: a read failure or early end, a bad start, an unknown frame, or a page
    /// outside memory. Memory written before the error stays written.
    pub fn receive<R: Read>(&mut self, mut input: R) -> Result<ReceiveStats, WireError> {
        let mut page = [0u8; WIRE_PAGE_SIZE];
        let mut frame = 0u64;
        loop {
            let mut h = [0u8; FRAME_HEADER_LEN];
            input.read_exact(&mut h)?;
            self.stats.bytes += FRAME_HEADER_LEN as u64;
            let mut word = [0u8; 4];
            word.copy_from_slice(&h[0..4]);
            let kind = u32::from_le_bytes(word);
            word.copy_from_slice(&h[4..8]);
            let count = u32::from_le_bytes(word);
            let mut dword = [0u8; 8];
            dword.copy_from_slice(&h[8..16]);
            let gpa = u64::from_le_bytes(dword);
            if frame == 0 && (kind != kind::START || count != WIRE_VERSION || gpa != PAGE_SIZE) {
                return Err(WireError::BadStart {
                    version: count,
                    page_size: gpa,
                });
            }
            match kind {
                kind::START if frame == 0 => {}
                kind::PAGE => {
                    if count != 1 {
                        return Err(WireError::BadRange { gpa, count });
                    }
                    self.check(gpa, 1)?;
                    input.read_exact(&mut page)?;
                    self.stats.bytes += WIRE_PAGE_SIZE as u64;
                    self.mem
                        .write_slice(&page, GuestAddress(gpa))
                        .map_err(|_| WireError::Memory { gpa })?;
                    self.written.mark_dirty(GuestAddress(gpa), PAGE_SIZE);
                    self.stats.pages += 1;
                }
                kind::ZERO => {
                    self.check(gpa, count)?;
                    self.stats.zero_pages += u64::from(count);
                    // Only pages that received data need zeroing; the bitmap yields them.
                    let end = gpa + u64::from(count) * PAGE_SIZE;
                    let zeros = [0u8; WIRE_PAGE_SIZE];
                    let stale = self
                        .written
                        .iter_dirty_from(GuestAddress(gpa))
                        .take_while(|a| a.0 < end);
                    for addr in stale {
                        self.mem
                            .write_slice(&zeros, addr)
                            .map_err(|_| WireError::Memory { gpa: addr.0 })?;
                        self.written.test_and_clear(addr);
                        self.stats.zero_pages_written += 1;
                    }
                }
                kind::END_ITERATION => self.stats.iterations += 1,
                kind::END => return Ok(self.stats),
                _ => return Err(WireError::UnknownFrame { kind, frame }),
            }
            frame += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(len: usize) -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)]).unwrap()
    }

    fn page_of(b: u8) -> [u8; WIRE_PAGE_SIZE] {
        [b; WIRE_PAGE_SIZE]
    }

    #[test]
    fn a_stream_round_trips_and_zero_runs_merge() {
        let mut w = FrameWriter::new(Vec::new());
        w.start().unwrap();
        w.page(GuestAddress(0x1000), &page_of(7)).unwrap();
        w.zero_page(GuestAddress(0x2000)).unwrap();
        w.zero_page(GuestAddress(0x3000)).unwrap();
        w.zero_page(GuestAddress(0x4000)).unwrap();
        w.zero_page(GuestAddress(0x8000)).unwrap();
        w.end_iteration(1).unwrap();
        // A page that received data and is then sent as zero is zeroed.
        w.zero_page(GuestAddress(0x1000)).unwrap();
        w.page(GuestAddress(0x5000), &page_of(9)).unwrap();
        w.end().unwrap();
        let bytes = w.bytes();
        let stream = w.into_inner();
        // start, page, zero run of 3, zero run of 1, end iteration, zero, page, end.
        assert_eq!(stream.len() as u64, bytes);
        assert_eq!(bytes, 8 * 16 + 2 * 4096);

        let m = mem(0x10000);
        m.write_slice(&page_of(0), GuestAddress(0)).unwrap();
        let mut r = Receiver::new(&m).unwrap();
        let stats = r.receive(&stream[..]).unwrap();
        assert_eq!(
            stats,
            ReceiveStats {
                pages: 2,
                zero_pages: 5,
                zero_pages_written: 1,
                iterations: 1,
                bytes,
            }
        );
        let mut got = [0u8; WIRE_PAGE_SIZE];
        m.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(got, page_of(0));
        m.read_slice(&mut got, GuestAddress(0x5000)).unwrap();
        assert_eq!(got, page_of(9));
    }

    fn frame(kind: u32, count: u32, gpa: u64) -> Vec<u8> {
        let mut v = kind.to_le_bytes().to_vec();
        v.extend_from_slice(&count.to_le_bytes());
        v.extend_from_slice(&gpa.to_le_bytes());
        v
    }

    fn receive(frames: &[Vec<u8>]) -> Result<ReceiveStats, WireError> {
        let m = mem(0x10000);
        let stream: Vec<u8> = frames.concat();
        Receiver::new(&m).unwrap().receive(&stream[..])
    }

    #[test]
    fn a_hostile_stream_is_refused_without_writing_outside_memory() {
        let start = frame(1, WIRE_VERSION, PAGE_SIZE);
        let cases: Vec<(Vec<Vec<u8>>, &str)> = vec![
            (vec![frame(1, 2, PAGE_SIZE)], "stream starts with version 2"),
            (
                vec![frame(2, 1, 0)],
                "stream starts with version 1 and page size 0",
            ),
            (
                vec![start.clone(), frame(9, 0, 0)],
                "frame 1 has unknown kind 9",
            ),
            (
                vec![start.clone(), frame(1, WIRE_VERSION, PAGE_SIZE)],
                "frame 1 has unknown kind 1",
            ),
            (
                vec![start.clone(), frame(2, 1, 0x10000)],
                "frame of 1 pages at 0x10000",
            ),
            (
                vec![start.clone(), frame(2, 2, 0)],
                "frame of 2 pages at 0x0",
            ),
            (
                vec![start.clone(), frame(2, 1, 0x800)],
                "frame of 1 pages at 0x800",
            ),
            (
                vec![start.clone(), frame(3, 0, 0)],
                "frame of 0 pages at 0x0",
            ),
            (
                vec![start.clone(), frame(3, u32::MAX, 0)],
                "frame of 4294967295 pages at 0x0",
            ),
            (
                vec![start.clone(), frame(3, 2, u64::MAX - 0xfff)],
                "frame of 2 pages at 0xfffffffffffff000",
            ),
            (vec![start.clone(), frame(2, 1, 0)], "reading the migration"),
            (vec![start.clone()], "reading the migration"),
        ];
        for (frames, want) in cases {
            let err = receive(&frames).unwrap_err();
            assert!(
                err.to_string().contains(want),
                "{err} does not contain {want}"
            );
        }
        let ok = receive(&[start, frame(3, 16, 0), frame(5, 0, 0)]).unwrap();
        assert_eq!(ok.zero_pages, 16);
        let m = mem(0x10000);
        let rx = Receiver::new(&m).unwrap();
        assert_eq!(rx.stats(), ReceiveStats::default());
        use std::error::Error as _;
        assert!(WireError::Io(io::ErrorKind::UnexpectedEof.into())
            .source()
            .is_some());
        assert!(WireError::Memory { gpa: 0 }.source().is_none());
        assert!(WireError::Io(io::ErrorKind::UnexpectedEof.into())
            .to_string()
            .contains("reading"));
        assert!(WireError::Memory { gpa: 0x1000 }
            .to_string()
            .contains("0x1000"));
    }

    #[test]
    fn zero_runs_stop_at_gaps_and_at_the_count_limit() {
        let mut w = FrameWriter::new(Vec::new());
        w.zero_page(GuestAddress(0)).unwrap();
        assert_eq!(w.bytes(), 16);
        w.zero_run = Some((0, u32::MAX));
        w.zero_page(GuestAddress(u64::from(u32::MAX) * PAGE_SIZE))
            .unwrap();
        assert_eq!(w.zero_run, Some((u64::from(u32::MAX) * PAGE_SIZE, 1)));
        w.zero_run = Some((u64::MAX - PAGE_SIZE + 1, 1));
        w.zero_page(GuestAddress(0)).unwrap();
        assert_eq!(w.zero_run, Some((0, 1)));
        w.flush().unwrap();
        assert_eq!(w.into_inner().len(), 48);
    }
}
