// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The `balloon_device` fuzz target: decodes an input and runs it (see
//! `virtio_balloon_fuzz::balloon_device` for what it drives and checks).

#![no_main]

use libfuzzer_sys::fuzz_target;
use virtio_balloon_fuzz::input::balloon_device::Input;

fuzz_target!(|input: Input| {
    virtio_balloon_fuzz::balloon_device::run(&input);
});
