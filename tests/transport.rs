// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The balloon behind the virtio-mmio transport, driven the way a guest driver and a VMM
//! drive it: raw register accesses, rings laid out in guest memory, queue and interrupt
//! eventfds, an `EventManager` on the test thread and the precopy notifier chain.

use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use guest_model::ring::{Desc, GuestMem, Part, SplitRing, VRING_DESC_F_NEXT};
use virtio_balloon::defs::features as f;
use virtio_balloon::migration::{MigrationState, PrecopyEvent, PrecopyNotifierChain};
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::{MmioTransport, VirtioDevice};
use virtio_balloon::{
    Balloon, BalloonConfig, BalloonError, FreePageHinting, HintState, QueueLayout, QueueRole,
};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

type Mem = GuestMem;
type Dev = Balloon<Arc<Mem>>;
type Mmio = MmioTransport<Dev>;
type Loop = EventManager<Arc<Mutex<Mmio>>>;

/// Where the buffers the tests post live (the rings sit below it).
const BUF_BASE: u64 = 0x20_0000;
/// Hang guard for blocking event loop runs.
const TIMEOUT_MS: i32 = 5000;

/// The guest model's virtio-mmio definitions, written independently of the crate's constants.
use guest_model::bring_up::{
    bring_up_rings, config_read32, config_with, device_features, negotiate, post_command,
    program_ring, read32 as rd, ring_at, ring_for, take_irq, write32 as wr, write_driver_features,
    RawRig, RAW_RIG_MEM_SIZE as MEM_SIZE,
};
use guest_model::mmio as guest_mmio;

/// virtio-mmio version 2 register offsets (virtio 1.x, 4.2.2).
mod reg {
    pub use super::guest_mmio::reg::*;

    /// The registers a driver may read.
    pub const READABLE: [u64; 10] = [
        MAGIC,
        VERSION,
        DEVICE_ID,
        VENDOR_ID,
        DEVICE_FEATURES,
        QUEUE_NUM_MAX,
        QUEUE_READY,
        INTERRUPT_STATUS,
        STATUS,
        CONFIG_GENERATION,
    ];
}

/// Device status bits (virtio 1.x, 2.1).
mod st {
    pub const ACK: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
    pub const NEGOTIATED: u32 = ACK | DRIVER | FEATURES_OK;
    pub const LIVE: u32 = NEGOTIATED | DRIVER_OK;
}

/// Interrupt status bits.
const ISR_USED: u32 = 1;
const ISR_CONFIG: u32 = 2;

/// Balloon config space offsets.
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;
const CFG_CMD_ID: u64 = 8;
const CFG_POISON: u64 = 12;

fn bit(n: u32) -> u64 {
    1u64 << n
}

const VERSION_1: u32 = 32;
const EVENT_IDX: u32 = 29;

// ---------------------------------------------------------------------------------------
// Setup helpers
// ---------------------------------------------------------------------------------------

/// Fresh guest memory the size of a rig's.
fn memory() -> Arc<Mem> {
    Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

/// Every optional feature offered, including reporting.
fn all_features() -> BalloonConfig {
    config_with(|c| {
        c.must_tell_host = true;
        c.stats = true;
        c.deflate_on_oom = true;
        c.free_page_hint = true;
        c.page_poison = true;
        c.reporting = true;
    })
}

/// What the tests do with a ring: program it, post buffers (descriptors are never reclaimed:
/// no test posts more chains than a queue has entries) and read the used ring.
trait TestRing {
    /// Selects queue `index` and programs size, addresses and ready.
    fn program(&self, t: &mut Mmio, index: u32);
    /// Posts a chain of `(addr, len, device_writable)` parts. Returns its head.
    fn post(&mut self, mem: &Mem, parts: &[(u64, u32, bool)]) -> u16;
    /// Posts one descriptor whose NEXT points back at itself (a loop).
    fn post_looped(&mut self, mem: &Mem, addr: u64) -> u16;
    /// Posts a one-descriptor device-readable buffer.
    fn post_out(&mut self, mem: &Mem, addr: u64, len: u32) -> u16;
    /// The device's used index.
    fn used(&self, mem: &Mem) -> u16;
    /// The used element at position `i`: (id, len).
    fn elem(&self, mem: &Mem, i: u16) -> (u32, u32);
}

impl TestRing for SplitRing {
    fn program(&self, t: &mut Mmio, index: u32) {
        program_ring(t, index as usize, self, true);
    }

    fn post(&mut self, mem: &Mem, parts: &[(u64, u32, bool)]) -> u16 {
        let parts: Vec<Part> = parts
            .iter()
            .map(|&(addr, len, writable)| Part {
                addr: GuestAddress(addr),
                len,
                writable,
            })
            .collect();
        self.add(mem, &parts, false, 0).unwrap()
    }

    fn post_looped(&mut self, mem: &Mem, addr: u64) -> u16 {
        let ids = self.alloc(1).unwrap();
        let d = Desc::new(addr, 8, VRING_DESC_F_NEXT, ids[0]);
        self.write_desc_raw(mem, ids[0], d).unwrap();
        self.publish_chain(mem, &ids, 0).unwrap()
    }

    fn post_out(&mut self, mem: &Mem, addr: u64, len: u32) -> u16 {
        self.post(mem, &[(addr, len, false)])
    }

    fn used(&self, mem: &Mem) -> u16 {
        self.used_idx(mem).unwrap()
    }

    fn elem(&self, mem: &Mem, i: u16) -> (u32, u32) {
        self.used_elem(mem, i).unwrap()
    }
}

/// Reads and clears queue `index`'s eventfd (0 when it was not signalled).
fn take_queue_evt(t: &Mmio, index: usize) -> u64 {
    t.device().queue_event(index).unwrap().read().unwrap_or(0)
}

fn event_loop(t: Mmio) -> (Loop, Arc<Mutex<Mmio>>) {
    let shared = Arc::new(Mutex::new(t));
    let mut em: Loop = EventManager::new().unwrap();
    em.add_subscriber(shared.clone());
    (em, shared)
}

/// Runs the loop without blocking until no event is ready (bounded).
fn settle(em: &mut Loop) {
    for _ in 0..1000 {
        if em.run_with_timeout(0).unwrap() == 0 {
            return;
        }
    }
    panic!("the event loop never went idle");
}

const RUNNING: MigrationState = MigrationState {
    vm_running: true,
    postcopy: false,
};
const STOPPED: MigrationState = MigrationState {
    vm_running: false,
    postcopy: false,
};

// ---------------------------------------------------------------------------------------
// Register reads
// ---------------------------------------------------------------------------------------

use guest_model::log as log_all;
use log_all::log_everything;

#[test]
fn identity_registers() {
    let r = RawRig::new(BalloonConfig::default());
    assert_eq!(rd(&r.t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&r.t, reg::VERSION), 2);
    assert_eq!(rd(&r.t, reg::DEVICE_ID), 5);
    assert_eq!(rd(&r.t, reg::VENDOR_ID), 0);
    assert_eq!(r.t.device().device_type(), 5);
}

#[test]
fn device_features_pages() {
    for cfg in [
        BalloonConfig::default(),
        all_features(),
        config_with(|c| {
            c.stats = false;
            c.free_page_hint = false;
            c.page_poison = false;
        }),
    ] {
        let mut r = RawRig::new(cfg);
        let offered = cfg.device_features();
        wr(&mut r.t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&r.t, reg::DEVICE_FEATURES), offered as u32);
        wr(&mut r.t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&r.t, reg::DEVICE_FEATURES), (offered >> 32) as u32);
        assert_eq!(
            rd(&r.t, reg::DEVICE_FEATURES),
            1,
            "page 1 is VERSION_1 only"
        );
        wr(&mut r.t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&r.t, reg::DEVICE_FEATURES), 0);
        wr(&mut r.t, reg::DEVICE_FEATURES_SEL, u32::MAX);
        assert_eq!(rd(&r.t, reg::DEVICE_FEATURES), 0);

        // The balloon bits follow the configuration.
        for (on, b) in [
            (cfg.must_tell_host, 0),
            (cfg.stats, 1),
            (cfg.deflate_on_oom, 2),
            (cfg.free_page_hint, 3),
            (cfg.page_poison, 4),
            (cfg.reporting, 5),
        ] {
            assert_eq!(offered & bit(b) != 0, on, "feature bit {b}");
        }
        assert_ne!(offered & bit(VERSION_1), 0);
        assert_eq!(
            f::bit(virtio_bindings::virtio_config::VIRTIO_F_VERSION_1),
            bit(VERSION_1)
        );
        assert_eq!(offered & bit(33), 0, "ACCESS_PLATFORM is never offered");
        assert_eq!(device_features(&mut r.t), offered);
    }
}

#[test]
fn queue_num_max_per_queue_and_zero_past_last() {
    let cfg = config_with(|c| {
        c.reporting = true;
        c.queue_size = 128;
        c.free_page_queue_size = 512;
        c.reporting_queue_size = 64;
    });
    let mut r = RawRig::new(cfg);
    let expected = [128, 128, 128, 512, 64];
    for (i, &size) in expected.iter().enumerate() {
        wr(&mut r.t, reg::QUEUE_SEL, i as u32);
        assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), size, "queue {i}");
    }
    for past in [5, 6, 0x100, u32::MAX] {
        wr(&mut r.t, reg::QUEUE_SEL, past);
        assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 0, "queue {past}");
        assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
    }

    // The defaults: 256 for inflate/deflate/stats, 1024 for the free page queue.
    let mut r = RawRig::new(BalloonConfig::default());
    for (i, size) in [256, 256, 256, 1024, 0].into_iter().enumerate() {
        wr(&mut r.t, reg::QUEUE_SEL, i as u32);
        assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), size, "queue {i}");
    }
}

#[test]
fn queue_ready_reads_back_per_queue() {
    let mut r = RawRig::new(BalloonConfig::default());
    assert!(negotiate(&mut r.t, r.ack));
    for i in 0..4 {
        wr(&mut r.t, reg::QUEUE_SEL, i);
        assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
    }
    ring_for(&r.mem, 1, 16).program(&mut r.t, 1);
    wr(&mut r.t, reg::QUEUE_SEL, 0);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
    wr(&mut r.t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 1);
    assert!(r.t.device().queue(1).unwrap().ready());
    wr(&mut r.t, reg::QUEUE_READY, 0);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
    // Only 1 means ready.
    wr(&mut r.t, reg::QUEUE_READY, 2);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
    wr(&mut r.t, reg::QUEUE_READY, 1);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 1);

    // The free page queue stays readable after activation (the event loop owns it).
    ring_for(&r.mem, 3, 16).program(&mut r.t, 3);
    wr(&mut r.t, reg::STATUS, st::LIVE);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);
    wr(&mut r.t, reg::QUEUE_SEL, 3);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 1);
    assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 1024);
    wr(&mut r.t, reg::QUEUE_SEL, 1);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 1);
    wr(&mut r.t, reg::QUEUE_SEL, 2);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 0);
}

#[test]
fn status_and_interrupt_status_and_generation_read_back() {
    let mut r = RawRig::new(BalloonConfig::default());
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(rd(&r.t, reg::CONFIG_GENERATION), 0);
    wr(&mut r.t, reg::STATUS, st::ACK);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK);
    assert_eq!(u32::from(r.t.status()), st::ACK);

    let acked = r.ack;
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    write_driver_features(&mut r.t, acked);
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED);
    wr(&mut r.t, reg::STATUS, st::LIVE);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);

    let irq = r.t.device().interrupt_handle();
    irq.signal_used_queue();
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED);
    r.hints.start_round();
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED | ISR_CONFIG);
    assert_eq!(rd(&r.t, reg::CONFIG_GENERATION), 1);
    assert_eq!(
        rd(&r.t, reg::CONFIG_GENERATION),
        r.t.device().interrupt().config_generation()
    );
}

// ---------------------------------------------------------------------------------------
// The status state machine
// ---------------------------------------------------------------------------------------

#[test]
fn status_accepts_only_legal_one_step_transitions() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;

    // From RESET only ACKNOWLEDGE.
    for bad in [
        st::DRIVER,
        st::FEATURES_OK,
        st::DRIVER_OK,
        st::NEEDS_RESET,
        st::ACK | st::DRIVER,
        st::LIVE,
    ] {
        wr(&mut r.t, reg::STATUS, bad);
        assert_eq!(rd(&r.t, reg::STATUS), 0, "status {bad:#x} from 0");
    }
    wr(&mut r.t, reg::STATUS, st::ACK);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK);
    // Rewriting the same value is harmless.
    wr(&mut r.t, reg::STATUS, st::ACK);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK);

    // From ACK only DRIVER.
    for bad in [
        st::ACK | st::FEATURES_OK,
        st::ACK | st::DRIVER_OK,
        st::ACK | st::DRIVER | st::FEATURES_OK,
        st::DRIVER,
    ] {
        wr(&mut r.t, reg::STATUS, bad);
        assert_eq!(rd(&r.t, reg::STATUS), st::ACK, "status {bad:#x} from ACK");
    }
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK | st::DRIVER);
    write_driver_features(&mut r.t, acked);

    // From ACK|DRIVER only FEATURES_OK; DRIVER_OK may not skip it; bits may not be cleared.
    for bad in [
        st::ACK | st::DRIVER | st::DRIVER_OK,
        st::LIVE,
        st::ACK,
        st::DRIVER | st::FEATURES_OK,
        st::ACK | st::DRIVER | st::NEEDS_RESET,
    ] {
        wr(&mut r.t, reg::STATUS, bad);
        assert_eq!(
            rd(&r.t, reg::STATUS),
            st::ACK | st::DRIVER,
            "status {bad:#x} from ACK|DRIVER"
        );
    }
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED);
    assert_eq!(rd(&r.t, reg::STATUS), st::NEGOTIATED);

    // From ACK|DRIVER|FEATURES_OK only DRIVER_OK.
    for bad in [
        st::ACK | st::DRIVER,
        st::ACK | st::FEATURES_OK | st::DRIVER_OK,
    ] {
        wr(&mut r.t, reg::STATUS, bad);
        assert_eq!(rd(&r.t, reg::STATUS), st::NEGOTIATED, "status {bad:#x}");
    }
    assert!(!r.t.device().is_activated());
    wr(&mut r.t, reg::STATUS, st::LIVE);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);
    assert!(r.t.device().is_activated());

    // Nothing more to add, nothing may be removed.
    for bad in [st::NEGOTIATED, st::LIVE | st::NEEDS_RESET, st::ACK] {
        wr(&mut r.t, reg::STATUS, bad);
        assert_eq!(rd(&r.t, reg::STATUS), st::LIVE, "status {bad:#x} from LIVE");
    }
    assert!(r.t.device().is_activated());

    // Values wider than a byte are ignored, not truncated into a reset.
    wr(&mut r.t, reg::STATUS, 0x100);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);
    assert!(r.t.device().is_activated());
}

#[test]
fn failed_status_is_sticky_and_blocks_negotiation() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;
    wr(&mut r.t, reg::STATUS, st::ACK);
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER | st::FAILED);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK | st::DRIVER | st::FAILED);

    // FAILED blocks the driver features, FEATURES_OK and config writes.
    write_driver_features(&mut r.t, acked);
    assert_eq!(r.t.device().driver_features(), 0);
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED | st::FAILED);
    assert_eq!(rd(&r.t, reg::STATUS) & st::FEATURES_OK, 0);
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED);
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK | st::DRIVER | st::FAILED);
    wr(&mut r.t, reg::CONFIG + CFG_ACTUAL, 77);
    assert_eq!(r.t.device().actual(), 0);

    // FAILED may be written from any state, even RESET.
    wr(&mut r.t, reg::STATUS, 0);
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    wr(&mut r.t, reg::STATUS, st::FAILED);
    assert_eq!(rd(&r.t, reg::STATUS), st::FAILED);
    wr(&mut r.t, reg::STATUS, st::ACK);
    assert_eq!(rd(&r.t, reg::STATUS), st::FAILED);

    // FAILED after FEATURES_OK blocks the queue registers.
    wr(&mut r.t, reg::STATUS, 0);
    assert!(negotiate(&mut r.t, acked));
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED | st::FAILED);
    assert_eq!(rd(&r.t, reg::STATUS), st::NEGOTIATED | st::FAILED);
    ring_for(&r.mem, 0, 16).program(&mut r.t, 0);
    let q = r.t.device().queue(0).unwrap();
    assert!(!q.ready());
    assert_eq!(q.desc_table(), 0);
    assert_eq!(q.size(), 256);
    wr(&mut r.t, reg::STATUS, st::LIVE | st::FAILED);
    assert!(!r.t.device().is_activated());
    assert_eq!(rd(&r.t, reg::STATUS) & st::DRIVER_OK, 0);

    // Reset clears FAILED.
    wr(&mut r.t, reg::STATUS, 0);
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    bring_up_rings(&mut r.t, acked, &[]);
}

#[test]
fn status_zero_resets_everything_but_num_pages() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;
    assert_ne!(acked & bit(4), 0, "PAGE_POISON is acked");
    let ring0 = ring_for(&r.mem, 0, 16);
    let ring3 = ring_for(&r.mem, 3, 64);
    assert!(negotiate(&mut r.t, acked));
    ring0.program(&mut r.t, 0);
    ring3.program(&mut r.t, 3);
    wr(&mut r.t, reg::CONFIG + CFG_ACTUAL, 0x1234);
    wr(&mut r.t, reg::CONFIG + CFG_POISON, 0xaaaa_aaaa);
    wr(&mut r.t, reg::STATUS, st::LIVE);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);
    r.hints.start_round();
    assert_eq!(r.t.device().actual(), 0x1234);
    assert_eq!(r.t.device().poison_val(), 0xaaaa_aaaa);
    assert_eq!(r.t.device().driver_features(), acked);
    let num_pages = r.t.device().num_pages();

    // Leave every selector away from 0.
    wr(&mut r.t, reg::DEVICE_FEATURES_SEL, 1);
    wr(&mut r.t, reg::DRIVER_FEATURES_SEL, 1);
    wr(&mut r.t, reg::QUEUE_SEL, 3);
    assert_eq!(rd(&r.t, reg::DEVICE_FEATURES), 1);
    assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 1024);

    wr(&mut r.t, reg::STATUS, 0);
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    assert!(!r.t.device().is_activated());
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
    // Selectors back to 0.
    assert_eq!(
        rd(&r.t, reg::DEVICE_FEATURES),
        BalloonConfig::default().device_features() as u32,
        "DeviceFeaturesSel reset"
    );
    assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 256, "QueueSel reset");
    // Features, queues and driver-owned config.
    assert_eq!(r.t.device().driver_features(), 0);
    for i in 0..4 {
        let q = r.t.device().queue(i).unwrap();
        assert!(!q.ready(), "queue {i} ready");
        assert_eq!(q.size(), q.max_size(), "queue {i} size");
        assert_eq!(
            (q.desc_table(), q.avail_ring(), q.used_ring()),
            (0, 0, 0),
            "queue {i} addresses"
        );
    }
    assert_eq!(r.t.device().actual(), 0);
    assert_eq!(r.t.device().poison_val(), 0);
    assert_eq!(config_read32(&r.t, CFG_ACTUAL), 0);
    assert_eq!(config_read32(&r.t, CFG_POISON), 0);
    assert_eq!(config_read32(&r.t, CFG_CMD_ID), 0, "the hint round stopped");
    // num_pages is the host's target and survives a guest reset.
    assert_eq!(r.t.device().num_pages(), num_pages);
    assert_eq!(config_read32(&r.t, CFG_NUM_PAGES), num_pages);

    // DriverFeaturesSel is back to 0: the next features write lands in page 0.
    wr(&mut r.t, reg::STATUS, st::ACK);
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    wr(&mut r.t, reg::DRIVER_FEATURES, 0x2);
    assert_eq!(
        r.t.device().driver_features(),
        0x2,
        "DriverFeaturesSel reset"
    );

    // The device comes back up.
    wr(&mut r.t, reg::STATUS, 0);
    bring_up_rings(&mut r.t, acked, &[(0, &ring0)]);
}

// ---------------------------------------------------------------------------------------
// Feature negotiation
// ---------------------------------------------------------------------------------------

#[test]
fn driver_features_ignored_before_driver() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;
    write_driver_features(&mut r.t, acked);
    assert_eq!(r.t.device().driver_features(), 0, "at RESET");
    wr(&mut r.t, reg::STATUS, st::ACK);
    write_driver_features(&mut r.t, acked);
    assert_eq!(r.t.device().driver_features(), 0, "at ACKNOWLEDGE");
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    write_driver_features(&mut r.t, acked);
    assert_eq!(r.t.device().driver_features(), acked, "at DRIVER");
    // Pages past 1 are ignored.
    wr(&mut r.t, reg::DRIVER_FEATURES_SEL, 2);
    wr(&mut r.t, reg::DRIVER_FEATURES, u32::MAX);
    assert_eq!(r.t.device().driver_features(), acked);
}

#[test]
fn driver_features_ignored_after_features_ok() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = bit(VERSION_1) | bit(1) | bit(3);
    assert!(negotiate(&mut r.t, acked));
    write_driver_features(&mut r.t, r.ack);
    assert_eq!(r.t.device().driver_features(), acked);
    wr(&mut r.t, reg::STATUS, st::LIVE);
    write_driver_features(&mut r.t, 0);
    assert_eq!(r.t.device().driver_features(), acked);
    assert!(r.t.device().has_feature(3));
    assert!(!r.t.device().has_feature(4));
}

#[test]
fn features_ok_refused_for_unoffered_bits() {
    // Default: REPORTING (5), DEFLATE_ON_OOM (2) and ACCESS_PLATFORM (33) are not offered.
    for extra in [bit(5), bit(2), bit(33), bit(63), bit(24)] {
        let mut r = RawRig::new(BalloonConfig::default());
        let acked = r.ack | extra;
        assert!(!negotiate(&mut r.t, acked), "extra {extra:#x} accepted");
        assert_eq!(rd(&r.t, reg::STATUS), st::ACK | st::DRIVER);
        // The driver may fix its features and try again.
        write_driver_features(&mut r.t, acked & !extra);
        wr(&mut r.t, reg::STATUS, st::NEGOTIATED);
        assert_eq!(rd(&r.t, reg::STATUS), st::NEGOTIATED);
    }
}

#[test]
fn features_ok_refused_without_version_1() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack & !bit(VERSION_1);
    assert!(!negotiate(&mut r.t, acked));
    assert_eq!(rd(&r.t, reg::STATUS), st::ACK | st::DRIVER);
    // And DRIVER_OK cannot skip FEATURES_OK to activate a legacy driver.
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER | st::DRIVER_OK);
    assert!(!r.t.device().is_activated());
    // No feature at all is refused too.
    let mut r = RawRig::new(BalloonConfig::default());
    assert!(!negotiate(&mut r.t, 0));
}

#[test]
fn features_ok_refused_when_an_optional_queue_is_dropped_before_an_acked_one() {
    let cfg = all_features();
    let v1 = bit(VERSION_1);
    let (stats, fph, rep) = (bit(1), bit(3), bit(5));
    for (acked, ok) in [
        (v1 | stats | fph | rep, true),
        (v1 | stats | fph, true),
        (v1 | stats, true),
        (v1, true),
        (v1 | bit(0) | bit(2) | bit(4), true),
        (v1 | fph | rep, false),
        (v1 | fph, false),
        (v1 | rep, false),
        (v1 | stats | rep, false),
    ] {
        let mut r = RawRig::new(cfg);
        assert_eq!(negotiate(&mut r.t, acked), ok, "acked {acked:#x}");
    }

    // A queue that is not offered leaves no hole: stats + reporting without FPH on offer.
    let cfg = config_with(|c| {
        c.free_page_hint = false;
        c.reporting = true;
    });
    let mut r = RawRig::new(cfg);
    assert!(negotiate(&mut r.t, v1 | stats | rep));
    let mut r = RawRig::new(cfg);
    assert!(!negotiate(&mut r.t, v1 | rep));
}

// ---------------------------------------------------------------------------------------
// Queue registers
// ---------------------------------------------------------------------------------------

fn queue_regs(t: &Mmio, index: usize) -> (bool, u16, u64, u64, u64) {
    let q = t.device().queue(index).unwrap();
    (
        q.ready(),
        q.size(),
        q.desc_table(),
        q.avail_ring(),
        q.used_ring(),
    )
}

#[test]
fn queue_registers_ignored_before_features_ok() {
    let mut r = RawRig::new(BalloonConfig::default());
    let ring = ring_at(&r.mem, 0x1_0000, 16);
    let pristine = (false, 256, 0, 0, 0);
    ring.program(&mut r.t, 0);
    assert_eq!(queue_regs(&r.t, 0), pristine, "at RESET");
    wr(&mut r.t, reg::STATUS, st::ACK);
    ring.program(&mut r.t, 0);
    assert_eq!(queue_regs(&r.t, 0), pristine, "at ACK");
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    ring.program(&mut r.t, 0);
    assert_eq!(queue_regs(&r.t, 0), pristine, "at DRIVER");
    write_driver_features(&mut r.t, r.ack);
    wr(&mut r.t, reg::STATUS, st::NEGOTIATED);
    ring.program(&mut r.t, 0);
    assert_eq!(
        queue_regs(&r.t, 0),
        (
            true,
            16,
            ring.layout.desc.0,
            ring.layout.avail.0,
            ring.layout.used.0,
        ),
        "at FEATURES_OK"
    );
}

#[test]
fn queue_registers_ignored_after_driver_ok() {
    let mut r = RawRig::new(BalloonConfig::default());
    let ring = ring_for(&r.mem, 0, 16);
    bring_up_rings(&mut r.t, r.ack, &[(0, &ring)]);
    let before0 = queue_regs(&r.t, 0);
    let before1 = queue_regs(&r.t, 1);
    ring_at(&r.mem, 0x8_0000, 32).program(&mut r.t, 0);
    ring_at(&r.mem, 0x9_0000, 32).program(&mut r.t, 1);
    wr(&mut r.t, reg::QUEUE_SEL, 0);
    wr(&mut r.t, reg::QUEUE_READY, 0);
    assert_eq!(queue_regs(&r.t, 0), before0);
    assert_eq!(queue_regs(&r.t, 1), before1);
    assert_eq!(rd(&r.t, reg::QUEUE_READY), 1);
}

#[test]
fn queue_registers_reject_bad_values_and_high_halves_compose() {
    let mut r = RawRig::new(BalloonConfig::default());
    assert!(negotiate(&mut r.t, r.ack));
    wr(&mut r.t, reg::QUEUE_SEL, 0);
    for bad in [0, 3, 100, 512, 0x1_0000, 0x1_0010, u32::MAX] {
        wr(&mut r.t, reg::QUEUE_NUM, bad);
        assert_eq!(r.t.device().queue(0).unwrap().size(), 256, "size {bad}");
    }
    wr(&mut r.t, reg::QUEUE_NUM, 64);
    assert_eq!(r.t.device().queue(0).unwrap().size(), 64);
    wr(&mut r.t, reg::QUEUE_DESC_LOW, 0x1000);
    wr(&mut r.t, reg::QUEUE_DESC_HIGH, 0x2);
    wr(&mut r.t, reg::QUEUE_AVAIL_LOW, 0x3000);
    wr(&mut r.t, reg::QUEUE_AVAIL_HIGH, 0x4);
    wr(&mut r.t, reg::QUEUE_USED_LOW, 0x5000);
    wr(&mut r.t, reg::QUEUE_USED_HIGH, 0x6);
    assert_eq!(
        queue_regs(&r.t, 0),
        (false, 64, 0x2_0000_1000, 0x4_0000_3000, 0x6_0000_5000)
    );
    // Writes with no queue selected change nothing and do not panic.
    wr(&mut r.t, reg::QUEUE_SEL, 9);
    ring_at(&r.mem, 0x1_0000, 16).program(&mut r.t, 9);
    for i in 1..4 {
        assert!(!queue_regs(&r.t, i).0, "queue {i}");
    }
    assert_eq!(
        queue_regs(&r.t, 0),
        (false, 64, 0x2_0000_1000, 0x4_0000_3000, 0x6_0000_5000)
    );
}

/// A bare device for the transport's own rules: it lets the transport change its queues at
/// any time and counts activations and resets.
struct MockDevice {
    queues: Vec<virtio_queue::Queue>,
    evts: Vec<vmm_sys_util::eventfd::EventFd>,
    irq: virtio_balloon::transport::Interrupt,
    offered: u64,
    acked: u64,
    activations: usize,
    resets: usize,
    active: bool,
    fail_activate: bool,
}

impl MockDevice {
    fn new(offered: u64) -> Self {
        MockDevice {
            queues: (0..2)
                .map(|_| virtio_queue::Queue::new(8).unwrap())
                .collect(),
            evts: (0..2)
                .map(|_| {
                    vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                        .unwrap()
                })
                .collect(),
            irq: virtio_balloon::transport::Interrupt::new().unwrap(),
            offered,
            acked: 0,
            activations: 0,
            resets: 0,
            active: false,
            fail_activate: false,
        }
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        42
    }
    fn num_queues(&self) -> usize {
        self.queues.len()
    }
    fn queue(&self, index: usize) -> Option<&virtio_queue::Queue> {
        self.queues.get(index)
    }
    fn queue_mut(&mut self, index: usize) -> Option<&mut virtio_queue::Queue> {
        self.queues.get_mut(index)
    }
    fn queue_event(&self, index: usize) -> Option<&vmm_sys_util::eventfd::EventFd> {
        self.evts.get(index)
    }
    fn device_features(&self) -> u64 {
        self.offered
    }
    fn driver_features(&self) -> u64 {
        self.acked
    }
    fn set_driver_features(&mut self, page: u32, value: u32) {
        match page {
            0 => self.acked = (self.acked & !0xffff_ffff) | u64::from(value),
            1 => self.acked = (self.acked & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn interrupt(&self) -> &virtio_balloon::transport::Interrupt {
        &self.irq
    }
    fn activate(&mut self) -> Result<(), virtio_balloon::transport::ActivateError> {
        self.activations += 1;
        if self.fail_activate {
            return Err(virtio_balloon::transport::ActivateError::InvalidQueue { index: 0 });
        }
        self.active = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = false;
        self.acked = 0;
        for q in &mut self.queues {
            q.reset();
        }
    }
    fn is_activated(&self) -> bool {
        self.active
    }
}

fn mock_rd(t: &MmioTransport<MockDevice>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn mock_wr(t: &mut MmioTransport<MockDevice>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn mock_negotiate(t: &mut MmioTransport<MockDevice>, acked: u64) -> u32 {
    mock_wr(t, reg::STATUS, st::ACK);
    mock_wr(t, reg::STATUS, st::ACK | st::DRIVER);
    mock_wr(t, reg::DRIVER_FEATURES_SEL, 0);
    mock_wr(t, reg::DRIVER_FEATURES, acked as u32);
    mock_wr(t, reg::DRIVER_FEATURES_SEL, 1);
    mock_wr(t, reg::DRIVER_FEATURES, (acked >> 32) as u32);
    mock_wr(t, reg::STATUS, st::NEGOTIATED);
    mock_rd(t, reg::STATUS)
}

#[test]
fn transport_enforces_queue_register_window_on_any_device() {
    let mut t = MmioTransport::new(MockDevice::new(bit(VERSION_1)));
    assert_eq!(mock_rd(&t, reg::DEVICE_ID), 42);
    // Before FEATURES_OK.
    mock_wr(&mut t, reg::QUEUE_SEL, 1);
    mock_wr(&mut t, reg::QUEUE_NUM, 4);
    mock_wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(t.device().queues[1].size(), 8);
    assert!(!t.device().queues[1].ready());
    // Between FEATURES_OK and DRIVER_OK.
    assert_eq!(mock_negotiate(&mut t, bit(VERSION_1)), st::NEGOTIATED);
    mock_wr(&mut t, reg::QUEUE_NUM, 4);
    mock_wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
    assert_eq!(t.device().queues[1].size(), 4);
    assert_eq!(t.device().queues[1].desc_table(), 0x1000);
    // After DRIVER_OK, even though this device would accept the change.
    mock_wr(&mut t, reg::STATUS, st::LIVE);
    assert_eq!(t.device().activations, 1);
    mock_wr(&mut t, reg::QUEUE_NUM, 2);
    mock_wr(&mut t, reg::QUEUE_DESC_LOW, 0x2000);
    mock_wr(&mut t, reg::QUEUE_READY, 1);
    assert_eq!(t.device().queues[1].size(), 4);
    assert_eq!(t.device().queues[1].desc_table(), 0x1000);
    assert!(!t.device().queues[1].ready());
    // DRIVER_OK again does not activate twice.
    mock_wr(&mut t, reg::STATUS, st::LIVE);
    assert_eq!(t.device().activations, 1);
    // Status 0 resets the device through the trait.
    mock_wr(&mut t, reg::STATUS, 0);
    assert_eq!(t.device().resets, 1);
    assert_eq!(mock_rd(&t, reg::STATUS), 0);
    assert!(!t.device().is_activated());
}

#[test]
fn transport_default_feature_checks_and_activation_failure() {
    let offered = bit(VERSION_1) | bit(0) | bit(1);
    // The trait's default validate_features: un-offered bits and no VERSION_1 are refused.
    let mut t = MmioTransport::new(MockDevice::new(offered));
    assert_eq!(
        t.device().validate_features(),
        Err(virtio_balloon::transport::FeatureError::NoVersion1)
    );
    assert_eq!(
        mock_negotiate(&mut t, offered | bit(7)),
        st::ACK | st::DRIVER
    );
    assert_eq!(
        t.device().validate_features(),
        Err(virtio_balloon::transport::FeatureError::NotOffered(bit(7)))
    );
    mock_wr(&mut t, reg::STATUS, 0);
    assert_eq!(mock_negotiate(&mut t, bit(0)), st::ACK | st::DRIVER);
    mock_wr(&mut t, reg::STATUS, 0);
    assert_eq!(mock_negotiate(&mut t, offered), st::NEGOTIATED);
    // The trait's default device_features_page.
    mock_wr(&mut t, reg::DEVICE_FEATURES_SEL, 0);
    assert_eq!(mock_rd(&t, reg::DEVICE_FEATURES), 0b11);
    mock_wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
    assert_eq!(mock_rd(&t, reg::DEVICE_FEATURES), 1);
    mock_wr(&mut t, reg::DEVICE_FEATURES_SEL, 2);
    assert_eq!(mock_rd(&t, reg::DEVICE_FEATURES), 0);
    // Config space goes to the device at offset - 0x100, any width.
    let mut b = [0u8; 3];
    t.read(reg::CONFIG + 0x21, &mut b);
    assert_eq!(b, [0x21; 3]);

    // A device that refuses to activate: DEVICE_NEEDS_RESET, no DRIVER_OK.
    t.device_mut().fail_activate = true;
    mock_wr(&mut t, reg::STATUS, st::LIVE);
    assert_eq!(t.device().activations, 1);
    assert_eq!(mock_rd(&t, reg::STATUS), st::NEGOTIATED | st::NEEDS_RESET);
    mock_wr(&mut t, reg::STATUS, st::LIVE | st::NEEDS_RESET);
    assert_eq!(t.device().activations, 1, "no retry before a reset");
    mock_wr(&mut t, reg::STATUS, 0);
    t.device_mut().fail_activate = false;
    assert_eq!(mock_negotiate(&mut t, offered), st::NEGOTIATED);
    mock_wr(&mut t, reg::STATUS, st::LIVE);
    assert_eq!(mock_rd(&t, reg::STATUS), st::LIVE);
    assert_eq!(t.device().activations, 2);
}

// ---------------------------------------------------------------------------------------
// Activation
// ---------------------------------------------------------------------------------------

#[test]
fn activation_refused_when_a_ready_queue_lies_outside_guest_memory() {
    // (what to break, how), applied to the selected queue.
    type Case = (&'static str, fn(&mut Mmio));
    let cases: [Case; 4] = [
        ("desc past the end", |t| {
            wr(t, reg::QUEUE_DESC_LOW, MEM_SIZE as u32)
        }),
        ("avail straddles the end", |t| {
            wr(t, reg::QUEUE_AVAIL_LOW, (MEM_SIZE - 4) as u32)
        }),
        ("used above 4 GiB", |t| wr(t, reg::QUEUE_USED_HIGH, 1)),
        ("desc table straddles the end", |t| {
            wr(t, reg::QUEUE_DESC_LOW, (MEM_SIZE - 0x100) as u32)
        }),
    ];
    for (what, breaks) in cases {
        let mut r = RawRig::new(BalloonConfig::default());
        let acked = r.ack;
        let good = ring_for(&r.mem, 0, 64);
        let bad = ring_for(&r.mem, 1, 64);
        assert!(negotiate(&mut r.t, acked));
        good.program(&mut r.t, 0);
        bad.program(&mut r.t, 1);
        wr(&mut r.t, reg::QUEUE_SEL, 1);
        breaks(&mut r.t);
        wr(&mut r.t, reg::STATUS, st::LIVE);
        assert_eq!(
            rd(&r.t, reg::STATUS),
            st::NEGOTIATED | st::NEEDS_RESET,
            "{what}"
        );
        assert!(!r.t.device().is_activated(), "{what}");
        // DRIVER_OK stays refused until a reset.
        wr(&mut r.t, reg::STATUS, st::LIVE | st::NEEDS_RESET);
        assert_eq!(rd(&r.t, reg::STATUS) & st::DRIVER_OK, 0, "{what}");
        assert!(!r.t.device().is_activated());

        wr(&mut r.t, reg::STATUS, 0);
        assert_eq!(rd(&r.t, reg::STATUS), 0);
        bring_up_rings(
            &mut r.t,
            acked,
            &[(0, &good), (1, &ring_for(&r.mem, 1, 64))],
        );
    }
}

#[test]
fn queue_that_is_not_ready_does_not_block_activation() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;
    assert!(negotiate(&mut r.t, acked));
    // Queue 1 has addresses far outside memory but is not ready.
    wr(&mut r.t, reg::QUEUE_SEL, 1);
    wr(&mut r.t, reg::QUEUE_NUM, 64);
    wr(&mut r.t, reg::QUEUE_DESC_HIGH, 0x10);
    wr(&mut r.t, reg::QUEUE_AVAIL_HIGH, 0x10);
    wr(&mut r.t, reg::QUEUE_USED_HIGH, 0x10);
    ring_for(&r.mem, 0, 64).program(&mut r.t, 0);
    wr(&mut r.t, reg::STATUS, st::LIVE);
    assert_eq!(rd(&r.t, reg::STATUS), st::LIVE);
    assert!(r.t.device().is_activated());

    // No queue ready at all is fine too.
    let mut r = RawRig::new(BalloonConfig::default());
    bring_up_rings(&mut r.t, acked, &[]);
}

// ---------------------------------------------------------------------------------------
// Bad accesses
// ---------------------------------------------------------------------------------------

#[test]
fn wrong_width_register_accesses_are_ignored() {
    log_everything();
    let mut r = RawRig::new(BalloonConfig::default());
    for width in [1usize, 2, 3, 8] {
        let mut b = vec![0x5au8; width];
        r.t.read(reg::MAGIC, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{width}-byte magic read");
        let mut b = vec![0x5au8; width];
        r.t.read(reg::DEVICE_ID, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{width}-byte device id read");
    }
    let mut empty = [];
    r.t.read(reg::MAGIC, &mut empty);
    r.t.write(reg::STATUS, &[]);

    // Narrow or wide writes do nothing.
    r.t.write(reg::STATUS, &[st::ACK as u8]);
    r.t.write(reg::STATUS, &(st::ACK as u16).to_le_bytes());
    r.t.write(reg::STATUS, &u64::from(st::ACK).to_le_bytes());
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    wr(&mut r.t, reg::STATUS, st::ACK);
    wr(&mut r.t, reg::STATUS, st::ACK | st::DRIVER);
    r.t.write(reg::DRIVER_FEATURES, &[0xff]);
    r.t.write(reg::DRIVER_FEATURES, &u64::MAX.to_le_bytes());
    assert_eq!(r.t.device().driver_features(), 0);
    r.t.write(reg::DEVICE_FEATURES_SEL, &[1, 0]);
    assert_eq!(
        rd(&r.t, reg::DEVICE_FEATURES),
        r.t.device().device_features() as u32
    );
    // A 2-byte QueueNotify does not signal.
    r.t.write(reg::QUEUE_NOTIFY, &[0, 0]);
    assert_eq!(take_queue_evt(&r.t, 0), 0);
}

#[test]
fn unknown_offsets_read_zero_and_ignore_writes() {
    log_everything();
    let mut r = RawRig::new(BalloonConfig::default());
    // Write-only registers and holes read as 0.
    for off in [
        reg::DEVICE_FEATURES_SEL,
        reg::DRIVER_FEATURES,
        reg::DRIVER_FEATURES_SEL,
        reg::QUEUE_SEL,
        reg::QUEUE_NUM,
        reg::QUEUE_NOTIFY,
        reg::INTERRUPT_ACK,
        reg::QUEUE_DESC_LOW,
        reg::QUEUE_USED_HIGH,
        0x018,
        0x028,
        0x03c,
        0x040,
        0x048,
        0x0ac,
        0x0b0, // SHMSel, not implemented
        0x0c0,
        0x0f8,
    ] {
        assert_eq!(rd(&r.t, off), 0, "read at {off:#x}");
    }
    // Writes to read-only registers and holes change nothing.
    for off in [
        reg::MAGIC,
        reg::VERSION,
        reg::DEVICE_ID,
        reg::VENDOR_ID,
        reg::DEVICE_FEATURES,
        reg::QUEUE_NUM_MAX,
        reg::INTERRUPT_STATUS,
        reg::CONFIG_GENERATION,
        0x018,
        0x0b0,
        0x0f8,
    ] {
        wr(&mut r.t, off, 0xffff_ffff);
    }
    assert_eq!(rd(&r.t, reg::MAGIC), 0x7472_6976);
    assert_eq!(rd(&r.t, reg::VERSION), 2);
    assert_eq!(rd(&r.t, reg::DEVICE_ID), 5);
    assert_eq!(rd(&r.t, reg::VENDOR_ID), 0);
    assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 256);
    assert_eq!(rd(&r.t, reg::CONFIG_GENERATION), 0);
    assert_eq!(rd(&r.t, reg::STATUS), 0);
}

/// Every offset in 0..0x200, widths 1, 2, 4, 8: reads, then writes of `pattern`.
/// On a device without DRIVER_OK it also checks what the reads return.
fn sweep(t: &mut Mmio, pattern: u8, check_reads: bool) {
    let config_len = t.device().config().config_len() as u64;
    for off in 0..0x200u64 {
        for width in [1usize, 2, 4, 8] {
            let mut b = vec![0x5au8; width];
            t.read(off, &mut b);
            if check_reads {
                if off < reg::CONFIG {
                    if width != 4 || !reg::READABLE.contains(&off) {
                        assert!(
                            b.iter().all(|&x| x == 0),
                            "{width}-byte read at {off:#x}: {b:x?}"
                        );
                    }
                } else {
                    for (i, &x) in b.iter().enumerate() {
                        if off - reg::CONFIG + i as u64 >= config_len {
                            assert_eq!(x, 0xff, "{width}-byte read at {off:#x}, byte {i}");
                        }
                    }
                }
            }
        }
    }
    for off in 0..0x200u64 {
        for width in [1usize, 2, 4, 8] {
            t.write(off, &vec![pattern; width]);
        }
    }
}

#[test]
fn access_sweep_on_a_fresh_device_never_panics() {
    log_everything();
    let mut r = RawRig::new(all_features());
    for pattern in [0x00, 0xff, 0xa5, 0x01] {
        sweep(&mut r.t, pattern, true);
    }
    // Nothing the sweep wrote leaves the device unusable.
    wr(&mut r.t, reg::STATUS, 0);
    assert_eq!(rd(&r.t, reg::STATUS), 0);
    assert_eq!(rd(&r.t, reg::MAGIC), 0x7472_6976);
    let acked = r.ack;
    let mut ring = ring_for(&r.mem, 0, 16);
    bring_up_rings(&mut r.t, acked, &[(0, &ring)]);
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);
    let head = ring.post_out(&r.mem, BUF_BASE, 8);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(ring.used(&r.mem), 1);
    assert_eq!(ring.elem(&r.mem, 0), (u32::from(head), 0));
}

#[test]
fn access_sweep_on_an_active_device_never_panics() {
    log_everything();
    let mut r = RawRig::new(all_features());
    let acked = r.ack;
    let mut ring = ring_for(&r.mem, 0, 16);
    let fpq = ring_for(&r.mem, 3, 64);
    bring_up_rings(&mut r.t, acked, &[(0, &ring), (3, &fpq)]);
    r.hints.start_round();
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);

    // 0xa5 bytes never form a valid status, so the device stays active.
    sweep(&mut shared.lock().unwrap(), 0xa5, false);
    settle(&mut em);
    assert_eq!(rd(&shared.lock().unwrap(), reg::STATUS), st::LIVE);
    let head = ring.post_out(&r.mem, BUF_BASE, 8);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    settle(&mut em);
    assert_eq!(ring.used(&r.mem), 1);
    assert_eq!(ring.elem(&r.mem, 0), (u32::from(head), 0));

    // Zeros reset it on the way (Status = 0); all-ones are invalid everywhere.
    for pattern in [0x00, 0xff] {
        sweep(&mut shared.lock().unwrap(), pattern, false);
        settle(&mut em);
    }
    let mut t = shared.lock().unwrap();
    wr(&mut t, reg::STATUS, 0);
    let mut ring = ring_at(&r.mem, 0x30_0000, 16);
    bring_up_rings(&mut t, acked, &[(0, &ring)]);
    drop(t);
    settle(&mut em);
    let head = ring.post_out(&r.mem, BUF_BASE, 8);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    settle(&mut em);
    assert_eq!(ring.used(&r.mem), 1);
    assert_eq!(ring.elem(&r.mem, 0), (u32::from(head), 0));
}

// ---------------------------------------------------------------------------------------
// Notify and interrupts
// ---------------------------------------------------------------------------------------

#[test]
fn queue_notify_signals_that_queue_eventfd() {
    log_everything();
    let mut r = RawRig::new(all_features());
    let n = r.t.device().num_queues();
    assert_eq!(n, 5);
    for i in 0..n {
        assert_eq!(take_queue_evt(&r.t, i), 0);
    }
    for target in 0..n {
        wr(&mut r.t, reg::QUEUE_NOTIFY, target as u32);
        for i in 0..n {
            assert_eq!(
                take_queue_evt(&r.t, i),
                u64::from(i == target),
                "notify {target}, queue {i}"
            );
        }
    }
    for bad in [n as u32, 0x100, 0x1_0000, u32::MAX] {
        wr(&mut r.t, reg::QUEUE_NOTIFY, bad);
        for i in 0..n {
            assert_eq!(take_queue_evt(&r.t, i), 0, "notify {bad:#x}");
        }
    }
    assert!(r.t.device().queue_event(n).is_none());
    // Activation wakes every queue once, for buffers posted before DRIVER_OK.
    bring_up_rings(&mut r.t, r.ack, &[]);
    for i in 0..n {
        assert_eq!(take_queue_evt(&r.t, i), 1, "queue {i} after DRIVER_OK");
    }
}

#[test]
fn interrupt_ack_clears_only_the_acked_bits() {
    let mut r = RawRig::new(BalloonConfig::default());
    bring_up_rings(&mut r.t, r.ack, &[]);
    let irq = r.t.device().interrupt_handle();
    irq.signal_used_queue();
    r.hints.start_round();
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED | ISR_CONFIG);
    assert_eq!(take_irq(&r.t), 2);

    // A narrow ack is ignored.
    r.t.write(reg::INTERRUPT_ACK, &[ISR_USED as u8]);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED | ISR_CONFIG);
    wr(&mut r.t, reg::INTERRUPT_ACK, 0);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED | ISR_CONFIG);
    wr(&mut r.t, reg::INTERRUPT_ACK, ISR_USED);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_CONFIG);
    wr(&mut r.t, reg::INTERRUPT_ACK, ISR_CONFIG);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);

    irq.signal_used_queue();
    r.hints.stop_round();
    wr(&mut r.t, reg::INTERRUPT_ACK, ISR_USED | ISR_CONFIG);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
    // Acking nothing pending is harmless and raises nothing.
    wr(&mut r.t, reg::INTERRUPT_ACK, 0xffff_ffff);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
}

// ---------------------------------------------------------------------------------------
// Queue layout and construction
// ---------------------------------------------------------------------------------------

#[test]
fn queue_layouts_for_several_configs() {
    use QueueRole::*;
    let cases: [(BalloonConfig, &[QueueRole]); 7] = [
        (
            BalloonConfig::default(),
            &[Inflate, Deflate, Stats, FreePage],
        ),
        (
            config_with(|c| {
                c.stats = false;
                c.free_page_hint = false;
            }),
            &[Inflate, Deflate],
        ),
        (
            config_with(|c| {
                c.stats = false;
                c.free_page_hint = false;
                c.reporting = true;
            }),
            &[Inflate, Deflate, Reporting],
        ),
        (
            config_with(|c| {
                c.free_page_hint = false;
                c.reporting = true;
            }),
            &[Inflate, Deflate, Stats, Reporting],
        ),
        (
            config_with(|c| {
                c.stats = false;
                c.reporting = true;
            }),
            &[Inflate, Deflate, FreePage, Reporting],
        ),
        (
            config_with(|c| c.stats = false),
            &[Inflate, Deflate, FreePage],
        ),
        (
            all_features(),
            &[Inflate, Deflate, Stats, FreePage, Reporting],
        ),
    ];
    for (cfg, roles) in cases {
        let mut r = RawRig::new(cfg);
        let layout = r.t.device().queue_layout().clone();
        assert_eq!(layout, QueueLayout::new(&cfg));
        assert_eq!(layout.len(), roles.len());
        assert!(!layout.is_empty());
        assert_eq!(r.t.device().num_queues(), roles.len());
        for (i, &role) in roles.iter().enumerate() {
            assert_eq!(layout.role(i), Some(role), "{cfg:?} queue {i}");
            assert_eq!(layout.index(role), Some(i));
            let size = match role {
                FreePage => cfg.free_page_queue_size,
                Reporting => cfg.reporting_queue_size,
                _ => cfg.queue_size,
            };
            wr(&mut r.t, reg::QUEUE_SEL, i as u32);
            assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), u32::from(size));
        }
        assert_eq!(layout.role(roles.len()), None);
        wr(&mut r.t, reg::QUEUE_SEL, roles.len() as u32);
        assert_eq!(rd(&r.t, reg::QUEUE_NUM_MAX), 0);
        for role in [Inflate, Deflate, Stats, FreePage, Reporting] {
            if !roles.contains(&role) {
                assert_eq!(layout.index(role), None);
            }
        }
    }
}

#[test]
fn balloon_new_rejects_bad_queue_sizes() {
    let new = |cfg: BalloonConfig| {
        Balloon::new(cfg, memory(), Arc::new(RecordingSink::default())).map(|_| ())
    };
    let with_reporting = |f: fn(&mut BalloonConfig)| {
        config_with(|c| {
            c.reporting = true;
            f(c);
        })
    };
    assert!(new(all_features()).is_ok());

    assert!(matches!(
        new(config_with(|c| c.queue_size = 0)),
        Err(BalloonError::InvalidQueueSize {
            role: QueueRole::Inflate,
            size: 0
        })
    ));
    assert!(matches!(
        new(config_with(|c| c.queue_size = 100)),
        Err(BalloonError::InvalidQueueSize { size: 100, .. })
    ));
    assert!(matches!(
        new(config_with(|c| c.free_page_queue_size = 0)),
        Err(BalloonError::InvalidQueueSize {
            role: QueueRole::FreePage,
            size: 0
        })
    ));
    assert!(matches!(
        new(config_with(|c| c.free_page_queue_size = 1000)),
        Err(BalloonError::InvalidQueueSize {
            role: QueueRole::FreePage,
            size: 1000
        })
    ));
    assert!(matches!(
        new(config_with(|c| c.free_page_queue_size = 1)),
        Err(BalloonError::QueueTooSmall {
            role: QueueRole::FreePage,
            size: 1
        })
    ));
    assert!(new(config_with(|c| c.free_page_queue_size = 2)).is_ok());
    assert!(matches!(
        new(with_reporting(|c| c.reporting_queue_size = 16)),
        Err(BalloonError::QueueTooSmall {
            role: QueueRole::Reporting,
            size: 16
        })
    ));
    assert!(matches!(
        new(with_reporting(|c| c.reporting_queue_size = 48)),
        Err(BalloonError::InvalidQueueSize {
            role: QueueRole::Reporting,
            size: 48
        })
    ));
    assert!(matches!(
        new(with_reporting(|c| c.reporting_queue_size = 0)),
        Err(BalloonError::InvalidQueueSize {
            role: QueueRole::Reporting,
            ..
        })
    ));
    assert!(new(with_reporting(|c| c.reporting_queue_size = 32)).is_ok());
    assert!(matches!(
        new(config_with(|c| c.chains_per_wakeup = 0)),
        Err(BalloonError::ZeroBudget)
    ));
    // Sizes of queues that are not offered are not checked.
    assert!(new(config_with(|c| {
        c.free_page_hint = false;
        c.free_page_queue_size = 0;
        c.reporting_queue_size = 3;
    }))
    .is_ok());
    assert!(new(config_with(|c| c.queue_size = 32768)).is_ok());
    assert!(new(config_with(|c| c.queue_size = 1)).is_ok());
    // The errors say what is wrong.
    let err = new(config_with(|c| c.queue_size = 3)).unwrap_err();
    assert!(err.to_string().contains('3'), "{err}");
}

// ---------------------------------------------------------------------------------------
// The event-manager subscriber
// ---------------------------------------------------------------------------------------

#[test]
fn plain_queues_return_buffers_with_used_length_zero_and_interrupt() {
    let cfg = all_features();
    let mut r = RawRig::new(cfg);
    let layout = r.t.device().queue_layout().clone();
    let inflate = layout.index(QueueRole::Inflate).unwrap() as u32;
    let deflate = layout.index(QueueRole::Deflate).unwrap() as u32;
    let reporting = layout.index(QueueRole::Reporting).unwrap() as u32;
    assert_eq!((inflate, deflate, reporting), (0, 1, 4));
    let mut rings = [
        (inflate, ring_for(&r.mem, inflate, 16)),
        (deflate, ring_for(&r.mem, deflate, 16)),
        (reporting, ring_for(&r.mem, reporting, 32)),
    ];
    let refs: Vec<(u32, &SplitRing)> = rings.iter().map(|(i, ring)| (*i, ring)).collect();
    bring_up_rings(&mut r.t, r.ack, &refs);
    let irq = r.t.device().interrupt_handle();
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);
    assert_eq!(irq.status(), 0, "nothing was posted");
    assert_eq!(irq.eventfd().read().unwrap_or(0), 0);

    // Inflate/deflate: PFN arrays (out); reporting: page ranges (in), two of them.
    for (i, (index, ring)) in rings.iter_mut().enumerate() {
        let buf = BUF_BASE + 0x1_0000 * i as u64;
        let head = if *index == reporting {
            ring.post(&r.mem, &[(buf, 0x1000, true), (buf + 0x2000, 0x1000, true)])
        } else {
            r.mem.write_obj(0x123u32, GuestAddress(buf)).unwrap();
            ring.post_out(&r.mem, buf, 8)
        };
        wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, *index);
        assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
        assert_eq!(ring.used(&r.mem), 1, "queue {index}");
        assert_eq!(ring.elem(&r.mem, 0), (u32::from(head), 0), "queue {index}");
        assert_eq!(
            rd(&shared.lock().unwrap(), reg::INTERRUPT_STATUS),
            ISR_USED,
            "queue {index}"
        );
        assert_eq!(irq.eventfd().read().unwrap(), 1, "queue {index}");
        wr(&mut shared.lock().unwrap(), reg::INTERRUPT_ACK, ISR_USED);
    }
    // The hinted pages of the reporting queue are not free page hints.
    assert!(r.sink.hints().is_empty());
}

#[test]
fn stats_queue_holds_its_buffer_until_the_next_arrives() {
    let mut r = RawRig::new(BalloonConfig::default());
    let stats = r.t.device().queue_layout().index(QueueRole::Stats).unwrap() as u32;
    let mut ring = ring_for(&r.mem, stats, 16);
    bring_up_rings(&mut r.t, r.ack, &[(stats, &ring)]);
    let irq = r.t.device().interrupt_handle();
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);

    let first = ring.post_out(&r.mem, BUF_BASE, 10 * 6);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, stats);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(ring.used(&r.mem), 0, "the first buffer is held");
    assert_eq!(irq.status(), 0);
    assert_eq!(irq.eventfd().read().unwrap_or(0), 0);

    let second = ring.post_out(&r.mem, BUF_BASE + 0x1000, 10 * 6);
    assert_ne!(first, second);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, stats);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(ring.used(&r.mem), 1);
    assert_eq!(ring.elem(&r.mem, 0), (u32::from(first), 0));
    assert_eq!(irq.status(), ISR_USED as u8);
    assert_eq!(irq.eventfd().read().unwrap(), 1);

    ring.post_out(&r.mem, BUF_BASE + 0x2000, 10 * 6);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, stats);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(ring.used(&r.mem), 2);
    assert_eq!(ring.elem(&r.mem, 1), (u32::from(second), 0));
}

#[test]
fn flooded_queue_is_served_over_several_wakeups_without_starving_another() {
    let cfg = config_with(|c| {
        c.chains_per_wakeup = 4;
        c.queue_size = 64;
    });
    let mut r = RawRig::new(cfg);
    let mut inflate = ring_for(&r.mem, 0, 64);
    let mut deflate = ring_for(&r.mem, 1, 64);
    bring_up_rings(&mut r.t, r.ack, &[(0, &inflate), (1, &deflate)]);
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);

    let heads: Vec<u16> = (0..10)
        .map(|i| inflate.post_out(&r.mem, BUF_BASE + 0x100 * i, 4))
        .collect();
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);

    // Wakeup 1: one batch of 4 from inflate; its eventfd is re-armed for the rest.
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(inflate.used(&r.mem), 4);
    assert_eq!(take_queue_evt(&shared.lock().unwrap(), 0), 1, "re-armed");
    // (Put the re-arm back, as it was.)
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);

    // A single deflate buffer arrives while inflate still has 6 waiting.
    let dhead = deflate.post_out(&r.mem, BUF_BASE + 0x1_0000, 4);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 1);

    // Wakeup 2: both queues; deflate is served before inflate is drained.
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 2);
    assert_eq!(deflate.used(&r.mem), 1);
    assert_eq!(deflate.elem(&r.mem, 0), (u32::from(dhead), 0));
    assert_eq!(inflate.used(&r.mem), 8);

    // Wakeup 3: the last 2.
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(inflate.used(&r.mem), 10);
    assert_eq!(em.run_with_timeout(0).unwrap(), 0, "nothing left to do");
    for (i, &head) in heads.iter().enumerate() {
        assert_eq!(inflate.elem(&r.mem, i as u16), (u32::from(head), 0));
    }
}

#[test]
fn free_page_queue_flood_is_served_in_batches() {
    let cfg = config_with(|c| c.chains_per_wakeup = 3);
    let mut r = RawRig::new(cfg);
    let mut fpq = ring_for(&r.mem, 3, 64);
    let mut inflate = ring_for(&r.mem, 0, 16);
    bring_up_rings(&mut r.t, r.ack, &[(0, &inflate), (3, &fpq)]);
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);
    let id = r.hints.start_round();
    post_command(&mut fpq, &r.mem, BUF_BASE, id);
    for i in 0..6 {
        fpq.post(&r.mem, &[(0x30_0000 + 0x1000 * i, 0x1000, true)]);
    }
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 3);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(fpq.used(&r.mem), 3);
    let ihead = inflate.post_out(&r.mem, BUF_BASE + 0x1_0000, 4);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 2);
    assert_eq!(fpq.used(&r.mem), 6);
    assert_eq!(inflate.elem(&r.mem, 0), (u32::from(ihead), 0));
    assert_eq!(em.run_with_timeout(TIMEOUT_MS).unwrap(), 1);
    assert_eq!(fpq.used(&r.mem), 7);
    for i in 0..7 {
        assert_eq!(fpq.elem(&r.mem, i).1, 0, "used length 0");
    }
    assert_eq!(r.hints.status().state, HintState::Start);
    assert_eq!(r.sink.total_bytes(), 6 * 0x1000);
}

#[test]
fn pause_stops_processing_until_resume() {
    let mut r = RawRig::new(BalloonConfig::default());
    let mut inflate = ring_for(&r.mem, 0, 16);
    let mut fpq = ring_for(&r.mem, 3, 64);
    bring_up_rings(&mut r.t, r.ack, &[(0, &inflate), (3, &fpq)]);
    let irq = r.t.device().interrupt_handle();
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);
    let id = r.hints.start_round();
    irq.ack(ISR_CONFIG as u8);
    let _ = irq.eventfd().read();

    shared.lock().unwrap().device_mut().pause();
    assert!(shared.lock().unwrap().device().is_paused());
    let head = inflate.post_out(&r.mem, BUF_BASE, 4);
    post_command(&mut fpq, &r.mem, BUF_BASE + 0x1000, id);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 3);
    settle(&mut em);
    shared.lock().unwrap().device_mut().process_queue(0);
    assert_eq!(inflate.used(&r.mem), 0, "paused");
    assert_eq!(fpq.used(&r.mem), 0, "paused");
    assert_eq!(r.hints.status().state, HintState::Requested);
    assert_eq!(irq.status(), 0);
    // stop_round while paused changes the state but moves nothing on the ring.
    r.hints.stop_round();
    assert_eq!(fpq.used(&r.mem), 0, "paused");
    let id = r.hints.start_round();
    post_command(&mut fpq, &r.mem, BUF_BASE + 0x2000, id);

    shared.lock().unwrap().device_mut().resume();
    assert!(!shared.lock().unwrap().device().is_paused());
    settle(&mut em);
    assert_eq!(inflate.used(&r.mem), 1);
    assert_eq!(inflate.elem(&r.mem, 0), (u32::from(head), 0));
    assert_eq!(fpq.used(&r.mem), 2);
    assert_eq!(r.hints.status().state, HintState::Start);
    assert_ne!(irq.status() & ISR_USED as u8, 0);
}

#[test]
fn malformed_chains_are_returned_and_do_not_stall_the_queues() {
    log_everything();
    let mut r = RawRig::new(BalloonConfig::default());
    let mut inflate = ring_for(&r.mem, 0, 16);
    let mut stats = ring_for(&r.mem, 2, 16);
    bring_up_rings(&mut r.t, r.ack, &[(0, &inflate), (2, &stats)]);
    let (mut em, shared) = event_loop(r.t);
    settle(&mut em);

    // Inflate: a looped chain, a head past the table, then a good chain.
    let looped = inflate.post_looped(&r.mem, BUF_BASE);
    inflate.publish_head(&r.mem, 16 + 5).unwrap();
    let good = inflate.post_out(&r.mem, BUF_BASE + 0x100, 4);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    settle(&mut em);
    let used = inflate.used(&r.mem);
    assert!(used >= 2, "used {used}");
    assert_eq!(inflate.elem(&r.mem, 0), (u32::from(looped), 0));
    assert_eq!(inflate.elem(&r.mem, used - 1), (u32::from(good), 0));

    // Stats: a malformed buffer is returned at once and does not replace the held one.
    let held = stats.post_out(&r.mem, BUF_BASE + 0x1000, 60);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 2);
    settle(&mut em);
    assert_eq!(stats.used(&r.mem), 0);
    let bad = stats.post_looped(&r.mem, BUF_BASE + 0x2000);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 2);
    settle(&mut em);
    assert_eq!(stats.used(&r.mem), 1);
    assert_eq!(stats.elem(&r.mem, 0), (u32::from(bad), 0));
    stats.post_out(&r.mem, BUF_BASE + 0x3000, 60);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 2);
    settle(&mut em);
    assert_eq!(stats.used(&r.mem), 2);
    assert_eq!(stats.elem(&r.mem, 1), (u32::from(held), 0));
}

#[test]
fn nothing_is_served_before_driver_ok_or_after_reset() {
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack;
    let mut inflate = ring_for(&r.mem, 0, 16);
    assert!(negotiate(&mut r.t, acked));
    inflate.program(&mut r.t, 0);
    let (mut em, shared) = event_loop(r.t);
    let head = inflate.post_out(&r.mem, BUF_BASE, 4);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    settle(&mut em);
    assert_eq!(inflate.used(&r.mem), 0, "before DRIVER_OK");
    // DRIVER_OK looks at buffers posted before it.
    wr(&mut shared.lock().unwrap(), reg::STATUS, st::LIVE);
    settle(&mut em);
    assert_eq!(inflate.used(&r.mem), 1);
    assert_eq!(inflate.elem(&r.mem, 0), (u32::from(head), 0));
    // After a reset the old ring is left alone.
    wr(&mut shared.lock().unwrap(), reg::STATUS, 0);
    inflate.post_out(&r.mem, BUF_BASE, 4);
    wr(&mut shared.lock().unwrap(), reg::QUEUE_NOTIFY, 0);
    settle(&mut em);
    assert_eq!(inflate.used(&r.mem), 1);
}

// ---------------------------------------------------------------------------------------
// The precopy notifier
// ---------------------------------------------------------------------------------------

fn chain_with(hints: &FreePageHinting) -> PrecopyNotifierChain {
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(hints.clone()));
    chain
}

#[test]
fn precopy_notifier_drives_hint_rounds() {
    let mut r = RawRig::new(BalloonConfig::default());
    bring_up_rings(&mut r.t, r.ack, &[]);
    assert!(r.hints.negotiated());
    let chain = chain_with(&r.hints);

    chain.notify(PrecopyEvent::Setup, RUNNING).unwrap();
    assert_eq!(r.hints.status().state, HintState::Stop);
    assert_eq!(r.hints.status().cmd_id, 0);

    chain
        .notify(PrecopyEvent::BeforeBitmapSync, RUNNING)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Stop);
    chain
        .notify(PrecopyEvent::AfterBitmapSync, RUNNING)
        .unwrap();
    let s = r.hints.status();
    assert_eq!(s.state, HintState::Requested);
    assert!(s.cmd_id >= 2);
    assert_eq!(config_read32(&r.t, CFG_CMD_ID), s.cmd_id);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_CONFIG);
    let first = s.cmd_id;

    chain
        .notify(PrecopyEvent::BeforeBitmapSync, RUNNING)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Stop);
    assert_eq!(config_read32(&r.t, CFG_CMD_ID), 0);
    chain
        .notify(PrecopyEvent::AfterBitmapSync, RUNNING)
        .unwrap();
    let second = r.hints.status().cmd_id;
    assert!(second > first);
    assert_eq!(r.hints.status().state, HintState::Requested);

    // Complete does nothing; the final sync with the VM stopped ends hinting.
    chain.notify(PrecopyEvent::Complete, STOPPED).unwrap();
    assert_eq!(r.hints.status().state, HintState::Requested);
    chain
        .notify(PrecopyEvent::BeforeBitmapSync, STOPPED)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Stop);
    chain
        .notify(PrecopyEvent::AfterBitmapSync, STOPPED)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Done);
    assert_eq!(r.hints.status().cmd_id, second, "no new round");
    assert_eq!(config_read32(&r.t, CFG_CMD_ID), 1);

    // Cleanup after a cancelled migration: DONE.
    chain
        .notify(PrecopyEvent::AfterBitmapSync, RUNNING)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Requested);
    chain.notify(PrecopyEvent::Cleanup, RUNNING).unwrap();
    assert_eq!(r.hints.status().state, HintState::Done);
    assert_eq!(config_read32(&r.t, CFG_CMD_ID), 1);
}

#[test]
fn precopy_notifier_does_nothing_with_postcopy() {
    let mut r = RawRig::new(BalloonConfig::default());
    bring_up_rings(&mut r.t, r.ack, &[]);
    let chain = chain_with(&r.hints);
    let postcopy = MigrationState {
        vm_running: true,
        postcopy: true,
    };
    let gen = rd(&r.t, reg::CONFIG_GENERATION);
    for event in [
        PrecopyEvent::Setup,
        PrecopyEvent::BeforeBitmapSync,
        PrecopyEvent::AfterBitmapSync,
        PrecopyEvent::Complete,
        PrecopyEvent::Cleanup,
    ] {
        chain.notify(event, postcopy).unwrap();
        assert_eq!(r.hints.status().state, HintState::Stop, "{event}");
        assert_eq!(r.hints.status().cmd_id, 0, "{event}");
    }
    assert_eq!(rd(&r.t, reg::CONFIG_GENERATION), gen);
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
    assert_eq!(take_irq(&r.t), 0);

    // An active round is left alone too.
    let id = r.hints.start_round();
    chain
        .notify(PrecopyEvent::BeforeBitmapSync, postcopy)
        .unwrap();
    chain.notify(PrecopyEvent::Cleanup, postcopy).unwrap();
    assert_eq!(r.hints.status().state, HintState::Requested);
    assert_eq!(r.hints.status().cmd_id, id);
}

#[test]
fn precopy_notifier_does_nothing_when_hinting_was_not_negotiated() {
    // Offered, not accepted.
    let mut r = RawRig::new(BalloonConfig::default());
    let acked = r.ack & !bit(3);
    bring_up_rings(&mut r.t, acked, &[]);
    assert!(!r.hints.negotiated());
    // Not offered at all.
    let mut r2 = RawRig::new(config_with(|c| c.free_page_hint = false));
    bring_up_rings(&mut r2.t, r2.ack, &[]);
    assert!(!r2.hints.negotiated());
    // Not activated yet.
    let r3 = RawRig::new(BalloonConfig::default());
    assert!(!r3.hints.negotiated());

    for r in [&r, &r2, &r3] {
        let chain = chain_with(&r.hints);
        let gen = rd(&r.t, reg::CONFIG_GENERATION);
        for event in [
            PrecopyEvent::Setup,
            PrecopyEvent::BeforeBitmapSync,
            PrecopyEvent::AfterBitmapSync,
            PrecopyEvent::Complete,
            PrecopyEvent::Cleanup,
        ] {
            chain.notify(event, RUNNING).unwrap();
            chain.notify(event, STOPPED).unwrap();
            assert_eq!(r.hints.status().state, HintState::Stop, "{event}");
            assert_eq!(r.hints.status().cmd_id, 0, "{event}");
        }
        assert_eq!(rd(&r.t, reg::CONFIG_GENERATION), gen);
        assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), 0);
    }

    // After a reset hinting is no longer negotiated.
    let mut r = RawRig::new(BalloonConfig::default());
    bring_up_rings(&mut r.t, r.ack, &[]);
    assert!(r.hints.negotiated());
    wr(&mut r.t, reg::STATUS, 0);
    assert!(!r.hints.negotiated());
    chain_with(&r.hints)
        .notify(PrecopyEvent::AfterBitmapSync, RUNNING)
        .unwrap();
    assert_eq!(r.hints.status().state, HintState::Stop);
}

#[test]
fn event_idx_feature_is_offered_and_accepted() {
    // EVENT_IDX and INDIRECT_DESC are offered; a driver may take them.
    let mut r = RawRig::new(BalloonConfig::default());
    let offered = device_features(&mut r.t);
    assert_ne!(offered & bit(EVENT_IDX), 0);
    assert_ne!(offered & bit(28), 0);
    let mut ring = ring_for(&r.mem, 0, 16);
    bring_up_rings(&mut r.t, offered, &[(0, &ring)]);
    assert!(r.t.device().has_feature(EVENT_IDX));
    let head = ring.post_out(&r.mem, BUF_BASE, 4);
    r.t.device_mut().process_queue(0);
    assert_eq!(ring.elem(&r.mem, 0), (u32::from(head), 0));
    // used_event is 0: the first used buffer crosses it and interrupts.
    assert_eq!(rd(&r.t, reg::INTERRUPT_STATUS), ISR_USED);
}

#[test]
fn errors_and_debug_output_name_what_went_wrong() {
    let new = |cfg: BalloonConfig| Balloon::new(cfg, memory(), Arc::new(RecordingSink::default()));
    let small = new(config_with(|c| c.free_page_queue_size = 1)).unwrap_err();
    assert!(small.to_string().contains("too small"), "{small}");
    assert!(std::error::Error::source(&small).is_none());
    let zero = new(config_with(|c| c.chains_per_wakeup = 0)).unwrap_err();
    assert!(zero.to_string().contains("chains_per_wakeup"), "{zero}");
    let bad = new(config_with(|c| c.queue_size = 3)).unwrap_err();
    assert!(bad.to_string().contains("power of two"), "{bad}");
    let io = BalloonError::EventFd(std::io::Error::from_raw_os_error(24));
    assert!(io.to_string().contains("eventfd"), "{io}");
    assert!(std::error::Error::source(&io).is_some());

    let balloon = new(all_features()).unwrap();
    let hints = balloon.hint_control();
    let debug = format!("{balloon:?} {hints:?}");
    assert!(
        debug.contains("Balloon") && debug.contains("FreePageHinting"),
        "{debug}"
    );
    assert!(debug.contains("Stop"), "the status shows: {debug}");
    use virtio_balloon::migration::PrecopyNotifier;
    assert!(hints.name().contains("hint"));
    let transport = MmioTransport::new(balloon);
    assert!(format!("{transport:?}").contains("MmioTransport"));
    assert_eq!(transport.into_inner().device_type(), 5);
}

#[test]
fn activate_checks_the_driver_and_runs_once() {
    use virtio_balloon::transport::ActivateError;
    let mut balloon = Balloon::new(
        BalloonConfig::default(),
        memory(),
        Arc::new(RecordingSink::default()),
    )
    .unwrap();
    // A transport that skipped feature negotiation: no VERSION_1.
    assert!(matches!(
        balloon.activate(),
        Err(ActivateError::LegacyDriver)
    ));
    assert!(!balloon.is_activated());
    balloon.set_driver_features(1, 1); // VERSION_1 is bit 32
    balloon.activate().unwrap();
    assert!(balloon.is_activated());
    assert!(matches!(
        balloon.activate(),
        Err(ActivateError::AlreadyActive)
    ));
    assert!(
        balloon.queue_mut(0).is_none(),
        "no queue changes once active"
    );
    balloon.reset();
    assert!(!balloon.is_activated());
    assert!(balloon.queue_mut(0).is_some());
}

#[test]
fn stray_and_failing_event_sources_are_dropped() {
    use event_manager::{EventSet, Events};
    use vmm_sys_util::eventfd::EventFd;
    log_everything();
    let r = RawRig::new(all_features());
    let shared = Arc::new(Mutex::new(r.t));
    let mut em: Loop = EventManager::new().unwrap();
    let id = em.add_subscriber(shared.clone());

    // An event whose data names no queue: read nothing, change nothing.
    let stray = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
    stray.write(1).unwrap();
    em.event_ops(id)
        .unwrap()
        .add(Events::with_data(&stray, 99, EventSet::IN))
        .unwrap();
    assert_eq!(em.run_with_timeout(0).unwrap(), 1);
    assert_eq!(
        stray.read().unwrap(),
        1,
        "the device did not consume a stray fd"
    );

    // A source that hangs up (a pipe whose writer is gone) under a queue's data is removed,
    // so it cannot spin the loop.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(writer);
    let hung = std::os::fd::AsRawFd::as_raw_fd(&reader);
    em.event_ops(id)
        .unwrap()
        .add(Events::with_data_raw(hung, 0, EventSet::IN))
        .unwrap();
    assert!(em.run_with_timeout(0).unwrap() >= 1);
    assert_eq!(
        em.run_with_timeout(0).unwrap(),
        0,
        "the hung-up fd was unregistered"
    );
    drop(reader);
}
