// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Free page hint throughput through the whole device path, beside its floor.
//!
//! The device is set up the way a driver sets it up: virtio-mmio register writes (ACKNOWLEDGE,
//! DRIVER, features `VERSION_1` + `FREE_PAGE_HINT`, FEATURES_OK, the free page queue's size,
//! addresses and ready bit, DRIVER_OK). The migration side starts a round; the guest posts a
//! 4-byte start buffer holding the round id and the device takes it, so it is in START. From
//! then on every measured iteration is one batch: the guest has posted `QUEUE_SIZE - 1`
//! one-descriptor chains, each a device-writable 4 MiB block (what Linux posts), and one
//! `Balloon::process_queue` call (what the event loop does after the queue's eventfd fired,
//! with `chains_per_wakeup` = the ring size) handles them all: pop, validate, clear the block
//! from a [`MigrationBitmap`] sink, add_used, and the used-buffer interrupt.
//!
//! * `floor_pop_add_used`: bare `virtio_queue::Queue` `pop_descriptor_chain` + `add_used` of
//!   the same descriptors, on a queue of the same size in the same guest memory.
//! * `device_process_queue`: the full device path.
//! * `bare_pop_walk_add_used` and `bare_pop_walk_sink_add_used`: reference points in between
//!   (the floor plus one walk of each chain, then plus the sink's `clear_free_range`), so the
//!   device's cost can be split into ring work, descriptor reads, bitmap clearing and the rest.
//!
//! Everything the guest does (writing the avail ring and its index) and the refill of the
//! migration bitmap happen before the clock starts, identically for every benchmark; the rings
//! are never reset: the indices just keep running, as they do in a guest.
//!
//! Guest memory is 4 GiB (`GuestMemoryMmap::from_ranges` maps it lazily; only the page of the
//! rings is ever touched, since hints read no guest memory): 1023 distinct 4 MiB blocks for the
//! hints and the last 4 MiB block for the rings. Every batch hints the same 1023 distinct blocks,
//! and the bitmap is marked all dirty again before each batch, so each hint really clears its
//! 1024 bits (16 bitmap words) and no two hints of a batch share a word. Distinct blocks per
//! batch beyond that would only need a larger bitmap that no longer fits in the cache, which
//! `benches/bitmap.rs` (`hint_clear`) already measures.
//!
//! Throughput is in hint descriptors. `scripts/bench_ratios.py` prints each time divided by
//! the floor's (the target: the device's rate at least 0.7 of the floor's, i.e. a time
//! ratio of at most 1/0.7 = 1.43).

use std::hint::black_box;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_balloon::migration::MigrationBitmap;
use virtio_balloon::transport::MmioTransport;
use virtio_balloon::{Balloon, BalloonConfig, HintState, QueueRole};
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use guest_model::bring_up;
use guest_model::ring::{Desc, RingLayout, SplitRing};
type Mem = GuestMemoryMmap<AtomicBitmap>;
type Device = Balloon<Arc<Mem>>;

const MEM_SIZE: u64 = 4 << 30;
/// One hint: a 4 MiB block, what Linux reports (order 10 pages).
const BLOCK: u64 = 4 << 20;
/// QEMU's free page queue size (the crate's default).
const QUEUE_SIZE: u16 = 1024;
/// Hint chains per batch: every descriptor but the start buffer's.
const BATCH: u16 = QUEUE_SIZE - 1;

/// The rings live in the last 4 MiB block, which no hint covers.
const RING_BLOCK: u64 = MEM_SIZE - BLOCK;
/// The descriptor table both queues read (16 KiB).
const DESC_TABLE: u64 = RING_BLOCK;
const DEVICE_AVAIL: u64 = RING_BLOCK + 0x4000;
const DEVICE_USED: u64 = RING_BLOCK + 0x5000;
const FLOOR_AVAIL: u64 = RING_BLOCK + 0x8000;
const FLOOR_USED: u64 = RING_BLOCK + 0x9000;
/// The start buffer's 4 bytes.
const CMD_BUF: u64 = RING_BLOCK + 0xc000;
/// The descriptor of the start buffer; descriptors `0..BATCH` are the hints.
const START_DESC: u16 = QUEUE_SIZE - 1;

/// The driver's side of a ring over the shared descriptor table: `avail` and `used` are its
/// own. The table is cleared here, so both rings are made before any descriptor is written.
fn driver_ring(mem: &Mem, avail: u64, used: u64) -> SplitRing {
    let layout = RingLayout {
        size: QUEUE_SIZE,
        desc: GuestAddress(DESC_TABLE),
        avail: GuestAddress(avail),
        used: GuestAddress(used),
    };
    SplitRing::new(mem, 0, layout, false, true, None).unwrap()
}

/// Makes `heads` available, each with Linux's ordering (ring entry, Release, index). The
/// descriptors are written once and reposted as they are: no free-list bookkeeping.
fn post(ring: &mut SplitRing, mem: &Mem, heads: impl IntoIterator<Item = u16>) {
    for head in heads {
        ring.publish_head(mem, head).unwrap();
    }
}

fn used_idx(mem: &Mem, used: u64) -> u16 {
    u16::from_le(mem.load(GuestAddress(used + 2), Ordering::Acquire).unwrap())
}

/// 4 GiB of guest memory with the device's and the floor's rings and the descriptor table
/// written: `0..BATCH` are device-writable 4 MiB blocks, `START_DESC` is the readable 4-byte
/// command buffer.
fn guest_memory() -> (Arc<Mem>, SplitRing, SplitRing) {
    let mem = Arc::new(Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
    let device = driver_ring(&mem, DEVICE_AVAIL, DEVICE_USED);
    let floor = driver_ring(&mem, FLOOR_AVAIL, FLOOR_USED);
    for i in 0..BATCH {
        let d = Desc::input(u64::from(i) * BLOCK, BLOCK as u32);
        device.write_desc_raw(&mem, i, d).unwrap();
    }
    device
        .write_desc_raw(&mem, START_DESC, Desc::out(CMD_BUF, 4))
        .unwrap();
    (mem, device, floor)
}

/// A balloon driven into START through its registers, as a driver and a migration would.
struct HintDevice {
    transport: MmioTransport<Device>,
    queue: usize,
    avail: SplitRing,
}

impl HintDevice {
    fn new(mem: &Arc<Mem>, avail: SplitRing, sink: Arc<MigrationBitmap>) -> Self {
        // Without a stats queue, a driver acking only FREE_PAGE_HINT numbers the queues as
        // the device does.
        let cfg = BalloonConfig::default()
            .with_stats(false)
            .with_free_page_queue_size(QUEUE_SIZE)
            .with_chains_per_wakeup(QUEUE_SIZE);
        let balloon = Balloon::new(cfg, mem.clone(), sink).unwrap();
        let queue = balloon.queue_layout().index(QueueRole::FreePage).unwrap();
        let mut t = MmioTransport::new(balloon);
        bring_up::bring_up_hinting(
            &mut t,
            &[(queue, QUEUE_SIZE, [DESC_TABLE, DEVICE_AVAIL, DEVICE_USED])],
        );

        let mut dev = HintDevice {
            transport: t,
            queue,
            avail,
        };
        // The migration starts a round; the guest reads the id and posts its start buffer.
        let control = dev.transport.device().hint_control();
        let id = control.start_round();
        mem.write_obj(id.to_le(), GuestAddress(CMD_BUF)).unwrap();
        post(&mut dev.avail, mem, [START_DESC]);
        dev.process();
        assert_eq!(control.status().state, HintState::Start);
        dev
    }

    fn process(&mut self) {
        self.transport.device_mut().process_queue(self.queue);
    }
}

/// A bare queue of the same size over the same descriptor table, with its own rings.
fn floor_queue(mem: &Mem) -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE as u32), Some((DESC_TABLE >> 32) as u32));
    q.set_avail_ring_address(Some(FLOOR_AVAIL as u32), Some((FLOOR_AVAIL >> 32) as u32));
    q.set_used_ring_address(Some(FLOOR_USED as u32), Some((FLOOR_USED >> 32) as u32));
    q.set_ready(true);
    assert!(q.is_valid(mem));
    q
}

/// Times `batch` alone, running `post` before each call outside the timed part, and checks
/// (untimed) that every posted chain was used.
fn timed_batches(
    iters: u64,
    mem: &Mem,
    used_ring: u64,
    mut post: impl FnMut(),
    mut batch: impl FnMut(),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        post();
        let before = used_idx(mem, used_ring);
        let start = Instant::now();
        batch();
        total += start.elapsed();
        assert_eq!(used_idx(mem, used_ring).wrapping_sub(before), BATCH);
    }
    total
}

/// Pops every available chain and gives it back, calling `each` on it in between.
fn drain_bare(
    q: &mut Queue,
    mem: &Mem,
    mut each: impl FnMut(&virtio_queue::DescriptorChain<&Mem>),
) {
    while let Some(chain) = q.pop_descriptor_chain(mem) {
        each(&chain);
        q.add_used(mem, chain.head_index(), 0).unwrap();
    }
}

fn bench_hint_path(c: &mut Criterion) {
    let (mem, device_ring, mut floor_avail) = guest_memory();
    let sink = Arc::new(MigrationBitmap::new(&*mem).unwrap());
    let mut group = c.benchmark_group("hint_path");
    group.throughput(Throughput::Elements(u64::from(BATCH)));

    let mut floor = floor_queue(&mem);
    // Every benchmark prepares its batch the same way: refill the bitmap, post the chains.
    let mut post_floor = |m: &Mem| {
        sink.mark_all_dirty();
        post(&mut floor_avail, m, 0..BATCH);
    };

    group.bench_function("floor_pop_add_used", |b| {
        b.iter_custom(|iters| {
            timed_batches(
                iters,
                &mem,
                FLOOR_USED,
                || post_floor(&mem),
                || drain_bare(&mut floor, &mem, |_| {}),
            )
        })
    });
    group.bench_function("bare_pop_walk_add_used", |b| {
        b.iter_custom(|iters| {
            timed_batches(
                iters,
                &mem,
                FLOOR_USED,
                || post_floor(&mem),
                || {
                    drain_bare(&mut floor, &mem, |chain| {
                        for d in chain.clone() {
                            black_box((d.addr(), d.len(), d.is_write_only()));
                        }
                    })
                },
            )
        })
    });
    group.bench_function("bare_pop_walk_sink_add_used", |b| {
        b.iter_custom(|iters| {
            timed_batches(
                iters,
                &mem,
                FLOOR_USED,
                || post_floor(&mem),
                || {
                    drain_bare(&mut floor, &mem, |chain| {
                        for d in chain.clone() {
                            if d.is_write_only() {
                                sink.clear_free_range(d.addr(), u64::from(d.len()));
                            }
                        }
                    })
                },
            )
        })
    });

    let mut dev = HintDevice::new(&mem, device_ring, sink.clone());
    let irq = dev.transport.device().interrupt_handle();
    let hinted_before = sink.hinted_pages();
    let mut batches = 0u64;
    group.bench_function("device_process_queue", |b| {
        b.iter_custom(|iters| {
            batches += iters;
            let HintDevice {
                transport,
                queue,
                avail,
            } = &mut dev;
            timed_batches(
                iters,
                &mem,
                DEVICE_USED,
                || {
                    // Consume the last batch's used-buffer interrupt, as KVM consumes the
                    // irqfd and the driver acks it.
                    let _ = irq.eventfd().read();
                    irq.ack(irq.status());
                    sink.mark_all_dirty();
                    post(avail, &mem, 0..BATCH);
                },
                || transport.device_mut().process_queue(*queue),
            )
        })
    });
    group.finish();

    // Every hint was applied: each cleared a whole dirty 4 MiB block.
    let status = dev.transport.device().hint_control().status();
    assert_eq!(status.state, HintState::Start);
    assert_eq!(status.metrics.hints_accepted, batches * u64::from(BATCH));
    assert_eq!(
        sink.hinted_pages() - hinted_before,
        batches * u64::from(BATCH) * (BLOCK >> 12)
    );
}

criterion_group!(benches, bench_hint_path);
criterion_main!(benches);
