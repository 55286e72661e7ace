// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the device-level fuzz targets (`hint_desc`, `balloon_device`) share: the guest memory
//! layout they generate, the split-ring descriptors a guest model writes and a reference
//! walker reads, and the free page hint commands and recording sink.
//!
//! The `Arbitrary` types here are part of the targets' inputs: changing a field's order or
//! type changes what existing corpora mean.

#![deny(missing_docs)]

pub mod desc;
pub mod hint;
pub mod layout;
