// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A real KVM VM whose vCPU writes the guest pages a test chooses.
//!
//! The vCPU runs a dozen bytes of 32-bit code with flat segments and paging off: for each
//! address in a list it copies one 4 KiB page from a source area with `rep movsd`, then
//! halts. Guest memory regions are KVM slots with `KVM_MEM_LOG_DIRTY_PAGES`, so KVM's dirty
//! log sees exactly these writes. The code, the list and the source pages live in a
//! *firmware area*: a separate slot (tests) or reserved guest RAM (the demo).
//!
//! These machines' `/dev/kvm` (PVM) cannot boot a kernel, but runs such code: through
//! KVM's instruction emulator, so slowly (about 1 ms per 4 KiB page copied, measured here;
//! the cost is per instruction executed, not per `KVM_RUN`).
//!
//! [`VcpuPageWriter`] puts the vCPU behind the guest model's writer
//! ([`Guest::start_writer_with`](super::guest::Guest::start_writer_with)), with its
//! firmware in pages of guest RAM the model reserved
//! ([`Guest::reserve_low_pages`](super::guest::Guest::reserve_low_pages)).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use virtio_balloon::migration::KvmSlot;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::guest::PageWriter;
use crate::Mem;

/// Bytes of a guest page.
pub const PAGE: u64 = 4096;
/// Pages the vCPU copies per run at most.
pub const MAX_BATCH: usize = 16;
/// Pages of the firmware area: code, address list, `MAX_BATCH` source pages.
pub const FIRMWARE_PAGES: u64 = 2 + MAX_BATCH as u64;
/// The page of the local APIC's default base. KVM's instruction emulator (which runs this
/// code here) sends every access to it to userspace as MMIO, whatever memory slot covers
/// it: the vCPU cannot write this page.
pub const APIC_PAGE: u64 = 0xfee0_0000;

/// Whether [`PageVcpu::write_pages`] can write the page at `gpa`: below 4 GiB (paging is
/// off) and not [`APIC_PAGE`].
pub fn vcpu_can_write(gpa: GuestAddress) -> bool {
    gpa.0.checked_add(PAGE).is_some_and(|end| end <= 1 << 32) && gpa.0 & !(PAGE - 1) != APIC_PAGE
}

/// The vCPU program. Inputs: EBX = address list, ECX = count (not 0), ESI = first source
/// page, EDX = source stride (0 or 4096). Clobbers EAX, EBP, EDI.
///
/// ```text
/// next: mov edi, [ebx]      8b 3b
///       mov ebp, esi        89 f5
///       mov eax, ecx        89 c8
///       mov ecx, 1024       b9 00 04 00 00
///       rep movsd           f3 a5
///       mov ecx, eax        89 c1
///       mov esi, ebp        89 ee
///       add esi, edx        01 d6
///       add ebx, 4          83 c3 04
///       dec ecx             49
///       jnz next            75 e7
///       hlt                 f4
/// ```
const COPY_PAGES: [u8; 26] = [
    0x8b, 0x3b, 0x89, 0xf5, 0x89, 0xc8, 0xb9, 0x00, 0x04, 0x00, 0x00, 0xf3, 0xa5, 0x89, 0xc1, 0x89,
    0xee, 0x01, 0xd6, 0x83, 0xc3, 0x04, 0x49, 0x75, 0xe7, 0xf4,
];

/// Why KVM cannot be used here, or `None` when a VM with a vCPU running code works.
pub fn kvm_unusable() -> Option<String> {
    let probe = || -> Result<(), String> {
        let mut vm = KvmVm::new().map_err(|e| format!("opening /dev/kvm: {e}"))?;
        let fw = vm
            .add_firmware_slot(GuestAddress(0x10_0000))
            .map_err(|e| format!("adding a memory slot: {e}"))?;
        let mut vcpu = PageVcpu::new(&vm, fw).map_err(|e| format!("creating a vCPU: {e}"))?;
        vcpu.run_probe().map_err(|e| format!("running a vCPU: {e}"))
    };
    probe().err()
}

/// Skips the calling test, saying why, when KVM is unusable. `.ci/run` sets
/// `VIRTIO_BALLOON_REQUIRE_KVM=1` on machines with KVM, which turns a skip into a failure.
/// The optional argument is what the test returns when it skips.
#[macro_export]
macro_rules! require_kvm {
    ($($ret:expr)?) => {
        if let Some(why) = $crate::kvm::kvm_unusable() {
            assert!(
                std::env::var_os("VIRTIO_BALLOON_REQUIRE_KVM").is_none(),
                "KVM is required (VIRTIO_BALLOON_REQUIRE_KVM) but unusable: {why}"
            );
            eprintln!("SKIPPED: no usable /dev/kvm ({why})");
            return $($ret)?;
        }
    };
}

/// Where the firmware area's bytes are written from the host.
enum FirmwareMem {
    /// A private mapping registered as its own slot (no dirty logging).
    Slot { host: *mut u8 },
    /// Reserved pages of guest RAM, written through vm-memory (so its write tracking sees
    /// them and they migrate like any page the host writes).
    Ram(Mem),
}

// SAFETY: the raw pointer is a private mapping owned by the `KvmVm` that outlives the
// firmware area's users; it is only written through `write`, by one thread at a time (the
// owner of the `PageVcpu`).
unsafe impl Send for FirmwareMem {}

/// The code, address list and source pages of a [`PageVcpu`].
pub struct Firmware {
    gpa: u64,
    mem: FirmwareMem,
}

impl Firmware {
    /// Firmware in `FIRMWARE_PAGES` pages of guest RAM at `gpa`, which the guest model must
    /// leave alone.
    pub fn in_ram(mem: Mem, gpa: GuestAddress) -> Self {
        Firmware {
            gpa: gpa.0,
            mem: FirmwareMem::Ram(mem),
        }
    }

    fn write(&mut self, offset: u64, bytes: &[u8]) {
        assert!(offset + bytes.len() as u64 <= FIRMWARE_PAGES * PAGE);
        match &self.mem {
            FirmwareMem::Slot { host } => {
                // SAFETY: the mapping is FIRMWARE_PAGES pages long (checked above) and
                // alive for the VM's lifetime; nothing else writes it concurrently.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        host.add(offset as usize),
                        bytes.len(),
                    )
                }
            }
            FirmwareMem::Ram(mem) => mem
                .write_slice(bytes, GuestAddress(self.gpa + offset))
                .expect("the firmware area lies in guest RAM"),
        }
    }
}

/// A host mapping kept alive as long as KVM may access it.
struct Mapping {
    addr: *mut libc::c_void,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` came from a successful mmap and are unmapped once.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

// SAFETY: a mapping is plain memory; the struct only unmaps it on drop.
unsafe impl Send for Mapping {}
// SAFETY: as above; no method reads or writes through the pointer.
unsafe impl Sync for Mapping {}

/// A KVM VM with guest memory regions as dirty-logged slots.
pub struct KvmVm {
    /// The VM.
    pub vm: Arc<VmFd>,
    _kvm: Kvm,
    /// The guest memory registered (kept alive while KVM maps it).
    mem: Option<Mem>,
    mappings: Vec<Mapping>,
    next_slot: u32,
    slots: Vec<(KvmSlot, u64)>,
}

impl KvmVm {
    /// Opens /dev/kvm and creates a VM.
    pub fn new() -> io::Result<Self> {
        let kvm = Kvm::new().map_err(io::Error::from)?;
        let vm = kvm.create_vm().map_err(io::Error::from)?;
        Ok(KvmVm {
            vm: Arc::new(vm),
            _kvm: kvm,
            mem: None,
            mappings: Vec::new(),
            next_slot: 0,
            slots: Vec::new(),
        })
    }

    /// Registers every region of `mem` as a slot with dirty logging; returns the slots.
    pub fn register(&mut self, mem: &Mem) -> io::Result<Vec<KvmSlot>> {
        let mut out = Vec::new();
        for region in mem.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let slot = KvmSlot {
                slot: self.next_slot,
                guest_addr: region.start_addr(),
                len: region.len(),
            };
            self.set_slot(slot, host as u64, KVM_MEM_LOG_DIRTY_PAGES)?;
            self.slots.push((slot, host as u64));
            self.next_slot += 1;
            out.push(slot);
        }
        self.mem = Some(mem.clone());
        Ok(out)
    }

    fn set_slot(&self, slot: KvmSlot, host: u64, flags: u32) -> io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            guest_phys_addr: slot.guest_addr.0,
            memory_size: slot.len,
            userspace_addr: host,
            flags,
        };
        // SAFETY: `host` maps `len` bytes that this VM keeps alive (`self.mem` or
        // `self.mappings`) for as long as the slot exists; a size of 0 deletes the slot.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(io::Error::from)
    }

    /// Deletes a slot registered by [`register`](Self::register) (what a VMM does when
    /// memory is unplugged).
    pub fn remove_slot(&mut self, slot: u32) -> io::Result<()> {
        let i = self
            .slots
            .iter()
            .position(|(s, _)| s.slot == slot)
            .expect("known slot");
        let (s, host) = self.slots.remove(i);
        self.set_slot(KvmSlot { len: 0, ..s }, host, 0)
    }

    /// Re-registers a slot without dirty logging (the memory region changed under the
    /// migration).
    pub fn stop_logging(&self, slot: u32) -> io::Result<()> {
        let (s, host) = *self
            .slots
            .iter()
            .find(|(s, _)| s.slot == slot)
            .expect("known slot");
        self.set_slot(s, host, 0)
    }

    /// A private `FIRMWARE_PAGES`-page area at `gpa` in a slot of its own (not logged).
    pub fn add_firmware_slot(&mut self, gpa: GuestAddress) -> io::Result<Firmware> {
        let len = (FIRMWARE_PAGES * PAGE) as usize;
        // SAFETY: a new anonymous private mapping; no existing memory is affected.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        self.mappings.push(Mapping { addr, len });
        let slot = KvmSlot {
            slot: self.next_slot,
            guest_addr: gpa,
            len: len as u64,
        };
        self.set_slot(slot, addr as u64, 0)?;
        self.next_slot += 1;
        Ok(Firmware {
            gpa: gpa.0,
            mem: FirmwareMem::Slot { host: addr.cast() },
        })
    }
}

/// One vCPU that writes whole guest pages.
pub struct PageVcpu {
    vcpu: VcpuFd,
    fw: Firmware,
}

impl PageVcpu {
    /// A vCPU in 32-bit protected mode with flat 4 GiB segments, its code in `fw`.
    pub fn new(vm: &KvmVm, mut fw: Firmware) -> io::Result<Self> {
        let vcpu = vm.vm.create_vcpu(0).map_err(io::Error::from)?;
        let mut sregs = vcpu.get_sregs().map_err(io::Error::from)?;
        let flat = |selector: u16, type_: u8| kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            dpl: 0,
            db: 1,
            s: 1,
            l: 0,
            g: 1,
            avl: 0,
            unusable: 0,
            padding: 0,
        };
        sregs.cs = flat(8, 0xb);
        for seg in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.ss,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            *seg = flat(16, 3);
        }
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).map_err(io::Error::from)?;
        fw.write(0, &COPY_PAGES);
        Ok(PageVcpu { vcpu, fw })
    }

    fn run_copy(&mut self, count: usize, stride: u64) -> io::Result<()> {
        let mut regs = self.vcpu.get_regs().map_err(io::Error::from)?;
        regs.rip = self.fw.gpa;
        regs.rbx = self.fw.gpa + PAGE;
        regs.rcx = count as u64;
        regs.rsi = self.fw.gpa + 2 * PAGE;
        regs.rdx = stride;
        regs.rflags = 2;
        self.vcpu.set_regs(&regs).map_err(io::Error::from)?;
        match self.vcpu.run().map_err(io::Error::from)? {
            VcpuExit::Hlt => Ok(()),
            other => Err(io::Error::other(format!("vCPU exit {other:?}"))),
        }
    }

    fn run_probe(&mut self) -> io::Result<()> {
        // Copy the first source page onto the second: inside the firmware slot.
        let dst = (self.fw.gpa + 3 * PAGE) as u32;
        self.fw.write(PAGE, &dst.to_le_bytes());
        self.run_copy(1, 0)
    }

    /// Writes `contents[i]` to `pages[i]` from the vCPU, in runs of at most `MAX_BATCH`.
    /// Each page must lie below 4 GiB; a write to [`APIC_PAGE`] fails with an MMIO exit.
    pub fn write_pages(
        &mut self,
        pages: &[GuestAddress],
        contents: &[[u8; 4096]],
    ) -> io::Result<()> {
        assert_eq!(pages.len(), contents.len());
        for (p, c) in pages.chunks(MAX_BATCH).zip(contents.chunks(MAX_BATCH)) {
            let mut list = Vec::with_capacity(p.len() * 4);
            for gpa in p {
                let a = u32::try_from(gpa.0).expect("the vCPU writes below 4 GiB");
                list.extend_from_slice(&a.to_le_bytes());
            }
            self.fw.write(PAGE, &list);
            for (i, page) in c.iter().enumerate() {
                self.fw.write((2 + i as u64) * PAGE, page);
            }
            self.run_copy(p.len(), PAGE)?;
        }
        Ok(())
    }

    /// Fills each page of `pages` with `byte` from the vCPU.
    pub fn fill_pages(&mut self, pages: &[GuestAddress], byte: u8) -> io::Result<()> {
        self.fw.write(2 * PAGE, &[byte; 4096]);
        for p in pages.chunks(1024) {
            let mut list = Vec::with_capacity(p.len() * 4);
            for gpa in p {
                let a = u32::try_from(gpa.0).expect("the vCPU writes below 4 GiB");
                list.extend_from_slice(&a.to_le_bytes());
            }
            self.fw.write(PAGE, &list);
            self.run_copy(p.len(), 0)?;
        }
        Ok(())
    }
}

/// What a [`VcpuPageWriter`] did, readable while it runs.
#[derive(Debug, Default)]
pub struct VcpuWriterStats {
    /// Pages the vCPU wrote.
    pub vcpu_pages: AtomicU64,
    /// `KVM_RUN` calls it took.
    pub runs: AtomicU64,
    /// Nanoseconds spent in those calls (with writing the address list and source pages).
    pub nanos: AtomicU64,
    /// Pages the vCPU cannot write ([`vcpu_can_write`]: at or above 4 GiB, or the APIC
    /// page), written through vm-memory instead.
    pub host_pages: AtomicU64,
}

/// The guest model writer's pages written by a [`PageVcpu`]: KVM's dirty log sees them,
/// vm-memory's write tracking does not. Up to `MAX_BATCH` pages per `KVM_RUN`. The pages the
/// vCPU cannot write ([`vcpu_can_write`]) go through vm-memory.
pub struct VcpuPageWriter {
    vcpu: PageVcpu,
    mem: Mem,
    stats: Arc<VcpuWriterStats>,
    low: Vec<GuestAddress>,
    low_contents: Vec<[u8; 4096]>,
}

impl VcpuPageWriter {
    /// Writes through `vcpu`; the pages it cannot write go through `mem`.
    pub fn new(vcpu: PageVcpu, mem: Mem) -> Self {
        VcpuPageWriter {
            vcpu,
            mem,
            stats: Arc::new(VcpuWriterStats::default()),
            low: Vec::with_capacity(MAX_BATCH),
            low_contents: Vec::with_capacity(MAX_BATCH),
        }
    }

    /// Its counters (shared: they stay readable after the writer is boxed away).
    pub fn stats(&self) -> Arc<VcpuWriterStats> {
        self.stats.clone()
    }
}

impl PageWriter for VcpuPageWriter {
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn write_pages(
        &mut self,
        pages: &[GuestAddress],
        contents: &[[u8; 4096]],
    ) -> Result<(), String> {
        self.low.clear();
        self.low_contents.clear();
        let mut host = 0;
        for (&gpa, page) in pages.iter().zip(contents) {
            if vcpu_can_write(gpa) {
                self.low.push(gpa);
                self.low_contents.push(*page);
            } else {
                // Which way a page goes depends only on its address, so the writes to any
                // one page stay in order.
                self.mem
                    .write_slice(&page[..], gpa)
                    .map_err(|e| format!("writing the page at {:#x}: {e}", gpa.0))?;
                host += 1;
            }
        }
        if !self.low.is_empty() {
            let start = std::time::Instant::now();
            self.vcpu
                .write_pages(&self.low, &self.low_contents)
                .map_err(|e| format!("the vCPU's page writes failed: {e}"))?;
            let n = self.low.len() as u64;
            self.stats.vcpu_pages.fetch_add(n, Ordering::Relaxed);
            self.stats
                .runs
                .fetch_add(n.div_ceil(MAX_BATCH as u64), Ordering::Relaxed);
            let nanos = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.stats.nanos.fetch_add(nanos, Ordering::Relaxed);
        }
        self.stats.host_pages.fetch_add(host, Ordering::Relaxed);
        Ok(())
    }
}
