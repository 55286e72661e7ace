// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Why a snapshot could not be written or read.

use std::io;
use std::path::PathBuf;

use vm_memory::GuestAddress;

use crate::precopy::PrecopyError;

/// Why a snapshot could not be written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The memory file or its description exists and overwriting was not asked for.
    #[error("{} exists (pass overwrite to replace it)", .path.display())]
    Exists {
        /// The path found.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The copy failed (the guest was resumed if it had been stopped).
    #[error("the copy failed: {0}")]
    Copy(#[source] PrecopyError),
    /// The regions cannot be laid out in a file.
    #[error("bad snapshot layout: {0}")]
    Layout(String),
    /// The memory file has no description: its copy did not finish.
    #[error("{} is not a complete snapshot (no description beside it)", .path.display())]
    Incomplete {
        /// The memory file.
        path: PathBuf,
    },
    /// The description is damaged or is not one.
    #[error("bad snapshot description: {0}")]
    BadDescription(String),
    /// The description has a version this crate does not read.
    #[error("snapshot description version {found}, this crate reads version {supported}")]
    Version {
        /// The version found.
        found: u32,
        /// The version this crate reads.
        supported: u32,
    },
    /// The memory file is shorter than its description says.
    #[error("{} holds {len} bytes, its description needs {expected}", .path.display())]
    Truncated {
        /// The memory file.
        path: PathBuf,
        /// Its length.
        len: u64,
        /// The length the description needs.
        expected: u64,
    },
    /// The guest memory does not have the snapshot's regions.
    #[error("the guest memory's regions {found:x?} are not the snapshot's {expected:x?}")]
    LayoutMismatch {
        /// The snapshot's regions, `(start, length)`.
        expected: Vec<(GuestAddress, u64)>,
        /// The memory's regions.
        found: Vec<(GuestAddress, u64)>,
    },
}
