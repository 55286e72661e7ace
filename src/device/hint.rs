// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The free page hint state machine and the migration thread's handle on it.
//!
//! States and transitions follow QEMU's model of the free page hint protocol (the device
//! publishes a command id, the guest answers with a start buffer carrying it, sends hints,
//! and ends with a STOP buffer; `docs/protocol.md` describes the exchange):
//!
//! | state | config shows | hints | left by |
//! | --- | --- | --- | --- |
//! | [`Stop`](HintState::Stop) | 0 | ignored | `start_round`, `done` |
//! | [`Requested`](HintState::Requested) | the id | ignored | the guest's start buffer with that id → START |
//! | [`Start`](HintState::Start) | the id | applied | any out-buffer (the guest's STOP) → STOP; `stop_round`; `done` |
//! | [`Done`](HintState::Done) | 1 | ignored | `start_round` |
//!
//! Two things differ from QEMU, both on purpose:
//!
//! * The configuration shows the current id in START too (QEMU shows 0 there), so a
//!   configuration interrupt for another reason does not end the guest's round (Linux
//!   re-reads the id on every configuration interrupt and stops hinting when it changed).
//! * A start buffer is accepted only if the guest made it available after the id was
//!   published (a *fence* on the ring position). Linux keeps the id of every round's start
//!   buffer in one memory slot; a device that fell a round behind would otherwise read the
//!   new id out of the old round's start buffer and apply the old round's hints after the new
//!   sync, clearing pages the guest may have written since. `stop_round` and `done` also
//!   consume everything queued so far, so nothing of a finished round is left on the ring.
//!
//! While a driver runs, every change of the shown value moves the configuration generation.
//! The device's own changes (`start_round`, `stop_round`, `done`) also raise the
//! configuration interrupt; the one the guest causes (its STOP, START → STOP) does not, as
//! the guest knows about it. A reset moves nothing: the next driver starts over.
//!
//! One lock (the *hint lock*) covers the state and the free page queue. The event loop holds
//! it while it handles a batch of elements and calls the sink; [`FreePageHinting::stop_round`]
//! takes it, so once `stop_round` returns no element is half applied and none will be applied
//! until the next round.
//!
//! Ordering guarantee: an element is put on the used ring only after all its hints have
//! reached the sink, so a guest (or a test) that sees the element used knows the sink has
//! its ranges.

use std::fmt;
use std::num::Wrapping;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::eventfd::EventFd;

use super::descriptor::{for_each_hint, inspect, HintOutcome};
use super::queue::serve;
use crate::defs::cmd_id;
use crate::migration::{NotifierError, PrecopyContext, PrecopyEvent, PrecopyNotifier};
use crate::ratelimit::{warn_limited, RateLimit};
use crate::sink::{FreePageElement, FreePageSink};
use crate::transport::Interrupt;

static BAD_ELEMENT: RateLimit = RateLimit::new();

/// The state of free page hinting.
///
/// Not `#[non_exhaustive]`: these are the four states of the free page hint protocol, and a
/// model of the device (the fuzz targets) matches them exhaustively on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HintState {
    /// Idle or stopped: hints are ignored.
    Stop,
    /// A new id is published; waiting for the guest's start buffer with it.
    Requested,
    /// The guest started the round: hints are applied.
    Start,
    /// The device no longer needs hinted pages; the guest may free them.
    Done,
}

impl fmt::Display for HintState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HintState::Stop => "stop",
            HintState::Requested => "requested",
            HintState::Start => "start",
            HintState::Done => "done",
        })
    }
}

/// Counters of the free page queue since the device was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HintMetrics {
    /// Elements popped from the free page queue.
    pub elements: u64,
    /// Elements refused as a whole (bad chain, order violation, short or unreadable command).
    pub malformed_elements: u64,
    /// Start buffers that started a round.
    pub rounds_started: u64,
    /// Out-buffers that ended a round (the guest's STOP).
    pub rounds_stopped_by_guest: u64,
    /// Commands ignored in REQUESTED: a stale or wrong id, or a start buffer older than the id.
    pub stale_commands: u64,
    /// Commands ignored in STOP or DONE.
    pub ignored_commands: u64,
    /// Writable descriptors that delivered at least one page.
    pub hints_accepted: u64,
    /// Bytes delivered to the sink.
    pub bytes_accepted: u64,
    /// Writable descriptors ignored because no round was started.
    pub hints_wrong_state: u64,
    /// Zero-length writable descriptors.
    pub hints_zero_length: u64,
    /// Writable descriptors whose `addr + len` overflows.
    pub hints_overflow: u64,
    /// Writable descriptors with no whole page once rounded inward.
    pub hints_misaligned: u64,
    /// Writable descriptors with a part outside guest RAM (that part was dropped).
    pub hints_outside_ram: u64,
    /// Elements consumed by `stop_round` or `done` without being applied.
    pub drained: u64,
}

impl HintMetrics {
    fn record(&mut self, o: HintOutcome) {
        if o.accepted > 0 {
            self.hints_accepted += 1;
            self.bytes_accepted = self.bytes_accepted.saturating_add(o.accepted);
        }
        self.hints_zero_length += u64::from(o.zero_length);
        self.hints_overflow += u64::from(o.overflow);
        self.hints_misaligned += u64::from(o.too_small);
        self.hints_outside_ram += u64::from(o.outside_ram > 0);
    }
}

/// A snapshot of free page hinting, from [`FreePageHinting::status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct HintRound {
    /// The current state.
    pub state: HintState,
    /// The id of the current (or last) round; 0 before the first round.
    pub cmd_id: u32,
    /// Whether the guest has ended the round `cmd_id` with its STOP.
    pub round_complete: bool,
    /// Whether the current driver negotiated free page hinting.
    pub negotiated: bool,
    /// The free page queue's counters.
    pub metrics: HintMetrics,
}

/// The next round id after `prev`: never 0 (STOP) or 1 (DONE).
fn next_cmd_id(prev: u32) -> u32 {
    match prev.checked_add(1) {
        Some(id) if id >= cmd_id::MIN_ROUND => id,
        _ => cmd_id::MIN_ROUND,
    }
}

/// The state protected by the hint lock, apart from the queue.
pub(super) struct HintCore {
    state: HintState,
    cmd_id: u32,
    /// Start buffers at ring positions before this one were posted before the id was
    /// published and cannot carry it legitimately.
    fence: Option<Wrapping<u16>>,
    /// The id of the last round the guest ended with its STOP.
    completed: Option<u32>,
    sink: Arc<dyn FreePageSink>,
    /// The sink asked for every element ([`FreePageSink::records_elements`]).
    record_elements: bool,
    file_backed_ok: bool,
    metrics: HintMetrics,
}

impl HintCore {
    fn config_value(&self) -> u32 {
        match self.state {
            HintState::Stop => cmd_id::STOP,
            HintState::Done => cmd_id::DONE,
            HintState::Requested | HintState::Start => self.cmd_id,
        }
    }

    /// Handles one popped element. `pos` is its position in the available ring, `max_len`
    /// the queue size (the longest chain accepted).
    pub(super) fn handle<M>(&mut self, chain: &DescriptorChain<M>, pos: Wrapping<u16>, max_len: u16)
    where
        M: std::ops::Deref + Clone,
        M::Target: GuestMemoryBackend,
    {
        self.metrics.elements += 1;
        if self.record_elements {
            if let Some(d) = chain.clone().next() {
                self.sink.free_page_element(&FreePageElement {
                    position: pos.0,
                    head: chain.head_index(),
                    addr: d.addr().0,
                    len: d.len(),
                    flags: d.flags(),
                });
            }
        }
        let element = match inspect(chain, max_len) {
            Ok(e) => e,
            Err(e) => {
                self.metrics.malformed_elements += 1;
                warn_limited!(BAD_ELEMENT, "free page queue: element ignored: {:?}", e);
                return;
            }
        };
        if let Some(cmd) = element.command {
            self.on_command(cmd, pos);
        }
        if element.writable == 0 {
            return;
        }
        if self.state != HintState::Start {
            self.metrics.hints_wrong_state += u64::from(element.writable);
            return;
        }
        let id = self.cmd_id;
        let sink = &self.sink;
        let metrics = &mut self.metrics;
        for_each_hint(
            chain,
            &element,
            self.file_backed_ok,
            |gpa, len| sink.free_page_hint(id, gpa, len),
            |o| metrics.record(o),
        );
    }

    fn on_command(&mut self, cmd: u32, pos: Wrapping<u16>) {
        match self.state {
            HintState::Requested => {
                let fresh = self.fence.is_none_or(|f| (pos - f).0 < 0x8000);
                if cmd == self.cmd_id && fresh {
                    self.state = HintState::Start;
                    self.metrics.rounds_started += 1;
                } else {
                    self.metrics.stale_commands += 1;
                }
            }
            HintState::Start => {
                // Any out-buffer ends the round, as in QEMU: the guest's STOP, or a second start
                // buffer the spec forbids.
                self.state = HintState::Stop;
                self.completed = Some(self.cmd_id);
                self.metrics.rounds_stopped_by_guest += 1;
            }
            HintState::Stop | HintState::Done => self.metrics.ignored_commands += 1,
        }
    }
}

/// The activated free page queue, type-erased so [`FreePageHinting`] needs no memory type.
pub(super) trait ActiveQueue: Send {
    /// Pops and handles up to `budget` elements. Returns true when elements were left on
    /// the ring (the queue's eventfd has then been signalled again).
    fn run(&mut self, core: &mut HintCore, budget: usize, irq: &Interrupt) -> bool;
    /// The driver's current available index.
    fn avail_idx(&self) -> Option<Wrapping<u16>>;
    /// The queue size.
    fn size(&self) -> u16;
    /// The queue's state, for a snapshot.
    fn state(&self) -> QueueState;
}

/// The free page queue with the guest memory it lives in.
pub(super) struct FreePageQueue<M> {
    pub(super) queue: Queue,
    pub(super) mem: M,
    /// The queue's index, for logs.
    pub(super) index: usize,
    /// A clone of the queue's eventfd, to re-arm the event loop after a partial batch.
    pub(super) evt: EventFd,
}

impl<M> ActiveQueue for FreePageQueue<M>
where
    M: GuestAddressSpace + Send,
    M::M: GuestMemoryBackend,
{
    fn run(&mut self, core: &mut HintCore, budget: usize, irq: &Interrupt) -> bool {
        let guard = self.mem.memory();
        let size = self.queue.size();
        serve(
            &mut self.queue,
            &*guard,
            self.index,
            budget,
            irq,
            &self.evt,
            |chain, pos| {
                core.handle(chain, pos, size);
                Some(chain.head_index())
            },
        )
    }

    fn avail_idx(&self) -> Option<Wrapping<u16>> {
        let guard = self.mem.memory();
        self.queue.avail_idx(&*guard, Ordering::Acquire).ok()
    }

    fn size(&self) -> u16 {
        self.queue.size()
    }

    fn state(&self) -> QueueState {
        self.queue.state()
    }
}

struct HintInner {
    core: HintCore,
    queue: Option<Box<dyn ActiveQueue>>,
}

/// State shared by the device, its event loop and every [`FreePageHinting`].
pub(super) struct HintShared {
    inner: Mutex<HintInner>,
    cond: Condvar,
    irq: Arc<Interrupt>,
    config_id: AtomicU32,
    negotiated: AtomicBool,
    paused: AtomicBool,
    /// A round was requested since the last DONE: a driver may hold hinted pages.
    owes_done: AtomicBool,
}

impl fmt::Debug for HintShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HintShared")
            .field("config_id", &self.config_id)
            .field("negotiated", &self.negotiated)
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

impl HintShared {
    pub(super) fn new(
        irq: Arc<Interrupt>,
        sink: Arc<dyn FreePageSink>,
        file_backed_ok: bool,
    ) -> Self {
        HintShared {
            inner: Mutex::new(HintInner {
                core: HintCore {
                    state: HintState::Stop,
                    cmd_id: 0,
                    fence: None,
                    completed: None,
                    record_elements: sink.records_elements(),
                    sink,
                    file_backed_ok,
                    metrics: HintMetrics::default(),
                },
                queue: None,
            }),
            cond: Condvar::new(),
            irq,
            config_id: AtomicU32::new(cmd_id::STOP),
            negotiated: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            owes_done: AtomicBool::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HintInner> {
        // A panic while the lock was held cannot leave the state inconsistent (each field is
        // valid on its own), so keep going rather than poisoning every later caller.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the configuration space shows in `free_page_hint_cmd_id`.
    pub(super) fn config_value(&self) -> u32 {
        self.config_id.load(Ordering::Acquire)
    }

    /// Makes the configuration show the current state; returns whether the value changed.
    fn publish(&self, inner: &HintInner) -> bool {
        let value = inner.core.config_value();
        self.config_id.swap(value, Ordering::AcqRel) != value
    }

    pub(super) fn set_negotiated(&self, on: bool) {
        self.negotiated.store(on, Ordering::Release);
    }

    pub(super) fn negotiated(&self) -> bool {
        self.negotiated.load(Ordering::Acquire)
    }

    pub(super) fn paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    pub(super) fn set_paused(&self, paused: bool) {
        // Taking the lock waits for the event loop to finish its batch.
        let _g = self.lock();
        self.paused.store(paused, Ordering::Release);
    }

    /// Hands the activated free page queue over. If a round was requested, or DONE given,
    /// while no driver was active, tells the driver about it now: a VMM that stops the
    /// vrings while the guest is paused (vhost-user's `GET_VRING_BASE`) resets the device,
    /// and the DONE that ends a migration or snapshot in that pause must still reach the
    /// driver that holds the hinted pages once the guest runs again.
    pub(super) fn activate(&self, queue: Box<dyn ActiveQueue>) {
        let mut g = self.lock();
        let requested = g.core.state == HintState::Requested;
        if requested {
            g.core.fence = queue.avail_idx();
        }
        let announce = requested || g.core.state == HintState::Done;
        g.queue = Some(queue);
        drop(g);
        if announce {
            self.irq.signal_config_change();
        }
    }

    /// Device reset: back to STOP (no interrupt: the driver is gone), queue dropped, id kept.
    pub(super) fn reset(&self) {
        let mut g = self.lock();
        g.queue = None;
        g.core.state = HintState::Stop;
        g.core.fence = None;
        self.publish(&g);
        drop(g);
        self.negotiated.store(false, Ordering::Release);
        self.paused.store(false, Ordering::Release);
        self.cond.notify_all();
    }

    /// The round id, the state, the activated queue's state and the counters, for a
    /// snapshot. Taking the lock waits for an element being applied.
    pub(super) fn snapshot(&self) -> (u32, HintState, Option<QueueState>, HintMetrics) {
        let g = self.lock();
        (
            g.core.cmd_id,
            g.core.state,
            g.queue.as_ref().map(|q| q.state()),
            g.core.metrics,
        )
    }

    /// Restores the id counter and the counters of a saved device (before activation).
    pub(super) fn restore(&self, cmd_id: u32, metrics: HintMetrics) {
        let mut g = self.lock();
        g.core.cmd_id = cmd_id;
        g.core.metrics = metrics;
        g.core.state = HintState::Stop;
        g.core.completed = None;
        self.publish(&g);
    }

    /// Handles up to `budget` elements of the free page queue (the event loop's entry point).
    pub(super) fn process(&self, budget: usize) {
        // The caller (`Balloon::process_queue`) does not call this while paused.
        let mut g = self.lock();
        let before = (g.core.state, g.core.completed);
        let HintInner { core, queue } = &mut *g;
        if let Some(q) = queue.as_mut() {
            q.run(core, budget, &self.irq);
        }
        let changed = before != (g.core.state, g.core.completed);
        let shown_changed = self.publish(&g);
        drop(g);
        if shown_changed {
            // The guest's STOP moved the shown id to 0: a configuration change the guest
            // caused itself, so no interrupt, but a driver reading the configuration across
            // it must see a new generation.
            self.irq.bump_config_generation();
        }
        if changed {
            self.cond.notify_all();
        }
    }

    /// Moves to `state` under the lock and consumes everything already on the ring.
    fn device_transition(&self, state: HintState) -> bool {
        let mut g = self.lock();
        if state == HintState::Done {
            self.owes_done.store(false, Ordering::Release);
        }
        let changed = g.core.state != state;
        g.core.state = state;
        let HintInner { core, queue } = &mut *g;
        if let Some(q) = queue.as_mut() {
            if !self.paused.load(Ordering::Acquire) {
                let before = core.metrics.elements;
                q.run(core, usize::from(q.size()), &self.irq);
                core.metrics.drained += core.metrics.elements - before;
            }
        }
        self.publish(&g);
        drop(g);
        self.cond.notify_all();
        if changed {
            self.irq.signal_config_change();
        }
        changed
    }

    fn start_round(&self) -> u32 {
        let mut g = self.lock();
        let id = next_cmd_id(g.core.cmd_id);
        g.core.cmd_id = id;
        g.core.state = HintState::Requested;
        self.owes_done.store(true, Ordering::Release);
        g.core.completed = None;
        // Read the fence before the id becomes visible: a start buffer the guest posts after
        // reading the id sits at or after it.
        g.core.fence = g.queue.as_ref().and_then(|q| q.avail_idx());
        self.publish(&g);
        drop(g);
        self.cond.notify_all();
        self.irq.signal_config_change();
        id
    }

    pub(super) fn status(&self) -> HintRound {
        let g = self.lock();
        HintRound {
            state: g.core.state,
            cmd_id: g.core.cmd_id,
            round_complete: g.core.cmd_id != 0 && g.core.completed == Some(g.core.cmd_id),
            negotiated: self.negotiated(),
            metrics: g.core.metrics,
        }
    }

    fn wait_round_complete(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let mut g = self.lock();
        let id = g.core.cmd_id;
        loop {
            if id != 0 && g.core.completed == Some(id) {
                return true;
            }
            let active = matches!(g.core.state, HintState::Requested | HintState::Start);
            if g.core.cmd_id != id || !active {
                return false;
            }
            let wait = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => left,
                    _ => return false,
                },
                None => Duration::from_secs(3600),
            };
            g = self
                .cond
                .wait_timeout(g, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The migration thread's handle on free page hinting. `Clone + Send + Sync`.
///
/// Get it from [`Balloon::hint_control`](crate::Balloon::hint_control). It is also the
/// device's [`PrecopyNotifier`]: register it in a
/// [`PrecopyNotifierChain`](crate::migration::PrecopyNotifierChain) and the migration's
/// bitmap syncs drive the rounds.
#[derive(Clone)]
pub struct FreePageHinting {
    shared: Arc<HintShared>,
}

impl fmt::Debug for FreePageHinting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FreePageHinting")
            .field("status", &self.status())
            .finish()
    }
}

impl FreePageHinting {
    pub(super) fn new(shared: Arc<HintShared>) -> Self {
        FreePageHinting { shared }
    }

    /// Publishes a new round id (never 0 or 1, always larger than the last one until it
    /// wraps), moves to REQUESTED and raises the configuration interrupt. Dirty logging must
    /// already be on. Returns the id.
    pub fn start_round(&self) -> u32 {
        self.shared.start_round()
    }

    /// Stops the current round (STOP). Returns once no element is being applied; elements
    /// already on the ring are consumed without being applied. Raises the configuration
    /// interrupt if the state changed. Call it before every dirty bitmap sync.
    pub fn stop_round(&self) {
        self.shared.device_transition(HintState::Stop);
    }

    /// Tells the guest it may free its hinted pages (DONE), with the same guarantees as
    /// [`stop_round`](Self::stop_round). Call it when the migration ends or is cancelled.
    pub fn done(&self) {
        self.shared.device_transition(HintState::Done);
    }

    /// The current state, round id and counters.
    pub fn status(&self) -> HintRound {
        self.shared.status()
    }

    /// Waits until the guest has ended the current round with its STOP, or `timeout` passes.
    ///
    /// Returns true if the guest completed the round; false on timeout, or when the round
    /// was stopped, finished or replaced meanwhile, or when no round is running. A
    /// migration can call it after `start_round` to let the hints arrive before its first
    /// pass, so it does not send pages that are about to be reported free.
    pub fn wait_round_complete(&self, timeout: Duration) -> bool {
        self.shared.wait_round_complete(timeout)
    }

    /// Whether the driver negotiated free page hinting.
    pub fn negotiated(&self) -> bool {
        self.shared.negotiated()
    }
}

impl PrecopyNotifier for FreePageHinting {
    fn name(&self) -> &str {
        "virtio-balloon free page hinting"
    }

    fn notify(&self, event: PrecopyEvent, ctx: &PrecopyContext<'_>) -> Result<(), NotifierError> {
        // Hinting is an optimisation: with postcopy possible (a page skipped here could
        // never be fetched by the destination), do nothing.
        if ctx.postcopy_enabled() {
            return Ok(());
        }
        match event {
            // Rounds only for a driver that negotiated hinting.
            PrecopyEvent::BeforeBitmapSync if self.negotiated() => self.stop_round(),
            PrecopyEvent::AfterBitmapSync if ctx.vm_running() && self.negotiated() => {
                self.start_round();
            }
            PrecopyEvent::AfterBitmapSync if ctx.vm_running() => {}
            // DONE also while no driver is active after a round: the device may be between
            // a reset and its next activation (a VMM that stopped the vrings with the
            // guest), and the driver that holds hinted pages learns of it when the device
            // is activated again. An active driver that did not negotiate hinting, or a
            // device that never asked for hints, is left alone.
            PrecopyEvent::AfterBitmapSync | PrecopyEvent::Cleanup
                if self.negotiated()
                    || (!self.shared.irq.driver_ok()
                        && self.shared.owes_done.load(Ordering::Acquire)) =>
            {
                self.done();
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_skip_reserved_values() {
        assert_eq!(next_cmd_id(0), 2);
        assert_eq!(next_cmd_id(1), 2);
        assert_eq!(next_cmd_id(2), 3);
        assert_eq!(next_cmd_id(u32::MAX), 2);
    }

    #[test]
    fn state_display() {
        let names: Vec<String> = [
            HintState::Stop,
            HintState::Requested,
            HintState::Start,
            HintState::Done,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(names, ["stop", "requested", "start", "done"]);
    }
}
