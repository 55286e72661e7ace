// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device side of the virtio memory balloon for rust-vmm based VMMs, built around free
//! page hinting (`VIRTIO_BALLOON_F_FREE_PAGE_HINT`).

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod bitmap;
pub mod sink;
pub mod spec;
