// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The traditional balloon: inflate and deflate, deflate on OOM, free page reporting, and
//! guest memory that changes under the device (hotplug).

mod driver_model;
mod edge_cases;
mod end_to_end;
mod memory_hotplug;
