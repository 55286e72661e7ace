// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Property tests of the migration side: the migration bitmap, and the counting bitmap and
//! bit counting functions under it, each against a naive model.

mod counting_bitmap;
mod migration_bitmap;
