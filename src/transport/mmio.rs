// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2).

use event_manager::{EventOps, Events, MutEventSubscriber};
use log::{info, warn};
use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::QueueT;

use super::VirtioDevice;
use crate::ratelimit::{warn_limited, RateLimit};

/// The MagicValue register's value: "virt" in little-endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The Version register's value: 2, virtio-mmio for virtio 1.x.
pub const MMIO_VERSION: u32 = 2;
/// The VendorID register's value.
pub const MMIO_VENDOR_ID: u32 = 0;

// The registers as the offsets of a bus access (virtio-bindings has them as u32).
const REG_MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const REG_VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const REG_DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const REG_VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const REG_DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const REG_DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const REG_DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const REG_DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const REG_QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const REG_QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const REG_QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const REG_QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const REG_QUEUE_NOTIFY: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
const REG_INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const REG_INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const REG_STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const REG_QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const REG_QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const REG_QUEUE_DRIVER_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const REG_QUEUE_DRIVER_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const REG_QUEUE_DEVICE_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const REG_QUEUE_DEVICE_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const REG_CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;
const CONFIG_SPACE: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

// The device status bits as the u8 of the Status register.
const S_ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
const S_DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
const S_DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
const S_FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
const S_DEVICE_NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
const S_FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;

static BAD_WIDTH: RateLimit = RateLimit::new();
static BAD_READ: RateLimit = RateLimit::new();
static BAD_WRITE: RateLimit = RateLimit::new();
static LATE_QUEUE_WRITE: RateLimit = RateLimit::new();
static LATE_FEATURES: RateLimit = RateLimit::new();
static BAD_STATUS: RateLimit = RateLimit::new();
static BAD_NOTIFY: RateLimit = RateLimit::new();
static LATE_CONFIG: RateLimit = RateLimit::new();

/// The registers of an [`MmioTransport`] that are not the device's, for a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    /// The device status register.
    pub status: u8,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
}

/// A virtio device behind virtio-mmio registers.
///
/// The VMM maps the 4 KiB register window into the guest and forwards every access to
/// [`read`](Self::read) or [`write`](Self::write) with the offset inside the window. Accesses
/// to registers must be 4 bytes wide; anything else, unknown offsets and writes the spec
/// forbids at that point are ignored and logged (rate-limited). Nothing the guest writes can
/// make the transport panic.
///
/// `MmioTransport<D>` is an event-manager subscriber whenever `D` is, so one
/// `Arc<Mutex<MmioTransport<D>>>` serves both the MMIO bus and the event loop.
#[derive(Debug)]
pub struct MmioTransport<D> {
    device: D,
    status: u8,
    device_features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
}

impl<D: VirtioDevice> MmioTransport<D> {
    /// Puts `device` behind virtio-mmio registers.
    pub fn new(device: D) -> Self {
        MmioTransport {
            device,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
        }
    }

    /// Puts a restored `device` behind registers restored from `state`. The status must agree
    /// with the device: DRIVER_OK exactly when the device is activated (else the status is
    /// reset to 0 and the driver has to start over).
    pub fn restore(device: D, state: MmioState) -> Self {
        let driver_ok = state.status & S_DRIVER_OK != 0;
        let status = if driver_ok == device.is_activated() {
            state.status
        } else {
            warn!(
                "virtio-mmio: restored status {:#x} does not match the device",
                state.status
            );
            0
        };
        MmioTransport {
            device,
            status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            queue_select: state.queue_select,
        }
    }

    /// The registers, for a snapshot (save the device's own state with it).
    pub fn save_state(&self) -> MmioState {
        MmioState {
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
        }
    }

    /// The device.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device, mutable.
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// Takes the device back.
    pub fn into_inner(self) -> D {
        self.device
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    fn has_status(&self, set: u8, clear: u8) -> bool {
        self.status & set == set && self.status & clear == 0
    }

    /// Handles a guest read of `data.len()` bytes at `offset` in the register window.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let Some(config_offset) = offset.checked_sub(CONFIG_SPACE) else {
                return;
            };
            self.device.read_config(config_offset, data);
            return;
        }
        if data.len() != 4 {
            warn_limited!(
                BAD_WIDTH,
                "virtio-mmio: {}-byte read at {:#x}",
                data.len(),
                offset
            );
            data.fill(0);
            return;
        }
        let queue = self.device.queue(self.queue_select as usize);
        let value: u32 = match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => self
                .device
                .device_features_page(self.device_features_select),
            REG_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => u32::from(self.device.interrupt().status()),
            REG_STATUS => u32::from(self.status),
            REG_CONFIG_GENERATION => self.device.interrupt().config_generation(),
            _ => {
                warn_limited!(
                    BAD_READ,
                    "virtio-mmio: read of unknown register {:#x}",
                    offset
                );
                0
            }
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Handles a guest write of `data` at `offset` in the register window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            let Some(config_offset) = offset.checked_sub(CONFIG_SPACE) else {
                return;
            };
            if self.has_status(S_DRIVER, S_FAILED) {
                self.device.write_config(config_offset, data);
            } else {
                warn_limited!(
                    LATE_CONFIG,
                    "virtio-mmio: config write with status {:#x}",
                    self.status
                );
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!(
                BAD_WIDTH,
                "virtio-mmio: {}-byte write at {:#x}",
                data.len(),
                offset
            );
            return;
        };
        let value = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES => {
                if self.has_status(S_DRIVER, S_FEATURES_OK | S_FAILED) {
                    self.device
                        .set_driver_features(self.driver_features_select, value);
                } else {
                    warn_limited!(
                        LATE_FEATURES,
                        "virtio-mmio: driver features written with status {:#x}",
                        self.status
                    );
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => self.with_queue(|q| {
                // Sizes above u16 are invalid; pass 0 so the queue logs and ignores it.
                q.set_size(u16::try_from(value).unwrap_or(0))
            }),
            REG_QUEUE_READY => self.with_queue(|q| q.set_ready(value == 1)),
            REG_QUEUE_DESC_LOW => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            REG_QUEUE_DESC_HIGH => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            REG_QUEUE_DRIVER_LOW => {
                self.with_queue(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_DRIVER_HIGH => {
                self.with_queue(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_DEVICE_LOW => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            REG_QUEUE_DEVICE_HIGH => {
                self.with_queue(|q| q.set_used_ring_address(None, Some(value)))
            }
            REG_QUEUE_NOTIFY => self.notify(value),
            REG_INTERRUPT_ACK => self.device.interrupt().ack(value as u8),
            REG_STATUS => self.set_status(value),
            _ => {
                warn_limited!(
                    BAD_WRITE,
                    "virtio-mmio: write of unknown register {:#x}",
                    offset
                );
            }
        }
    }

    /// Applies a queue register write, only between FEATURES_OK and DRIVER_OK.
    fn with_queue(&mut self, f: impl FnOnce(&mut virtio_queue::Queue)) {
        if !self.has_status(S_FEATURES_OK, S_DRIVER_OK | S_FAILED) {
            warn_limited!(
                LATE_QUEUE_WRITE,
                "virtio-mmio: queue register written with status {:#x}",
                self.status
            );
            return;
        }
        match self.device.queue_mut(self.queue_select as usize) {
            Some(q) => f(q),
            None => {
                warn_limited!(
                    LATE_QUEUE_WRITE,
                    "virtio-mmio: no queue {}",
                    self.queue_select
                );
            }
        }
    }

    /// A write to QueueNotify signals the queue's eventfd, as an ioeventfd would have.
    fn notify(&self, value: u32) {
        match self.device.queue_event(value as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn_limited!(
                        BAD_NOTIFY,
                        "virtio-mmio: cannot signal queue {}: {}",
                        value,
                        e
                    );
                }
            }
            None => warn_limited!(BAD_NOTIFY, "virtio-mmio: notify of unknown queue {}", value),
        }
    }

    /// The device status state machine (virtio 1.x section 3.1.1).
    fn set_status(&mut self, value: u32) {
        let Ok(new) = u8::try_from(value) else {
            warn_limited!(
                BAD_STATUS,
                "virtio-mmio: status {:#x} does not fit a byte",
                value
            );
            return;
        };
        if new == 0 {
            self.reset();
            return;
        }
        if new & S_FAILED != 0 {
            warn!("virtio-mmio: the driver marked the device FAILED");
            self.status |= S_FAILED;
            return;
        }
        // The driver may only add bits, one step at a time.
        let added = new & !self.status;
        if new & self.status != self.status {
            warn_limited!(
                BAD_STATUS,
                "virtio-mmio: status {:#x} clears bits of {:#x}",
                new,
                self.status
            );
            return;
        }
        match added {
            0 => {}
            S_ACKNOWLEDGE if self.status == 0 => self.status = new,
            S_DRIVER if self.status == S_ACKNOWLEDGE => self.status = new,
            S_FEATURES_OK if self.status == S_ACKNOWLEDGE | S_DRIVER => {
                match self.device.validate_features() {
                    Ok(()) => {
                        self.status = new;
                        self.device.features_ok();
                    }
                    Err(e) => warn!("virtio-mmio: FEATURES_OK refused: {e}"),
                }
            }
            S_DRIVER_OK if self.status == S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK => {
                match self.device.activate() {
                    Ok(()) => {
                        info!(
                            "virtio-mmio: device type {} activated",
                            self.device.device_type()
                        );
                        self.status = new;
                    }
                    Err(e) => {
                        warn!("virtio-mmio: activation failed: {e}");
                        self.status |= S_DEVICE_NEEDS_RESET;
                    }
                }
            }
            _ => warn_limited!(
                BAD_STATUS,
                "virtio-mmio: invalid status transition {:#x} -> {:#x}",
                self.status,
                new
            ),
        }
    }

    /// Writing 0 to the status register.
    fn reset(&mut self) {
        self.device.reset();
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
    }
}

impl<D: VirtioDevice + MutEventSubscriber> MutEventSubscriber for MmioTransport<D> {
    fn init(&mut self, ops: &mut EventOps) {
        self.device.init(ops)
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.device.process(events, ops)
    }
}
