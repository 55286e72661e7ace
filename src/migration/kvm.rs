// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM's dirty log (`KVM_GET_DIRTY_LOG`, optionally with manual protection) as a
//! [`DirtyLog`], behind the `kvm` cargo feature.
//!
//! See [`KvmDirtyLog`] for what manual protection asks of the hint path.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_clear_dirty_log__bindgen_ty_1, kvm_enable_cap, KVMIO,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
};
use kvm_ioctls::VmFd;
use vm_memory::GuestAddress;
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iowr_nr;

use super::counting::{DirtyBitmap, BITS_PER_WORD};
use super::dirty_log::{DirtyLog, DirtyLogClear, DirtyLogError, HarvestedLog, RegionInfo};
use crate::defs::PAGE_SIZE;

ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);

/// Pages cleared by one `KVM_CLEAR_DIRTY_LOG` call at most (its bitmap is on the stack).
const CLEAR_BATCH_PAGES: u64 = 64 * BITS_PER_WORD as u64;

/// One KVM memory slot registered with `KVM_MEM_LOG_DIRTY_PAGES`, covering one guest memory
/// region of the migration bitmap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvmSlot {
    /// The slot number given to `KVM_SET_USER_MEMORY_REGION`.
    pub slot: u32,
    /// Its guest physical address.
    pub guest_addr: GuestAddress,
    /// Its size in bytes.
    pub len: u64,
}

/// Whether KVM write-protects the pages it reports by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvmProtection {
    /// `KVM_GET_DIRTY_LOG` resets and write-protects what it reports (KVM's default).
    Automatic,
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`: pages stay dirty in KVM until
    /// `KVM_CLEAR_DIRTY_LOG` is called for them. [`KvmDirtyLog::new`] enables it.
    Manual,
}

/// Errors of [`KvmDirtyLog`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvmError {
    /// The kernel lacks `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`.
    #[error("KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")]
    ManualProtectUnsupported,
    /// Enabling manual protection failed.
    #[error("enabling manual dirty log protection failed: {0}")]
    EnableManualProtect(#[source] errno::Error),
    /// A slot of length zero, or one whose page count does not fit in memory.
    #[error(
    "KVM slot {} at {:#x} of {:#x} bytes cannot be tracked",
    .0.slot,
    .0.guest_addr.0,
    .0.len
)]
    BadSlot(KvmSlot),
    /// The migration bitmap asked for a region that matches no slot.
    #[error(
    "no KVM slot covers region {} at {:#x} of {:#x} bytes",
    .0.index,
    .0.start.0,
    .0.len
)]
    NoSlot(RegionInfo),
    /// `KVM_GET_DIRTY_LOG` failed (the slot was removed, or lost dirty logging).
    #[error("KVM_GET_DIRTY_LOG of slot {slot} failed: {source}")]
    GetDirtyLog {
        /// The slot.
        slot: u32,
        /// What KVM returned.
        source: errno::Error,
    },
    /// `KVM_CLEAR_DIRTY_LOG` failed. The pages it was given stay in the "reported, not
    /// cleared" set, so a later clear retries them.
    #[error("KVM_CLEAR_DIRTY_LOG of slot {slot} failed: {source}")]
    ClearDirtyLog {
        /// The slot.
        slot: u32,
        /// What KVM returned.
        source: errno::Error,
    },
}

/// One slot and the pages KVM reported for it that were not cleared since.
#[derive(Debug)]
struct SlotLog {
    slot: KvmSlot,
    /// Host pages in the slot.
    pages: u64,
    /// Reported by `KVM_GET_DIRTY_LOG`, not yet passed to `KVM_CLEAR_DIRTY_LOG`. Only kept
    /// with manual protection.
    reported: DirtyBitmap,
    /// Held across a harvest and its merge into `reported`, and across taking pages out of
    /// `reported` and clearing them in KVM: whoever finds a page missing from `reported`
    /// knows its clear has completed.
    lock: Mutex<()>,
}

impl SlotLog {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere leaves nothing inconsistent.
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// KVM's dirty log over a set of memory slots, one per guest memory region.
///
/// Harvest it with [`MigrationBitmap::sync`](super::MigrationBitmap::sync) (it is a
/// [`DirtyLog`], and so is `&KvmDirtyLog`). With [`KvmProtection::Manual`] also hand it to
/// [`MigrationBitmap::set_log_clear`](super::MigrationBitmap::set_log_clear), so that hints
/// and sends clear pages in KVM first.
///
/// # Manual protection and hints
///
/// With `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` enabled, `KVM_GET_DIRTY_LOG` only reports the
/// pages written since they were last cleared: it neither resets their bits nor
/// write-protects them. Both happen when the VMM calls `KVM_CLEAR_DIRTY_LOG` for a page,
/// which it must do before it reads the page for sending: a write after the clear is logged
/// again, a write before it is in what is read.
///
/// A hinted page is never read, so without a clear it would stay dirty in KVM, come back at
/// the next sync and be sent anyway, at the latest during the downtime. The hint path must
/// therefore clear the hinted pages in KVM *before* it takes their bits off the migration
/// bitmap: in this order a write that follows the clear is logged and brings the page back,
/// in the other order it would be lost. This type implements [`DirtyLogClear`]; install
/// it with [`MigrationBitmap::set_log_clear`](super::MigrationBitmap::set_log_clear) and
/// both the hint path and [`MigrationBitmap::take_page`](super::MigrationBitmap::take_page)
/// (the sending side) clear in KVM first.
///
/// Only pages that `KVM_GET_DIRTY_LOG` reported and that nobody cleared since are ever
/// passed to `KVM_CLEAR_DIRTY_LOG` (QEMU keeps the same set per memory slot). A page that
/// was write-protected and then written has its bit set in KVM but not in that set; clearing
/// it would drop a write the migration bitmap has not seen yet.
///
/// A VMM with its own KVM code instead of this type does the same: keep, per slot, the pages
/// `KVM_GET_DIRTY_LOG` reported and not yet cleared; implement [`DirtyLogClear`] by calling
/// `KVM_CLEAR_DIRTY_LOG` for the intersection of that set with the range (aligned to 64
/// pages as KVM requires, with a bitmap that has only those pages set), under a per-slot
/// lock held across taking the pages out of the set and the ioctl; and call
/// [`set_log_clear`](super::MigrationBitmap::set_log_clear) with it.
///
/// Every method takes `&self`; the type is `Send + Sync`, so one `Arc<KvmDirtyLog>` serves
/// the migration thread (harvest, sends) and the device's thread (hints).
#[derive(Debug)]
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    slots: Box<[SlotLog]>,
    protection: KvmProtection,
    page_size: u64,
}

impl KvmDirtyLog {
    /// Tracks `slots` of `vm`. Each slot must already be registered with
    /// `KVM_MEM_LOG_DIRTY_PAGES` and match one region of the migration bitmap (same start and
    /// length). With [`KvmProtection::Manual`], enables `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`
    /// on `vm` (without `KVM_DIRTY_LOG_INITIALLY_SET`).
    ///
    /// # Errors
    ///
    /// [`KvmError::ManualProtectUnsupported`] or [`KvmError::EnableManualProtect`];
    /// [`KvmError::BadSlot`] for an empty slot or one too large to track.
    pub fn new(
        vm: Arc<VmFd>,
        slots: impl IntoIterator<Item = KvmSlot>,
        protection: KvmProtection,
    ) -> Result<Self, KvmError> {
        let page_size = host_page_size();
        let mut logs = Vec::new();
        for slot in slots {
            let pages = slot.len.div_ceil(page_size);
            let bits = usize::try_from(pages)
                .ok()
                .filter(|_| slot.len != 0)
                .ok_or(KvmError::BadSlot(slot))?;
            logs.push(SlotLog {
                slot,
                pages,
                reported: DirtyBitmap::new(if protection == KvmProtection::Manual {
                    bits
                } else {
                    0
                }),
                lock: Mutex::new(()),
            });
        }
        if protection == KvmProtection::Manual {
            if vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)) <= 0 {
                return Err(KvmError::ManualProtectUnsupported);
            }
            let mut cap = kvm_enable_cap {
                cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                ..Default::default()
            };
            cap.args[0] = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
            vm.enable_cap(&cap).map_err(KvmError::EnableManualProtect)?;
        }
        Ok(KvmDirtyLog {
            vm,
            slots: logs.into_boxed_slice(),
            protection,
            page_size,
        })
    }

    /// How KVM protects reported pages.
    pub fn protection(&self) -> KvmProtection {
        self.protection
    }

    /// The slots tracked.
    pub fn slots(&self) -> impl Iterator<Item = KvmSlot> + '_ {
        self.slots.iter().map(|s| s.slot)
    }

    /// Pages of `region` that KVM reported and that were not cleared in KVM since (always 0
    /// with automatic protection).
    pub fn uncleared_pages(&self, region: &RegionInfo) -> usize {
        self.find(region).map_or(0, |s| s.reported.count())
    }

    fn find(&self, region: &RegionInfo) -> Result<&SlotLog, KvmError> {
        self.slots
            .iter()
            .find(|s| s.slot.guest_addr == region.start && s.slot.len == region.len)
            .ok_or(KvmError::NoSlot(*region))
    }

    /// `KVM_GET_DIRTY_LOG` for the slot of `region`. With manual protection the reported
    /// pages are remembered until they are cleared.
    ///
    /// # Errors
    ///
    /// [`KvmError::NoSlot`], [`KvmError::GetDirtyLog`].
    pub fn harvest(&self, region: &RegionInfo) -> Result<HarvestedLog, KvmError> {
        let log = self.find(region)?;
        let _g = log.lock();
        // `get_dirty_log` sizes its buffer from the length and the host page size.
        let len = usize::try_from(log.slot.len).map_err(|_| KvmError::BadSlot(log.slot))?;
        let words = self
            .vm
            .get_dirty_log(log.slot.slot, len)
            .map_err(|source| KvmError::GetDirtyLog {
                slot: log.slot.slot,
                source,
            })?;
        if self.protection == KvmProtection::Manual {
            log.reported.or_words(0, &words);
        }
        Ok(HarvestedLog {
            page_size: self.page_size,
            words,
        })
    }

    /// Clears in KVM the pages of `[first, end)` (host page numbers inside the slot) that
    /// KVM reported and nobody cleared since.
    fn clear_pages(&self, log: &SlotLog, first: u64, end: u64) -> Result<(), KvmError> {
        let end = end.min(log.pages);
        // KVM wants `first_page` a multiple of 64; the bitmap only has our pages set.
        let mut batch = first - first % BITS_PER_WORD as u64;
        let _g = log.lock();
        while batch < end {
            let batch_end = batch.saturating_add(CLEAR_BATCH_PAGES).min(log.pages);
            let mut mask = [0u64; (CLEAR_BATCH_PAGES / BITS_PER_WORD as u64) as usize];
            let mut any = false;
            for (w, word) in mask.iter_mut().enumerate() {
                let lo = batch + (w * BITS_PER_WORD) as u64;
                if lo >= batch_end {
                    break;
                }
                // Pages of this word inside [first, end).
                let from = first.max(lo);
                let to = end.min(lo + BITS_PER_WORD as u64);
                if from >= to {
                    continue;
                }
                let width = to - from;
                let ones = if width == BITS_PER_WORD as u64 {
                    u64::MAX
                } else {
                    (1u64 << width) - 1
                };
                *word = log
                    .reported
                    .take_bits(lo as usize / BITS_PER_WORD, ones << (from - lo));
                any |= *word != 0;
            }
            if any {
                let clear = kvm_clear_dirty_log {
                    slot: log.slot.slot,
                    // At most CLEAR_BATCH_PAGES.
                    num_pages: (batch_end - batch) as u32,
                    first_page: batch,
                    __bindgen_anon_1: kvm_clear_dirty_log__bindgen_ty_1 {
                        dirty_bitmap: mask.as_mut_ptr().cast(),
                    },
                };
                // SAFETY: `self.vm` is a KVM VM fd; `clear` is a valid `kvm_clear_dirty_log`
                // whose bitmap points to `mask`, which holds `num_pages` bits (at most 4096
                // = 64 words) and outlives the call. KVM only reads the bitmap.
                let ret = unsafe { ioctl_with_ref(&*self.vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
                if ret != 0 {
                    let source = errno::Error::last();
                    // Not cleared: they stay reported, for the next clear to retry.
                    for (w, &bits) in mask.iter().enumerate() {
                        if bits != 0 {
                            log.reported
                                .or_words(batch as usize / BITS_PER_WORD + w, &[bits]);
                        }
                    }
                    return Err(KvmError::ClearDirtyLog {
                        slot: log.slot.slot,
                        source,
                    });
                }
            }
            batch = batch_end;
        }
        Ok(())
    }
}

impl DirtyLog for KvmDirtyLog {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        Ok(self.harvest(region)?)
    }
}

impl DirtyLog for &KvmDirtyLog {
    fn take_dirty_log(&mut self, region: &RegionInfo) -> Result<HarvestedLog, DirtyLogError> {
        Ok(self.harvest(region)?)
    }
}

impl DirtyLogClear for KvmDirtyLog {
    fn clear_dirty_log(
        &self,
        region: &RegionInfo,
        first_page: u64,
        pages: u64,
    ) -> Result<(), DirtyLogError> {
        if self.protection == KvmProtection::Automatic || pages == 0 {
            return Ok(());
        }
        let log = self.find(region)?;
        // 4 KiB pages to host pages, outwards: clearing a whole host page whose 4 KiB pieces
        // are not all leaving the bitmap is safe, since the reported set only holds pages
        // whose bits are all still in the migration bitmap.
        let lo = first_page.saturating_mul(PAGE_SIZE);
        let hi = first_page.saturating_add(pages).saturating_mul(PAGE_SIZE);
        let first = lo / self.page_size;
        let end = hi.div_ceil(self.page_size);
        Ok(self.clear_pages(log, first, end)?)
    }
}

/// The host's page size, the unit of `KVM_GET_DIRTY_LOG`'s bits.
fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a system constant; no memory is passed.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(ps)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(PAGE_SIZE)
}
