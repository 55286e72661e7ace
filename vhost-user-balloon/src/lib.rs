// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A vhost-user daemon that serves the `virtio-balloon` device to any vhost-user frontend
//! (User-Mode Linux's `virtio_uml`, QEMU's `vhost-user-device`, Cloud Hypervisor's generic
//! vhost-user device), with a JSON control socket.

#![deny(missing_docs)]

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Guest memory as the daemon maps it: the frontend's memory table, replaced in place on
/// every `SET_MEM_TABLE`.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

pub mod admit;
pub mod daemon;
pub mod device;
pub mod discard;
pub mod guard;
pub mod notify;
pub mod vring;

pub mod capture;
pub mod control;
pub mod copy;
pub mod options;
pub mod shim;
