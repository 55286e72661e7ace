// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! KVM's side of a copy (a migration or a snapshot): the source guest's memory as a
//! dirty-logged KVM memory slot, `KVM_GET_DIRTY_LOG` with manual protection as the
//! migration bitmap's clear step, and the vCPU that writes the writer's pages. Without the
//! `kvm` feature, [`KvmSource`] has no values and says why.

pub use imp::KvmSource;

#[cfg(feature = "kvm")]
mod imp {
    use std::sync::Arc;
    use std::time::Duration;

    use virtio_balloon::migration::{
        DirtyLog, GuestMemoryDirtyLog, JoinedLog, KvmDirtyLog, KvmProtection,
    };
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestMemoryMmap;

    use crate::VcpuReport;
    use guest_model::kvm::{
        kvm_unusable, Firmware, KvmVm, PageVcpu, VcpuPageWriter, VcpuWriterStats, FIRMWARE_PAGES,
    };
    use guest_model::{Guest, PageWriter};

    /// KVM's side of one copy: a VM whose memory slot is the source guest's memory, its
    /// dirty log with manual protection, and the vCPU that writes the writer's pages.
    pub struct KvmSource {
        log: Arc<KvmDirtyLog>,
        page_writer: Option<Box<dyn PageWriter>>,
        vcpu_stats: Option<Arc<VcpuWriterStats>>,
        // Last: the slot goes after everything that uses it.
        _vm: KvmVm,
    }

    impl KvmSource {
        /// Why KVM cannot be used here, if it cannot.
        pub fn unusable() -> Option<String> {
            kvm_unusable().map(|why| format!("no usable /dev/kvm: {why}"))
        }

        /// Registers the guest's memory with a new VM, starts its dirty log with manual
        /// protection and installs it as the clear step of the guest's migration bitmap.
        /// With `vcpu`, also creates the vCPU, its code and buffers in the top pages of low
        /// memory, for [`take_page_writer`](Self::take_page_writer).
        pub fn new(guest: &Guest, vcpu: bool) -> Result<Self, String> {
            let mut vm = KvmVm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
            let slots = vm
                .register(guest.mem())
                .map_err(|e| format!("registering guest memory: {e}"))?;
            let log = Arc::new(
                KvmDirtyLog::new(vm.vm.clone(), slots, KvmProtection::Manual)
                    .map_err(|e| format!("starting the dirty log: {e}"))?,
            );
            if !guest.bitmap.set_log_clear(log.clone()) {
                return Err("the migration bitmap already has a clear step".into());
            }
            let (page_writer, vcpu_stats) = if vcpu {
                let fw = guest.reserve_low_pages(FIRMWARE_PAGES);
                let vcpu = PageVcpu::new(&vm, Firmware::in_ram(guest.mem().clone(), fw))
                    .map_err(|e| format!("creating the vCPU: {e}"))?;
                let writer = VcpuPageWriter::new(vcpu, guest.mem().clone());
                let stats = writer.stats();
                (Some(Box::new(writer) as Box<dyn PageWriter>), Some(stats))
            } else {
                (None, None)
            };
            Ok(KvmSource {
                log,
                page_writer,
                vcpu_stats,
                _vm: vm,
            })
        }

        /// The vCPU as the guest writer's page writer (once).
        pub fn take_page_writer(&mut self) -> Option<Box<dyn PageWriter>> {
            self.page_writer.take()
        }

        /// KVM's log joined with vm-memory's write tracking of `src`.
        pub fn dirty_log<'a>(
            &'a self,
            src: &'a GuestMemoryMmap<AtomicBitmap>,
        ) -> Box<dyn DirtyLog + 'a> {
            Box::new(JoinedLog(&*self.log, GuestMemoryDirtyLog::new(src)))
        }

        /// Pages the vCPU wrote, its `KVM_RUN`s, pages written through vm-memory instead.
        pub fn vcpu_stats(&self) -> Option<VcpuReport> {
            use std::sync::atomic::Ordering::Relaxed;
            self.vcpu_stats.as_ref().map(|s| VcpuReport {
                pages: s.vcpu_pages.load(Relaxed),
                runs: s.runs.load(Relaxed),
                busy: Duration::from_nanos(s.nanos.load(Relaxed)),
                host_pages: s.host_pages.load(Relaxed),
            })
        }
    }
}

/// Without the `kvm` feature there is no KVM side: [`KvmSource`] has no values.
#[cfg(not(feature = "kvm"))]
mod imp {
    use virtio_balloon::migration::DirtyLog;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::GuestMemoryMmap;

    use crate::VcpuReport;
    use guest_model::{Guest, PageWriter};

    pub enum KvmSource {}

    impl KvmSource {
        pub fn unusable() -> Option<String> {
            Some(
                "this build lacks the `kvm` feature (cargo run --release --features kvm \
                 --example precopy)"
                    .into(),
            )
        }

        pub fn new(_guest: &Guest, _vcpu: bool) -> Result<Self, String> {
            Err(Self::unusable().unwrap_or_default())
        }

        pub fn take_page_writer(&mut self) -> Option<Box<dyn PageWriter>> {
            match *self {}
        }

        pub fn dirty_log<'a>(
            &'a self,
            _src: &'a GuestMemoryMmap<AtomicBitmap>,
        ) -> Box<dyn DirtyLog + 'a> {
            match *self {}
        }

        pub fn vcpu_stats(&self) -> Option<VcpuReport> {
            match *self {}
        }
    }
}
