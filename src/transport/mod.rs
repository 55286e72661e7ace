// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The transport-neutral device interface and the virtio-mmio transport.
//!
//! [`VirtioDevice`] is what a transport needs from a device: its type, its features, its
//! queues and their eventfds, its configuration space, and activate/reset. It plays the role
//! of rust-vmm's `virtio-device` crate, which is not published. [`MmioTransport`] turns MMIO
//! register accesses into calls on it. A PCI transport can be written over the same trait.
//!
//! [`Interrupt`] is the device's side of its interrupt line: the interrupt status bits and
//! the configuration generation, delivered through an [`InterruptDelivery`]: by default
//! [`IrqFd`], one `EventFd` a VMM registers as an irqfd; a VMM with per-queue vectors or a
//! vhost-user frontend supplies its own. [`QueueHandover`] carries queue state and kick
//! eventfds from a VMM that set the rings up itself (no DRIVER_OK register) to the device.

mod mmio;

pub use mmio::{MmioState, MmioTransport, MMIO_MAGIC_VALUE, MMIO_VENDOR_ID, MMIO_VERSION};

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, RwLock};

use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

use crate::defs::features;
use crate::ratelimit::{warn_limited, RateLimit};

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivateError {
    /// A ready queue does not fit in guest memory or is badly laid out.
    #[error("queue {index} is not valid in guest memory")]
    InvalidQueue {
        /// The queue index.
        index: usize,
    },
    /// The driver did not accept `VIRTIO_F_VERSION_1`.
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    LegacyDriver,
    /// The device was already active.
    #[error("the device is already active")]
    AlreadyActive,
    /// More queues were handed over than the device has.
    #[error("{given} queues handed over, the device has {max}")]
    TooManyQueues {
        /// The number handed over.
        given: usize,
        /// The device's number of queues.
        max: usize,
    },
}

/// Why the device refused the features a driver acknowledged (FEATURES_OK stays clear).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FeatureError {
    /// The driver acknowledged bits the device does not offer.
    #[error("the driver acknowledged features {0:#x} that were not offered")]
    NotOffered(u64),
    /// The driver did not acknowledge `VIRTIO_F_VERSION_1`.
    #[error("the driver did not acknowledge VERSION_1")]
    NoVersion1,
    /// The acknowledged features would number the queues differently from the device.
    #[error("without features {0:#x} the driver would number the queues differently")]
    QueueLayout(u64),
    /// Features changed after the device was activated.
    #[error("features {0:#x} acknowledged after the device was activated")]
    AfterActivation(u64),
}

/// One queue as a VMM that set up the ring itself hands it to a device: a vhost-user
/// frontend's vring, a queue restored by the VMM, a transport without a DRIVER_OK register.
///
/// See [`Balloon::activate_with`](crate::Balloon::activate_with).
#[derive(Debug)]
pub struct QueueHandover {
    /// The ring as the VMM set it up: size (chosen by the VMM or its frontend, a power of
    /// two up to the device's maximum), addresses, `next_avail` and `next_used`, ready.
    /// `max_size` is ignored: the device's own maximum applies.
    pub state: QueueState,
    /// The VMM's own kick eventfd for this queue, if it has one. The device then uses it
    /// wherever it would use its own: it re-arms it after a partial batch, so the VMM
    /// watches no eventfd besides the ones it registered. `None` keeps the device's.
    pub kick: Option<EventFd>,
}

/// What a transport needs from a virtio device.
///
/// The transport owns the registers that only exist on the bus (status, the feature and
/// queue selectors); the device owns its features, queues, eventfds, configuration space and
/// interrupt. Guest-controlled values reach the device only through these methods, and no
/// method may panic on them.
pub trait VirtioDevice: Send {
    /// The virtio device id.
    fn device_type(&self) -> u32;

    /// The number of queues (the transport reports size 0 for any other index).
    fn num_queues(&self) -> usize;

    /// The queue at `index`, while the transport may still configure it.
    fn queue(&self, index: usize) -> Option<&Queue>;

    /// The queue at `index`, mutable, for the transport's queue registers.
    fn queue_mut(&mut self, index: usize) -> Option<&mut Queue>;

    /// The eventfd that wakes the device for the queue at `index`. A VMM registers it as an
    /// ioeventfd on the transport's notify address (virtio-mmio: `QueueNotify` with the queue
    /// index as datamatch).
    fn queue_event(&self, index: usize) -> Option<&EventFd>;

    /// The features the device offers.
    fn device_features(&self) -> u64;

    /// The features the driver acknowledged so far.
    fn driver_features(&self) -> u64;

    /// Stores one 32-bit page of the driver's features (page 0: bits 0-31, page 1: 32-63;
    /// other pages are ignored). The transport calls it only during feature negotiation.
    fn set_driver_features(&mut self, page: u32, value: u32);

    /// Checks the acknowledged features before FEATURES_OK is set. The default refuses bits
    /// that were not offered and drivers without `VIRTIO_F_VERSION_1`.
    fn validate_features(&self) -> Result<(), FeatureError> {
        let acked = self.driver_features();
        let extra = acked & !self.device_features();
        if extra != 0 {
            return Err(FeatureError::NotOffered(extra));
        }
        if acked & features::bit(VIRTIO_F_VERSION_1) == 0 {
            return Err(FeatureError::NoVersion1);
        }
        Ok(())
    }

    /// Called once the transport accepted FEATURES_OK: the negotiated features are final.
    fn features_ok(&mut self) {}

    /// Negotiates all 64 feature bits at once, for transports that carry them whole (a
    /// vhost-user `SET_FEATURES`, a restored VMM): stores them, checks them with
    /// [`validate_features`](Self::validate_features) and, if they pass, calls
    /// [`features_ok`](Self::features_ok). A driver may negotiate again before the device
    /// is activated (Linux's balloon acknowledges twice when it drops `PAGE_POISON`);
    /// once the device is active the features are final and this refuses any change.
    fn ack_features(&mut self, features: u64) -> Result<(), FeatureError> {
        if self.is_activated() {
            return if features == self.driver_features() {
                Ok(())
            } else {
                Err(FeatureError::AfterActivation(features))
            };
        }
        self.set_driver_features(0, features as u32);
        self.set_driver_features(1, (features >> 32) as u32);
        self.validate_features()?;
        self.features_ok();
        Ok(())
    }

    /// One 32-bit page of the offered features.
    fn device_features_page(&self, page: u32) -> u32 {
        match page {
            0 => self.device_features() as u32,
            1 => (self.device_features() >> 32) as u32,
            _ => 0,
        }
    }

    /// Reads configuration space bytes at `offset`. Bytes past the end read as `0xff`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes configuration space bytes at `offset`. Bytes past the end are dropped.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The device's interrupt line.
    fn interrupt(&self) -> &Interrupt;

    /// Starts the device once the driver sets DRIVER_OK.
    fn activate(&mut self) -> Result<(), ActivateError>;

    /// Returns the device to its initial state (the driver wrote 0 to the status).
    fn reset(&mut self);

    /// Whether the device is active.
    fn is_activated(&self) -> bool;
}

/// InterruptStatus bit: the device used a buffer in at least one queue.
const USED_BUFFER: u8 = VIRTIO_MMIO_INT_VRING as u8;
/// InterruptStatus bit: the configuration space changed.
const CONFIG_CHANGE: u8 = VIRTIO_MMIO_INT_CONFIG as u8;

static IRQ_WRITE_FAILED: RateLimit = RateLimit::new();

/// Where a device's interrupts go: the VMM's side of the interrupt line.
///
/// The device tells it *which* queue has new used buffers and, separately, that its
/// configuration changed, so a VMM can map them onto whatever its transport has: one irqfd
/// with an interrupt status register (virtio-mmio, PCI INTx: [`IrqFd`]), one MSI-X vector
/// per queue and one for the configuration, a vhost-user frontend's call eventfds and its
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, or Firecracker's interrupt trait.
///
/// Called from the device's event loop thread and from the migration thread; it must not
/// block for long. An error is logged (rate-limited) and otherwise ignored: the driver will
/// see the used buffers or the configuration at its next look.
pub trait InterruptDelivery: Send + Sync + fmt::Debug {
    /// Queue `queue` has new used buffers the driver should be told about.
    fn used_buffer(&self, queue: usize) -> io::Result<()>;

    /// The device's configuration changed (the driver should read it again).
    fn config_changed(&self) -> io::Result<()>;
}

/// One eventfd for every interrupt, as a virtio-mmio device has one line: a VMM registers it
/// as an irqfd and the driver reads the interrupt status register to tell used buffers from
/// configuration changes. The default delivery of [`Interrupt`].
#[derive(Debug)]
pub struct IrqFd {
    evt: EventFd,
}

impl IrqFd {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(IrqFd {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The eventfd to register as an irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl InterruptDelivery for IrqFd {
    fn used_buffer(&self, _queue: usize) -> io::Result<()> {
        self.evt.write(1)
    }

    fn config_changed(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

/// The device's interrupt: status bits, configuration generation and where interrupts go.
///
/// By default every interrupt signals one eventfd ([`IrqFd`], [`eventfd`](Self::eventfd)),
/// which a VMM registers as an irqfd (or reads and injects the interrupt itself);
/// [`set_delivery`](Self::set_delivery) sends them elsewhere. The configuration-change
/// interrupt is only raised while the driver has DRIVER_OK set (or the VMM activated the
/// device), as the virtio spec requires; the generation counter moves on every
/// configuration change, so a driver reading the configuration in several accesses always
/// notices a change in between.
#[derive(Debug)]
pub struct Interrupt {
    irqfd: Arc<IrqFd>,
    delivery: RwLock<Arc<dyn InterruptDelivery>>,
    status: AtomicU8,
    generation: AtomicU32,
    driver_ok: AtomicBool,
}

impl Interrupt {
    /// A new interrupt delivered through a non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        let irqfd = Arc::new(IrqFd::new()?);
        Ok(Interrupt {
            delivery: RwLock::new(irqfd.clone()),
            irqfd,
            status: AtomicU8::new(0),
            generation: AtomicU32::new(0),
            driver_ok: AtomicBool::new(false),
        })
    }

    /// The eventfd of the default delivery, to register as an irqfd. It is not signalled
    /// once [`set_delivery`](Self::set_delivery) chose another delivery.
    pub fn eventfd(&self) -> &EventFd {
        self.irqfd.eventfd()
    }

    /// Sends every later interrupt to `delivery` instead (for example a vhost-user
    /// frontend's call eventfds and configuration-change messages).
    pub fn set_delivery(&self, delivery: Arc<dyn InterruptDelivery>) {
        *self.delivery.write().unwrap_or_else(|e| e.into_inner()) = delivery;
    }

    /// Goes back to the default delivery through [`eventfd`](Self::eventfd).
    pub fn reset_delivery(&self) {
        self.set_delivery(self.irqfd.clone());
    }

    /// The interrupt status register (bit 0: used buffer, bit 1: configuration change).
    pub fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    /// Clears the status bits the driver acknowledged.
    pub fn ack(&self, bits: u8) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// The configuration generation.
    pub fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    /// Tells the driver that a queue has new used buffers, on a transport with one
    /// interrupt line (the same as [`signal_used`](Self::signal_used) for queue 0).
    pub fn signal_used_queue(&self) {
        self.signal_used(0);
    }

    /// Tells the driver that queue `queue` has new used buffers.
    pub fn signal_used(&self, queue: usize) {
        self.status.fetch_or(USED_BUFFER, Ordering::AcqRel);
        let result = self.delivery().used_buffer(queue);
        Self::log_failure(result);
    }

    /// Records a device-initiated configuration change: bumps the generation and, once the
    /// driver has set DRIVER_OK, raises the configuration-change interrupt. Returns whether
    /// an interrupt was raised.
    pub fn signal_config_change(&self) -> bool {
        self.bump_config_generation();
        if self.driver_ok.load(Ordering::Acquire) {
            self.status.fetch_or(CONFIG_CHANGE, Ordering::AcqRel);
            let result = self.delivery().config_changed();
            Self::log_failure(result);
            true
        } else {
            false
        }
    }

    /// Records a configuration change the driver needs no interrupt for: bumps the
    /// generation only, so a driver reading the configuration in several accesses across
    /// the change reads it again (virtio 1.2, sections 2.5.1 and 4.2.2). The balloon uses it
    /// when the guest's own action changes what the device shows, such as its STOP of a free
    /// page hint round moving `free_page_hint_cmd_id` to 0. Call it after the new value is
    /// visible. Returns the new generation.
    pub fn bump_config_generation(&self) -> u32 {
        self.generation
            .fetch_add(1, Ordering::AcqRel)
            .wrapping_add(1)
    }

    /// Whether the driver has set DRIVER_OK (configuration interrupts are delivered).
    pub fn driver_ok(&self) -> bool {
        self.driver_ok.load(Ordering::Acquire)
    }

    /// Set by the device when it is activated, cleared on reset (which also clears the
    /// status bits).
    pub(crate) fn set_driver_ok(&self, ok: bool) {
        self.driver_ok.store(ok, Ordering::Release);
        if !ok {
            self.status.store(0, Ordering::Release);
        }
    }

    /// Restores the status bits and generation of a saved device; pending bits are raised
    /// again so the driver sees them.
    pub(crate) fn restore(&self, status: u8, generation: u32) {
        self.generation.store(generation, Ordering::Release);
        if status & USED_BUFFER != 0 {
            self.signal_used(0);
        }
        if status & CONFIG_CHANGE != 0 {
            self.status.fetch_or(CONFIG_CHANGE, Ordering::AcqRel);
            Self::log_failure(self.delivery().config_changed());
        }
    }

    fn delivery(&self) -> Arc<dyn InterruptDelivery> {
        self.delivery
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn log_failure(result: io::Result<()>) {
        if let Err(e) = result {
            warn_limited!(IRQ_WRITE_FAILED, "cannot deliver an interrupt: {}", e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_change_waits_for_driver_ok() {
        let irq = Interrupt::new().unwrap();
        assert!(!irq.signal_config_change());
        assert_eq!(irq.status(), 0);
        assert_eq!(irq.config_generation(), 1);
        assert!(
            irq.eventfd().read().is_err(),
            "no interrupt before DRIVER_OK"
        );

        irq.set_driver_ok(true);
        assert!(irq.signal_config_change());
        assert_eq!(irq.status(), CONFIG_CHANGE);
        assert_eq!(irq.config_generation(), 2);
        assert_eq!(irq.eventfd().read().unwrap(), 1);

        irq.signal_used_queue();
        assert_eq!(irq.status(), 3);
        irq.ack(CONFIG_CHANGE);
        assert_eq!(irq.status(), USED_BUFFER);

        irq.set_driver_ok(false);
        assert_eq!(irq.status(), 0);
        assert!(!irq.driver_ok());
    }

    #[test]
    fn a_silent_generation_bump_raises_nothing() {
        let irq = Interrupt::new().unwrap();
        irq.set_driver_ok(true);
        assert_eq!(irq.bump_config_generation(), 1);
        assert_eq!(irq.config_generation(), 1);
        assert_eq!(irq.status(), 0, "no status bit");
        assert!(irq.eventfd().read().is_err(), "no interrupt");
        // The generation wraps like the one of signal_config_change.
        irq.restore(0, u32::MAX);
        assert_eq!(irq.bump_config_generation(), 0);
        assert!(irq.signal_config_change());
        assert_eq!(irq.config_generation(), 1);
    }

    #[test]
    fn errors_display() {
        assert!(ActivateError::InvalidQueue { index: 3 }
            .to_string()
            .contains("queue 3"));
        assert!(ActivateError::LegacyDriver
            .to_string()
            .contains("VERSION_1"));
        assert!(ActivateError::AlreadyActive.to_string().contains("active"));
        assert!(ActivateError::TooManyQueues { given: 9, max: 5 }
            .to_string()
            .contains("9 queues"));
        assert!(FeatureError::NotOffered(0x40).to_string().contains("0x40"));
        assert!(FeatureError::NoVersion1.to_string().contains("VERSION_1"));
        assert!(FeatureError::QueueLayout(2).to_string().contains("0x2"));
        assert!(FeatureError::AfterActivation(5)
            .to_string()
            .contains("after"));
    }
}
