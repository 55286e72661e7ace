// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Free page hint rounds end to end: the Linux driver model against the device behind
//! virtio-mmio and an event loop, real Linux captures replayed descriptor by descriptor, and
//! the handover of live queues from a VMM.

mod handover;
mod rounds;
mod trace_replay;
