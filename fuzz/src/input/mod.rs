// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The input formats of the fuzz targets, one module per target. Each target's `Input` is
//! decoded from libFuzzer's bytes with `arbitrary` (`Input::arbitrary_take_rest`).

pub mod balloon_device;
pub mod bitmap_offset;
pub mod encode;
pub mod hint_desc;
