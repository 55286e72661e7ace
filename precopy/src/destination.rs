// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Where the pages of a copy go: a migration stream or a snapshot file.

use std::io::{self, Write};

use vm_memory::GuestAddress;

use crate::wire::{FrameWriter, WIRE_PAGE_SIZE};

/// The destination of a copy of guest memory: what [`Precopy`](crate::Precopy) writes the
/// pages it sends to.
///
/// The loop calls [`start`](Self::start) once, then [`page`](Self::page) and
/// [`zero_page`](Self::zero_page) for every page it sends, in ascending address order within
/// an iteration, [`end_iteration`](Self::end_iteration) after each iteration (the final
/// stage included) and [`end`](Self::end) once, after the final stage. A page may be sent
/// again in a later iteration: the later call replaces what the earlier one wrote.
///
/// Two destinations come with the crate: the [`wire`](crate::wire) stream
/// ([`FrameWriter`], to any `Write`) and the sparse snapshot file
/// ([`SnapshotWriter`](crate::snapshot::SnapshotWriter)).
pub trait PageDestination {
    /// Called once before the first page.
    ///
    /// # Errors
    ///
    /// Whatever writing failed with; the copy fails.
    fn start(&mut self) -> io::Result<()>;

    /// The page at guest physical address `gpa` holds `data`.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    fn page(&mut self, gpa: GuestAddress, data: &[u8; WIRE_PAGE_SIZE]) -> io::Result<()>;

    /// The page at `gpa` holds only zeros.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    fn zero_page(&mut self, gpa: GuestAddress) -> io::Result<()>;

    /// Iteration `iteration` (1 for the first pass) is complete.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    fn end_iteration(&mut self, iteration: u32) -> io::Result<()>;

    /// The copy is complete: every page the destination must hold was given.
    ///
    /// # Errors
    ///
    /// As for [`start`](Self::start).
    fn end(&mut self) -> io::Result<()>;

    /// Bytes the destination has written so far: stream bytes for a stream, page bytes
    /// for a file.
    fn bytes(&self) -> u64;
}

impl<W: Write> PageDestination for FrameWriter<W> {
    fn start(&mut self) -> io::Result<()> {
        FrameWriter::start(self)
    }

    fn page(&mut self, gpa: GuestAddress, data: &[u8; WIRE_PAGE_SIZE]) -> io::Result<()> {
        FrameWriter::page(self, gpa, data)
    }

    fn zero_page(&mut self, gpa: GuestAddress) -> io::Result<()> {
        FrameWriter::zero_page(self, gpa)
    }

    fn end_iteration(&mut self, iteration: u32) -> io::Result<()> {
        FrameWriter::end_iteration(self, iteration)
    }

    fn end(&mut self) -> io::Result<()> {
        FrameWriter::end(self)
    }

    fn bytes(&self) -> u64 {
        FrameWriter::bytes(self)
    }
}
