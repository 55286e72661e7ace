// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The fuzz targets of virtio-balloon, as a library: each target in `fuzz_targets/` only
//! decodes its input ([`input`]) and calls its module's `run` ([`bitmap_offset`],
//! [`hint_desc`], [`balloon_device`]), which builds the device, drives it and checks it
//! against a model. The shared pieces: the guest memory layout ([`layout`]), the split-ring
//! descriptors a guest writes and a reference walker reads ([`desc`]), the driver-side ring
//! writer over `guest_model::ring` ([`ring`]) and the free page hint commands and recording
//! sink ([`hint`]).
//!
//! The `Arbitrary` types of [`input`] (and those of `layout`, `desc` and `hint` they use)
//! are the targets' input formats: changing a field's order or type changes what existing
//! corpora mean. [`corpus`] builds a small seed corpus for each target.

#![deny(missing_docs)]

pub mod balloon_device;

pub mod bitmap_offset;
pub mod corpus;
pub mod desc;
pub mod hint;
pub mod hint_desc;
pub mod input;
pub mod layout;
pub mod ring;
