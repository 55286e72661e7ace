// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `bitmap_offset` fuzz target: decodes an input and runs it (see
//! `virtio_balloon_fuzz::bitmap_offset` for what it drives and checks).

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_balloon_fuzz::input::bitmap_offset::Input;

fuzz_target!(|input: Input| {
    virtio_balloon_fuzz::bitmap_offset::run(&input);
});
