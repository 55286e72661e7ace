// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! The daemon's vring: `vhost-user-backend`'s [`VringRwLock`], except that a kick
//! descriptor with nothing to read is not an error.
//!
//! The kick eventfd belongs to the frontend too, and the daemon makes it non-blocking (see
//! [`admit`](crate::admit)). A frontend that reads it between the event loop's wake-up and
//! the loop's own read (QEMU drains its host notifiers when it stops the vrings; a hostile
//! frontend can do it on purpose) leaves nothing to read: `EAGAIN`. `VringRwLock` reports
//! that as an error, on which `vhost-user-backend` ends the connection's event loop for
//! good, and the device would never see another kick. [`Vring::read_kick`] reports it as a
//! kick that carried nothing; the device then looks at its queue, which is harmless.

use std::fs::File;
use std::io;

use vhost_user_backend::{VringRwLock, VringStateGuard, VringStateMutGuard, VringT};
use virtio_queue::Error as VirtQueError;

use crate::Mem;

/// The vring type the daemon uses: a [`VringRwLock`] whose [`read_kick`](Vring::read_kick)
/// takes an empty non-blocking kick descriptor as a spurious wake-up.
#[derive(Clone)]
pub struct Vring(VringRwLock<Mem>);

impl<'a> VringStateGuard<'a, Mem> for Vring {
    type G = <VringRwLock<Mem> as VringStateGuard<'a, Mem>>::G;
}

impl<'a> VringStateMutGuard<'a, Mem> for Vring {
    type G = <VringRwLock<Mem> as VringStateMutGuard<'a, Mem>>::G;
}

impl VringT<Mem> for Vring {
    fn new(mem: Mem, max_queue_size: u16) -> Result<Self, VirtQueError> {
        VringRwLock::new(mem, max_queue_size).map(Vring)
    }

    fn get_ref(&self) -> <Self as VringStateGuard<'_, Mem>>::G {
        self.0.get_ref()
    }

    fn get_mut(&self) -> <Self as VringStateMutGuard<'_, Mem>>::G {
        self.0.get_mut()
    }

    fn add_used(&self, desc_index: u16, len: u32) -> Result<(), VirtQueError> {
        self.0.add_used(desc_index, len)
    }

    fn signal_used_queue(&self) -> io::Result<()> {
        self.0.signal_used_queue()
    }

    fn enable_notification(&self) -> Result<bool, VirtQueError> {
        self.0.enable_notification()
    }

    fn disable_notification(&self) -> Result<(), VirtQueError> {
        self.0.disable_notification()
    }

    fn needs_notification(&self) -> Result<bool, VirtQueError> {
        self.0.needs_notification()
    }

    fn set_enabled(&self, enabled: bool) {
        self.0.set_enabled(enabled)
    }

    fn set_queue_info(
        &self,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<(), VirtQueError> {
        self.0.set_queue_info(desc_table, avail_ring, used_ring)
    }

    fn queue_next_avail(&self) -> u16 {
        self.0.queue_next_avail()
    }

    fn set_queue_next_avail(&self, base: u16) {
        self.0.set_queue_next_avail(base)
    }

    fn set_queue_next_used(&self, idx: u16) {
        self.0.set_queue_next_used(idx)
    }

    fn queue_used_idx(&self) -> Result<u16, VirtQueError> {
        self.0.queue_used_idx()
    }

    fn set_queue_size(&self, num: u16) {
        self.0.set_queue_size(num)
    }

    fn set_queue_event_idx(&self, enabled: bool) {
        self.0.set_queue_event_idx(enabled)
    }

    fn set_queue_ready(&self, ready: bool) {
        self.0.set_queue_ready(ready)
    }

    fn set_kick(&self, file: Option<File>) {
        self.0.set_kick(file)
    }

    /// Reads the kick eventfd. Nothing to read (`EAGAIN`: the frontend drained it first) is
    /// a kick that carried nothing, not an error; returns whether the vring is enabled.
    fn read_kick(&self) -> io::Result<bool> {
        match self.0.read_kick() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(self.0.get_ref().is_enabled()),
            r => r,
        }
    }

    fn set_call(&self, file: Option<File>) {
        self.0.set_call(file)
    }

    fn set_err(&self, file: Option<File>) {
        self.0.set_err(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, IntoRawFd};
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn no_memory() -> Mem {
        GuestMemoryAtomic::new(GuestMemoryMmap::new())
    }

    fn kick_file(evt: &EventFd) -> File {
        let dup = evt.try_clone().unwrap();
        // SAFETY: `dup` is a fresh descriptor whose ownership moves into the File.
        unsafe { File::from_raw_fd(dup.into_raw_fd()) }
    }

    #[test]
    fn an_empty_kick_is_a_spurious_wake_up_not_an_error() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let vring = Vring::new(no_memory(), 256).unwrap();
        vring.set_kick(Some(kick_file(&evt)));
        vring.set_enabled(true);
        evt.write(1).unwrap();
        assert!(vring.read_kick().unwrap());
        // Drained (by the frontend, say): vhost-user-backend's own vring calls it an error.
        assert!(vring.read_kick().unwrap(), "an empty kick is not an error");
        let plain = VringRwLock::new(no_memory(), 256).unwrap();
        plain.set_kick(Some(kick_file(&evt)));
        assert_eq!(
            plain.read_kick().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        vring.set_enabled(false);
        assert!(!vring.read_kick().unwrap());
    }
}
