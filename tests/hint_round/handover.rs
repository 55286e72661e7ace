// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The device API for VMMs that own their queue state, kick eventfds and interrupts (a
//! vhost-user backend, a PCI VMM with MSI-X): activation from handed-over queues without
//! DRIVER_OK, re-arming on the VMM's own kick eventfd, per-queue used-buffer notifications
//! and configuration changes through an `InterruptDelivery`, and the event sources a VMM
//! registers.

use std::sync::{Arc, Mutex};

use guest_model::ring::{GuestMem, Part, RingLayout, SplitRing};
use virtio_balloon::defs::features as f;
use virtio_balloon::sink::RecordingSink;
use virtio_balloon::transport::{
    ActivateError, FeatureError, InterruptDelivery, QueueHandover, VirtioDevice,
};
use virtio_balloon::{Balloon, BalloonConfig, DeviceEvent, HintState, QueueRole};
use virtio_queue::{QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

type Mem = Arc<GuestMem>;

/// Records what the device delivered.
#[derive(Debug, Default)]
struct Recorder {
    used: Mutex<Vec<usize>>,
    config: Mutex<u32>,
}

impl InterruptDelivery for Recorder {
    fn used_buffer(&self, queue: usize) -> std::io::Result<()> {
        self.used.lock().unwrap().push(queue);
        Ok(())
    }
    fn config_changed(&self) -> std::io::Result<()> {
        *self.config.lock().unwrap() += 1;
        Ok(())
    }
}

const MEM_SIZE: u64 = 0x100_0000;
/// Where ring `i` lives (64 KiB apart).
fn ring_base(i: usize) -> GuestAddress {
    GuestAddress(0x10_0000 + 0x1_0000 * i as u64)
}

struct Setup {
    mem: Mem,
    balloon: Balloon<Mem>,
    rings: Vec<SplitRing>,
    kicks: Vec<EventFd>,
    irq: Arc<Recorder>,
    sink: Arc<RecordingSink>,
}

/// A balloon offering the default features plus reporting, with queues of at most 1024
/// entries, and driver rings of `size` entries at Linux's layout, as a frontend sets them up.
fn setup(size: u16, chains_per_wakeup: u16) -> Setup {
    let mem: Mem =
        Arc::new(GuestMem::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap());
    let cfg = BalloonConfig::default()
        .with_reporting(true)
        .with_queue_size(1024)
        .with_free_page_queue_size(1024)
        .with_reporting_queue_size(1024)
        .with_chains_per_wakeup(chains_per_wakeup);
    let sink = Arc::new(RecordingSink::default());
    let balloon = Balloon::new(cfg, mem.clone(), sink.clone()).unwrap();
    let n = balloon.queue_layout().len();
    let rings = (0..n)
        .map(|i| {
            SplitRing::new(
                &mem,
                i as u16,
                RingLayout::linux(ring_base(i), size),
                false,
                true,
                None,
            )
            .unwrap()
        })
        .collect();
    let kicks = (0..n)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let irq = Arc::new(Recorder::default());
    balloon.set_interrupt_delivery(irq.clone());
    Setup {
        mem,
        balloon,
        rings,
        kicks,
        irq,
        sink,
    }
}

fn state_of(ring: &SplitRing) -> QueueState {
    QueueState {
        max_size: 0,
        next_avail: 0,
        next_used: 0,
        event_idx_enabled: false,
        size: ring.size(),
        ready: true,
        desc_table: ring.layout.desc.0,
        avail_ring: ring.layout.avail.0,
        used_ring: ring.layout.used.0,
    }
}

impl Setup {
    fn handovers(&self) -> Vec<QueueHandover> {
        self.rings
            .iter()
            .zip(&self.kicks)
            .map(|(r, k)| QueueHandover {
                state: state_of(r),
                kick: Some(k.try_clone().unwrap()),
            })
            .collect()
    }

    fn features(&self) -> u64 {
        self.balloon.device_features()
    }

    fn index(&self, role: QueueRole) -> usize {
        self.balloon.queue_layout().index(role).unwrap()
    }
}

#[test]
fn activates_from_handed_over_queues_without_driver_ok() {
    let mut s = setup(256, 256);
    // The driver posts its statistics buffer before the device is live, as Linux does.
    let stats = s.index(QueueRole::Stats);
    s.rings[stats]
        .add(
            &s.mem,
            &[Part::out(GuestAddress(0x8000), 10 * 16)],
            false,
            1,
        )
        .unwrap();
    s.balloon.ack_features(s.features()).unwrap();
    let handovers = s.handovers();
    s.balloon.activate_with(handovers).unwrap();
    assert!(s.balloon.is_activated());
    // The queue sizes are the frontend's, not the device's maximum.
    for i in 0..s.rings.len() {
        assert_eq!(s.balloon.queue(i).unwrap().size(), 256, "queue {i}");
        assert_eq!(s.balloon.queue(i).unwrap().max_size(), 1024, "queue {i}");
    }
    // Every queue is looked at once: the device signalled the VMM's kick eventfds.
    for (i, k) in s.kicks.iter().enumerate() {
        assert_eq!(k.read().unwrap(), 1, "kick {i} not re-armed at activation");
    }
    s.balloon.handle_event(DeviceEvent::Queue(stats));
    assert!(
        s.balloon.latest_stats().is_some(),
        "the early stats buffer was read"
    );
    // The device holds the statistics buffer: nothing used, no interrupt yet.
    assert!(s.irq.used.lock().unwrap().is_empty());
    assert!(s.balloon.request_stats());
    assert_eq!(*s.irq.used.lock().unwrap(), vec![stats]);
}

#[test]
fn used_buffers_are_signalled_per_queue_and_config_changes_apart() {
    let mut s = setup(256, 256);
    s.balloon.ack_features(s.features()).unwrap();
    let handovers = s.handovers();
    s.balloon.activate_with(handovers).unwrap();
    let (inflate, deflate) = (s.index(QueueRole::Inflate), s.index(QueueRole::Deflate));
    s.mem.write_obj(0x200u32, GuestAddress(0x9000)).unwrap();
    s.rings[deflate]
        .add(&s.mem, &[Part::out(GuestAddress(0x9000), 4)], false, 7)
        .unwrap();
    s.balloon.process_queue(deflate);
    s.rings[inflate]
        .add(&s.mem, &[Part::out(GuestAddress(0x9000), 4)], false, 8)
        .unwrap();
    s.balloon.process_queue(inflate);
    assert_eq!(*s.irq.used.lock().unwrap(), vec![deflate, inflate]);
    assert_eq!(*s.irq.config.lock().unwrap(), 0);

    let generation = s.balloon.interrupt().config_generation();
    s.balloon.set_target(100);
    assert_eq!(*s.irq.config.lock().unwrap(), 1);
    assert_eq!(s.balloon.interrupt().config_generation(), generation + 1);
    s.balloon.hint_control().start_round();
    assert_eq!(*s.irq.config.lock().unwrap(), 2);
    // The default irqfd is not signalled once another delivery is chosen.
    assert!(s.balloon.interrupt().eventfd().read().is_err());
}

#[test]
fn partial_batches_rearm_the_vmm_kick_and_nothing_else() {
    let mut s = setup(256, 4);
    s.balloon.ack_features(s.features()).unwrap();
    let handovers = s.handovers();
    let own: Vec<i32> = s.balloon.event_fds().iter().map(|(fd, _)| *fd).collect();
    s.balloon.activate_with(handovers).unwrap();
    for k in &s.kicks {
        let _ = k.read();
    }
    let fpq = s.index(QueueRole::FreePage);
    let hint = s.balloon.hint_control();
    let id = hint.start_round();
    s.mem.write_obj(id, GuestAddress(0xa000)).unwrap();
    s.rings[fpq]
        .add(&s.mem, &[Part::out(GuestAddress(0xa000), 4)], false, 0)
        .unwrap();
    for b in 0..9u64 {
        s.rings[fpq]
            .add(
                &s.mem,
                &[Part::input(GuestAddress(0x40_0000 + b * 0x1000), 0x1000)],
                false,
                b + 1,
            )
            .unwrap();
    }
    // Ten elements, four per wakeup: the device re-arms the VMM's kick after each partial
    // batch, so serving the kick until it stays quiet drains the ring.
    s.balloon.process_queue(fpq);
    let mut wakeups = 1;
    while s.kicks[fpq].read().is_ok() {
        s.balloon.process_queue(fpq);
        wakeups += 1;
        assert!(wakeups < 10, "the queue never drained");
    }
    assert_eq!(wakeups, 3);
    assert_eq!(hint.status().state, HintState::Start);
    assert_eq!(s.sink.total_bytes(), 9 * 0x1000);
    // The event sources now list the VMM's kick eventfds, not the device's own.
    let after = s.balloon.event_fds();
    assert_eq!(after.len(), own.len());
    for (i, k) in s.kicks.iter().enumerate() {
        let (fd, event) = after[i];
        assert_eq!(event, DeviceEvent::Queue(i));
        assert!(
            !own.contains(&fd),
            "queue {i} still lists the device's own eventfd"
        );
        // The listed descriptor is the VMM's eventfd: a write to it wakes the VMM's copy.
        let one = 1u64.to_ne_bytes();
        // SAFETY: `fd` is an eventfd the device keeps open while it lives; writing 8 bytes
        // from a local buffer touches no other memory.
        let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        assert_eq!(n, 8);
        assert_eq!(k.read().unwrap(), 1, "queue {i}");
    }
    assert!(after.iter().any(|(_, e)| *e == DeviceEvent::StatsTimer));
    assert!(after.iter().any(|(_, e)| *e == DeviceEvent::FlushTimer));
    // The live state of the free page queue tells where the device stopped.
    assert_eq!(s.balloon.live_queue_state(fpq).unwrap().next_avail, 10);
}

#[test]
fn a_bad_handover_leaves_the_device_as_it_was() {
    let mut s = setup(256, 256);
    s.balloon.ack_features(s.features()).unwrap();
    let own = s.balloon.event_fds();

    // Too many queues.
    let mut too_many = s.handovers();
    too_many.push(QueueHandover {
        state: state_of(&s.rings[0]),
        kick: None,
    });
    assert!(matches!(
        s.balloon.activate_with(too_many),
        Err(ActivateError::TooManyQueues { given: 6, max: 5 })
    ));

    // A size that is not a power of two, and one above the device's maximum.
    for size in [100u16, 2048] {
        let mut bad = s.handovers();
        bad[2].state.size = size;
        assert!(matches!(
            s.balloon.activate_with(bad),
            Err(ActivateError::InvalidQueue { index: 2 })
        ));
    }

    // A ring outside guest memory: refused when the device checks it against memory.
    let mut outside = s.handovers();
    outside[1].state.used_ring = MEM_SIZE - 0x10;
    assert!(matches!(
        s.balloon.activate_with(outside),
        Err(ActivateError::InvalidQueue { index: 1 })
    ));

    assert!(!s.balloon.is_activated());
    assert_eq!(
        s.balloon.event_fds(),
        own,
        "the device's own eventfds are back"
    );
    assert_eq!(s.balloon.queue(0).unwrap().size(), 1024);

    // A good handover still works afterwards.
    let good = s.handovers();
    s.balloon.activate_with(good).unwrap();
    let again = s.handovers();
    assert!(matches!(
        s.balloon.activate_with(again),
        Err(ActivateError::AlreadyActive)
    ));
}

#[test]
fn features_may_be_acknowledged_again_until_activation() {
    let mut s = setup(256, 256);
    let all = s.features();
    let poison = 1u64 << f::VIRTIO_BALLOON_F_PAGE_POISON;
    // Linux 6.1 acknowledges twice, the second time without PAGE_POISON.
    s.balloon.ack_features(all).unwrap();
    s.balloon.ack_features(all & !poison).unwrap();
    assert_eq!(s.balloon.driver_features(), all & !poison);
    assert!((0..5).all(|i| s.balloon.queue_negotiated(i)));
    assert!(!s.balloon.queue_negotiated(5));
    // Without reporting the driver leaves the last queue alone.
    let reporting = 1u64 << f::VIRTIO_BALLOON_F_REPORTING;
    s.balloon.ack_features(all & !poison & !reporting).unwrap();
    let rq = s.index(QueueRole::Reporting);
    assert!(!s.balloon.queue_negotiated(rq));
    assert!(s.balloon.queue_negotiated(s.index(QueueRole::FreePage)));
    assert!(matches!(
        s.balloon
            .ack_features(all & !(1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)),
        Err(FeatureError::NoVersion1)
    ));
    assert!(matches!(
        s.balloon.ack_features(all | 1u64 << 40),
        Err(FeatureError::NotOffered(_))
    ));
    s.balloon.ack_features(all & !poison).unwrap();
    let handovers = s.handovers();
    s.balloon.activate_with(handovers).unwrap();
    // Once active, the same features are fine and any change is refused.
    s.balloon.ack_features(all & !poison).unwrap();
    assert!(matches!(
        s.balloon.ack_features(all),
        Err(FeatureError::AfterActivation(_))
    ));
    assert_eq!(s.balloon.driver_features(), all & !poison);
}

#[test]
fn a_round_requested_before_activation_is_announced_on_activation() {
    let mut s = setup(256, 256);
    let hint = s.balloon.hint_control();
    hint.start_round();
    assert_eq!(*s.irq.config.lock().unwrap(), 0, "no driver yet");
    s.balloon.ack_features(s.features()).unwrap();
    let handovers = s.handovers();
    s.balloon.activate_with(handovers).unwrap();
    assert_eq!(*s.irq.config.lock().unwrap(), 1);
    // Reset goes back to the device's own eventfds only through a new handover; the
    // interrupt keeps the chosen delivery until the VMM resets it.
    s.balloon.reset();
    s.balloon.interrupt().reset_delivery();
    s.balloon.set_target(1);
    assert_eq!(*s.irq.config.lock().unwrap(), 1);
}

/// A sink that also records every element of the free page queue, as a capture tool does.
#[derive(Debug, Default)]
struct ElementSink {
    elements: Mutex<Vec<virtio_balloon::sink::FreePageElement>>,
}

impl virtio_balloon::sink::FreePageSink for ElementSink {
    fn free_page_hint(&self, _cmd_id: u32, _gpa: GuestAddress, _len: u64) {}
    fn records_elements(&self) -> bool {
        true
    }
    fn free_page_element(&self, element: &virtio_balloon::sink::FreePageElement) {
        self.elements.lock().unwrap().push(*element);
    }
}

#[test]
fn a_sink_may_see_every_free_page_element_as_posted() {
    let mut s = setup(8, 256);
    let sink = Arc::new(ElementSink::default());
    let mut balloon = Balloon::new(*s.balloon.config(), s.mem.clone(), sink.clone()).unwrap();
    balloon.ack_features(balloon.device_features()).unwrap();
    let handovers = s.handovers();
    balloon.activate_with(handovers).unwrap();
    let fpq = s.index(QueueRole::FreePage);
    let hint = balloon.hint_control();
    let id = hint.start_round();
    s.mem.write_obj(id, GuestAddress(0xa000)).unwrap();
    s.mem.write_obj(0u32, GuestAddress(0xa004)).unwrap();
    // Twelve buffers through a ring of eight: positions run past the size, heads repeat.
    let mut posted = vec![(0xa000u64, 4u32, 0u16)];
    s.rings[fpq]
        .add(&s.mem, &[Part::out(GuestAddress(0xa000), 4)], false, 0)
        .unwrap();
    balloon.process_queue(fpq);
    for b in 0..10u64 {
        let addr = 0x40_0000 + b * 0x1000;
        s.rings[fpq]
            .add(
                &s.mem,
                &[Part::input(GuestAddress(addr), 0x1000)],
                false,
                b + 1,
            )
            .unwrap();
        posted.push((addr, 0x1000, 2));
        balloon.process_queue(fpq);
        s.rings[fpq].reclaim_all(&s.mem).unwrap();
    }
    s.rings[fpq]
        .add(&s.mem, &[Part::out(GuestAddress(0xa004), 4)], false, 11)
        .unwrap();
    posted.push((0xa004, 4, 0));
    balloon.process_queue(fpq);
    assert!(hint.status().round_complete);
    let seen = sink.elements.lock().unwrap().clone();
    assert_eq!(seen.len(), 12);
    for (i, (e, want)) in seen.iter().zip(&posted).enumerate() {
        assert_eq!(e.position, i as u16);
        assert!(e.head < 8);
        assert_eq!((e.addr, e.len, e.flags), *want, "element {i}");
    }
    assert!(
        seen.iter().filter(|e| e.head == seen[1].head).count() > 1,
        "heads reused"
    );
}

#[test]
fn poison_val_stays_writable_after_a_handover_until_first_used() {
    let mut s = setup(256, 256);
    s.balloon.ack_features(s.features()).unwrap();
    let handovers = s.handovers();
    s.balloon.activate_with(handovers).unwrap();
    // Linux writes poison_val after it kicked its statistics buffer, before DRIVER_OK: the
    // device activated from a handover takes it.
    s.balloon.write_config(12, &0xaaaa_aaaau32.to_le_bytes());
    assert_eq!(s.balloon.poison_val(), 0xaaaa_aaaa);
    assert_eq!(s.balloon.metrics().late_poison_writes, 0);
    // The first report fixes it: the element is skipped (a discard would break the poison).
    let rq = s.index(QueueRole::Reporting);
    s.rings[rq]
        .add(
            &s.mem,
            &[Part::input(GuestAddress(0x40_0000), 0x40_0000)],
            false,
            1,
        )
        .unwrap();
    s.balloon.process_queue(rq);
    assert_eq!(s.balloon.metrics().pages.reporting_elements_skipped, 1);
    s.balloon.write_config(12, &0u32.to_le_bytes());
    assert_eq!(s.balloon.poison_val(), 0xaaaa_aaaa, "latched at first use");
    assert_eq!(s.balloon.metrics().late_poison_writes, 1);
}

#[test]
fn a_done_given_while_the_vrings_were_stopped_reaches_the_driver_when_they_return() {
    use virtio_balloon::migration::{MigrationState, PrecopyEvent, PrecopyNotifierChain};
    let mut s = setup(256, 256);
    s.balloon.ack_features(s.features()).unwrap();
    s.balloon.activate_with(s.handovers()).unwrap();
    let hint = s.balloon.hint_control();
    let mut chain = PrecopyNotifierChain::new();
    chain.add(Arc::new(hint.clone()));
    let running = MigrationState {
        vm_running: true,
        postcopy: false,
    };
    let stopped = MigrationState {
        vm_running: false,
        postcopy: false,
    };
    chain
        .notify(PrecopyEvent::AfterBitmapSync, running)
        .unwrap();
    assert_eq!(hint.status().state, HintState::Requested);
    let before = *s.irq.config.lock().unwrap();
    // The VMM pauses the guest and stops the vrings: the device is reset.
    s.balloon.reset();
    // The copy's final stage: STOP, then DONE once everything is written.
    chain
        .notify(PrecopyEvent::BeforeBitmapSync, stopped)
        .unwrap();
    chain
        .notify(PrecopyEvent::AfterBitmapSync, stopped)
        .unwrap();
    chain.notify(PrecopyEvent::Cleanup, stopped).unwrap();
    assert_eq!(hint.status().state, HintState::Done);
    assert_eq!(
        *s.irq.config.lock().unwrap(),
        before,
        "no driver to tell yet"
    );
    // The guest resumes: the frontend acknowledges the features again and hands the
    // vrings back; the driver is told, and reads DONE.
    s.balloon.ack_features(s.features()).unwrap();
    s.balloon.activate_with(s.handovers()).unwrap();
    assert_eq!(*s.irq.config.lock().unwrap(), before + 1);
    let mut cmd_id = [0u8; 4];
    s.balloon.read_config(8, &mut cmd_id);
    assert_eq!(
        u32::from_le_bytes(cmd_id),
        1,
        "free_page_hint_cmd_id reads DONE"
    );
}
