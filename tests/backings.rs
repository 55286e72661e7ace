// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Memory really freed by inflation, on every kind of host memory behind a guest region.
//!
//! Each test builds guest memory of two regions: `[0, 4 MiB)`, anonymous, holds the driver
//! model's rings; the region under test starts at 4 MiB and is the balloon's whole page
//! pool. The guest fills the region, then the Linux driver model of `guest_model` inflates N
//! MiB of it through real virtio-mmio, split rings in guest memory and the device's event
//! loop, with the device's default backend ([`MadviseBackend::new`], which chooses per
//! region). The test then measures what the host holds for the region:
//!
//! * resident memory of the mapping from `/proc/self/smaps` (`Rss`, and `Anonymous` for the
//!   private copies of a private file mapping),
//! * the blocks allocated to a memfd (`fstat`: `st_blocks * 512`),
//! * free huge pages of the system (`HugePages_Free` in `/proc/meminfo`) for hugetlbfs.
//!
//! and asserts that at least 90% of the N MiB were freed. A private file mapping frees the
//! guest's private copies (`Anonymous`) while its file stays exactly as it was: the inflated
//! pages then read the file's data. Then the driver deflates, the guest writes the pages
//! again, and they must read back as written, while the pages the guest kept hold what it
//! wrote before.
//!
//! hugetlbfs tests reserve four 2 MiB pages through `/proc/sys/vm/nr_hugepages` (root only),
//! one test at a time (a mutex in this process, `flock` across test processes), and put the
//! old value back afterwards; they count the system's free huge pages, so nothing else on the
//! host should allocate huge pages meanwhile. Where a facility is missing the test says why
//! and returns. Nothing here asserts how long anything took.
//!
//! `cargo test --test backings -- --nocapture --test-threads 1` prints the figures.

use guest_model::backend::{BackendOp, RecordingBackend};

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use guest_model::host::{
    aligned_anonymous, allocated, mapped, memfd, meminfo, smaps, HugePages, Smaps, HUGETLB,
};
use guest_model::*;
use virtio_balloon::backend::{DiscardPolicy, MadviseBackend, RegionBacking};
use virtio_balloon::sink::RecordingSink;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};

/// A PFN's frame.
const PAGE: u64 = BALLOON_PFN_BYTES;
/// The huge page size the hugetlbfs tests use.
const HUGE: u64 = guest_model::host::HUGE_PAGE;
/// Where the region under test starts in the guest.
const REGION: u64 = 4 * MIB;
/// Salts of what the guest writes before inflating and after deflating.
const SALT_BEFORE: u64 = 0x5a5a_0000_0000_0001;
const SALT_AFTER: u64 = 0xc3c3_0000_0000_0001;
/// The byte a private file mapping's file holds.
const FILE_BYTE: u8 = 0xa7;

fn mib(bytes: f64) -> f64 {
    bytes / MIB as f64
}

/// A `LEN`-byte memfd mapped shared, and the memfd.
fn map_shared_memfd(name: &std::ffi::CStr) -> (MmapRegion<AtomicBitmap>, File) {
    let file = memfd(name, 0, LEN).expect("memfd");
    let region = mapped(
        LEN as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        libc::MAP_SHARED | libc::MAP_NORESERVE,
        None,
    )
    .expect("map the memfd");
    (region, file)
}

/// Guest memory: the anonymous driver region and `region` at [`REGION`].
fn memory(region: MmapRegion<AtomicBitmap>) -> Mem {
    let low = GuestRegionMmap::<AtomicBitmap>::from_range(GuestAddress(0), REGION as usize, None)
        .expect("driver region");
    let test = GuestRegionMmap::new(region, GuestAddress(REGION)).expect("region under test");
    Arc::new(GuestMemoryMmap::from_regions(vec![low, test]).expect("guest memory"))
}

// ---------------------------------------------------------------------------------------------
// The device side: the default backend, with its calls recorded.

/// The harness over `mem`: step mode (the test runs the driver's size work), the balloon's
/// page pool the region under test, handed out in ascending order.
fn rig(mem: Mem, len: u64, policy: DiscardPolicy) -> (Harness, Arc<RecordingBackend>) {
    let watch = RecordingBackend::over(Arc::new(MadviseBackend::new().with_policy(policy)));
    let mut cfg = HarnessConfig::balloon(REGION + len, len);
    cfg.regions = vec![(GuestAddress(0), REGION), (GuestAddress(REGION), len)];
    cfg.driver.page_order = PageOrder::Ascending;
    let h = Harness::with_memory_and_backend(
        cfg,
        mem,
        Arc::new(RecordingSink::default()),
        watch.clone(),
    );
    (h, watch)
}

/// Sets the target to `bytes` and has the driver inflate or deflate to it; then makes sure
/// nothing is left pending.
fn balloon_to(h: &Harness, bytes: u64) {
    let pages = u32::try_from(bytes / PAGE).unwrap();
    dev(h, |b| b.set_target(pages));
    let su = h.driver.run_size_work();
    assert_eq!(su.end, SizeEnd::Reached, "{su:?}");
    assert_eq!(h.driver.balloon_num_pages(), pages);
    dev(h, |b| b.flush_discards());
}

// ---------------------------------------------------------------------------------------------
// Guest page contents.

fn assert_pages(mem: &Mem, pfns: &BTreeSet<u64>, want: impl Fn(u64) -> (u64, u64), what: &str) {
    for &p in pfns {
        assert_eq!(read_page(mem, p), want(p), "{what}: frame {p:#x}");
    }
}

fn frames(start: u64, len: u64) -> BTreeSet<u64> {
    (start / PAGE..(start + len) / PAGE).collect()
}

/// The frames in the driver's balloon.
fn balloon_frames(h: &Harness) -> BTreeSet<u64> {
    h.driver
        .balloon_pages()
        .iter()
        .map(|p| p.0 / PAGE)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The measurement.

/// How a test measures what the host holds for the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Gauge {
    /// `Rss` of the region's mappings.
    Rss,
    /// `Anonymous` of the region's mappings (the private copies of a private file mapping).
    Anonymous,
    /// Bytes allocated to the region's file.
    FileBlocks,
    /// `Shared_Hugetlb + Private_Hugetlb` of the region's mappings.
    Hugetlb,
    /// Free huge pages of the system, in bytes (counted up: more free is less held).
    HugePagesFree,
}

impl Gauge {
    fn name(self) -> &'static str {
        match self {
            Gauge::Rss => "Rss",
            Gauge::Anonymous => "Anonymous",
            Gauge::FileBlocks => "file st_blocks*512",
            Gauge::Hugetlb => "smaps *_Hugetlb",
            Gauge::HugePagesFree => "HugePages_Free*2MiB",
        }
    }
}

/// What inflating does to the region under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// At least 90% of N freed; the inflated pages read zeros.
    Freed,
    /// At least 90% of N freed; the inflated pages read the data of the file the region
    /// maps privately, which does not change.
    FreedFileData,
    /// Nothing freed by the checked gauges; the inflated pages keep what the guest wrote.
    Kept,
}

/// A region under test.
struct Case {
    name: &'static str,
    region: MmapRegion<AtomicBitmap>,
    len: u64,
    /// What the device must find behind it.
    backing: RegionBacking,
    /// The region's file, for `st_blocks` (memfds) or to check it stays the same.
    file: Option<File>,
    /// What the 90% assertion is made on (the others are printed).
    gauges: &'static [Gauge],
    /// Inflate this much.
    inflate: u64,
    /// How the backend discards.
    policy: DiscardPolicy,
    /// What inflating must do.
    expect: Expect,
    /// Inflate one huge page in two halves first, checking that the first half frees
    /// nothing.
    halves: bool,
}

/// What the gauges read at one moment.
#[derive(Clone, Copy, Debug)]
struct Reading {
    smaps: Smaps,
    file_blocks: u64,
    huge_free: u64,
}

impl Reading {
    fn take(host: u64, len: u64, file: Option<&File>) -> Reading {
        Reading {
            smaps: smaps(host, len),
            file_blocks: file.map_or(0, allocated),
            huge_free: meminfo("HugePages_Free") * HUGE,
        }
    }

    /// What the host holds by `gauge` (for free huge pages: how many are *not* free).
    fn held(&self, gauge: Gauge) -> i128 {
        match gauge {
            Gauge::Rss => self.smaps.rss as i128,
            Gauge::Anonymous => self.smaps.anonymous as i128,
            Gauge::FileBlocks => self.file_blocks as i128,
            Gauge::Hugetlb => self.smaps.hugetlb as i128,
            Gauge::HugePagesFree => -(self.huge_free as i128),
        }
    }
}

/// Bytes freed between two readings by `gauge`.
fn freed(before: &Reading, after: &Reading, gauge: Gauge) -> i128 {
    before.held(gauge) - after.held(gauge)
}

/// Fills the region, inflates `case.inflate`, measures, deflates, writes and reads back.
fn run(case: Case) {
    let name = case.name;
    let len = case.len;
    let n = case.inflate;
    let host = case.region.as_ptr() as u64;
    let mem = memory(case.region);
    let region = mem.find_region(GuestAddress(REGION)).unwrap();
    let found = RegionBacking::of_region(region);
    assert_eq!(found, case.backing, "{name}: what backs the region");
    let page = found.page_size();
    let file = case.file.as_ref();
    let read_file = |mut f: &File| {
        let mut buf = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut buf).unwrap();
        buf
    };
    let file_data_before = file
        .filter(|_| case.expect == Expect::FreedFileData)
        .map(read_file);
    let (h, watch) = rig(mem.clone(), len, case.policy);

    let empty = Reading::take(host, len, file);
    let all = frames(REGION, len);
    write_pages(&mem, &all, SALT_BEFORE);
    let filled = Reading::take(host, len, file);

    if case.halves {
        // Half a huge page frees nothing: the device waits for the other half.
        balloon_to(&h, HUGE / 2);
        let half = Reading::take(host, len, file);
        for &g in case.gauges {
            assert_eq!(
                freed(&filled, &half, g),
                0,
                "{name}: half a huge page by {g:?}"
            );
        }
        balloon_to(&h, HUGE);
        let whole = Reading::take(host, len, file);
        for &g in case.gauges {
            assert_eq!(
                freed(&filled, &whole, g),
                HUGE as i128,
                "{name}: one whole huge page by {g:?}"
            );
        }
        eprintln!(
            "backings: {name}: {} after inflating 1 MiB: {} bytes freed; after 2 MiB: {} bytes",
            case.gauges[0].name(),
            freed(&filled, &half, case.gauges[0]),
            freed(&filled, &whole, case.gauges[0])
        );
    }
    balloon_to(&h, n);
    let inflated = Reading::take(host, len, file);
    let balloon = balloon_frames(&h);
    assert_eq!(balloon, frames(REGION, n), "{name}: the balloon");

    // The device: every discard in whole pages of the region, with its backing.
    let discards = watch.of(BackendOp::Discard);
    assert!(!discards.is_empty(), "{name}: no discard");
    let mut asked = 0;
    for d in &discards {
        assert!(
            d.gpa >= REGION && d.gpa + d.len <= REGION + len,
            "{name}: {d:?}"
        );
        assert_eq!(d.backing, case.backing, "{name}: {d:?}");
        assert_eq!((d.host_addr % page, d.len % page), (0, 0), "{name}: {d:?}");
        asked += d.len;
    }
    assert_eq!(asked, n, "{name}: bytes the device asked to discard");
    let m = dev(&h, |b| b.metrics()).pages;
    if case.backing.is_known() || case.policy != DiscardPolicy::Auto {
        assert_eq!(m.discards_failed, 0, "{name}: {m:?}");
        assert_eq!(m.discarded_bytes, n, "{name}: {m:?}");
    } else {
        // Unknown: the backend refused every discard.
        assert_eq!(m.discards_failed, discards.len() as u64, "{name}: {m:?}");
        assert_eq!(m.discarded_bytes, 0, "{name}: {m:?}");
    }
    let unknown = if case.backing.is_known() {
        (0, 0)
    } else {
        (1, n)
    };
    assert_eq!(
        (m.unknown_backing_regions, m.unknown_backing_bytes),
        unknown,
        "{name}: {m:?}"
    );

    // What the host freed.
    let mut lines = Vec::new();
    let hugetlb = matches!(case.backing, RegionBacking::HugeTlb { .. });
    for g in [
        Gauge::Rss,
        Gauge::Anonymous,
        Gauge::FileBlocks,
        Gauge::Hugetlb,
        Gauge::HugePagesFree,
    ] {
        let applies = match g {
            Gauge::FileBlocks => file.is_some(),
            Gauge::Hugetlb | Gauge::HugePagesFree => hugetlb,
            Gauge::Rss | Gauge::Anonymous => !hugetlb,
        };
        if !applies {
            continue;
        }
        let f = freed(&filled, &inflated, g);
        let checked = case.gauges.contains(&g);
        lines.push(format!(
            "{}{:<20} filled {:>5.1} MiB, inflated {:>5.1} MiB: freed {:>5.1} MiB = {:>8} \
             bytes = {:5.1}% of N",
            if checked { "* " } else { "  " },
            g.name(),
            mib(filled.held(g).unsigned_abs() as f64),
            mib(inflated.held(g).unsigned_abs() as f64),
            mib(f as f64),
            f,
            100.0 * f as f64 / n as f64
        ));
        if !checked {
            continue;
        }
        match case.expect {
            Expect::Freed | Expect::FreedFileData => assert!(
                f * 10 >= i128::from(n) * 9,
                "{name}: inflating {} MiB freed only {f} bytes by {}",
                n / MIB,
                g.name()
            ),
            Expect::Kept => assert_eq!(f, 0, "{name}: freed by {}", g.name()),
        }
    }
    eprintln!(
        "backings: {name}: {:?}, {} KiB pages, {:?}: N = {} MiB inflated of a {} MiB region \
         (Rss {:.1} MiB before the guest wrote), {} discard call(s); AnonHugePages {:.1} -> \
         {:.1} MiB\n    {}",
        case.backing,
        page / 1024,
        case.policy,
        n / MIB,
        len / MIB,
        mib(empty.smaps.rss as f64),
        discards.len(),
        mib(filled.smaps.anon_huge as f64),
        mib(inflated.smaps.anon_huge as f64),
        lines.join("\n    ")
    );

    // What the guest sees: inflated pages read zeros, the file's data, or what it wrote;
    // the rest is as it wrote it.
    let wrote = |salt| {
        move |p| {
            let v = pattern(p, salt);
            (v, v)
        }
    };
    let kept: BTreeSet<u64> = all.difference(&balloon).copied().collect();
    assert_pages(
        &mem,
        &kept,
        wrote(SALT_BEFORE),
        &format!("{name}: page kept"),
    );
    let inflated_page = format!("{name}: inflated page");
    match case.expect {
        Expect::Freed => assert_pages(&mem, &balloon, |_| (0, 0), &inflated_page),
        Expect::FreedFileData => {
            let v = u64::from_ne_bytes([FILE_BYTE; 8]);
            assert_pages(&mem, &balloon, |_| (v, v), &inflated_page);
            // The file is never touched.
            let now = file.map(read_file);
            assert!(now == file_data_before, "{name}: the file changed");
            assert_eq!(
                inflated.file_blocks, filled.file_blocks,
                "{name}: file blocks"
            );
        }
        Expect::Kept => assert_pages(&mem, &balloon, wrote(SALT_BEFORE), &inflated_page),
    }

    // Deflate; the guest uses the pages again.
    balloon_to(&h, 0);
    assert!(balloon_frames(&h).is_empty());
    write_pages(&mem, &balloon, SALT_AFTER);
    assert_pages(
        &mem,
        &balloon,
        wrote(SALT_AFTER),
        &format!("{name}: deflated page"),
    );
    assert_pages(
        &mem,
        &kept,
        wrote(SALT_BEFORE),
        &format!("{name}: kept, after deflate"),
    );
    if case.expect != Expect::Kept {
        let again = Reading::take(host, len, file);
        for &g in case.gauges {
            assert!(
                freed(&inflated, &again, g) < 0,
                "{name}: the guest's writes after the deflate allocate memory again ({g:?})"
            );
        }
    }
    let m = dev(&h, |b| b.metrics()).pages;
    assert_eq!(m.deflated_pages * PAGE, n, "{name}: {m:?}");
    assert_eq!(m.populates_failed, 0, "{name}: {m:?}");
    h.assert_clean();
}

// ---------------------------------------------------------------------------------------------
// The backings.

/// 64 MiB regions, 32 MiB inflated.
const LEN: u64 = 64 * MIB;
const N: u64 = 32 * MIB;

/// A case with the automatic choice, freeing memory that reads zeros afterwards.
fn case(
    name: &'static str,
    region: MmapRegion<AtomicBitmap>,
    backing: RegionBacking,
    file: Option<File>,
    gauges: &'static [Gauge],
) -> Case {
    let hugetlb = matches!(backing, RegionBacking::HugeTlb { .. });
    Case {
        name,
        region,
        len: if hugetlb { HUGE_LEN } else { LEN },
        backing,
        file,
        gauges,
        inflate: if hugetlb { HUGE_N } else { N },
        policy: DiscardPolicy::Auto,
        expect: Expect::Freed,
        halves: false,
    }
}

#[test]
fn anonymous_private_memory() {
    // THP off for this region: the plain 4 KiB case.
    let (region, _mapping) = aligned_anonymous(LEN as usize, libc::MADV_NOHUGEPAGE, None);
    run(case(
        "anonymous private",
        region,
        RegionBacking::AnonymousPrivate,
        None,
        &[Gauge::Rss, Gauge::Anonymous],
    ));
}

#[test]
fn anonymous_memory_on_transparent_huge_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !thp.contains("[always]") && !thp.contains("[madvise]") {
        eprintln!(
            "backings: transparent huge pages: skipped, the kernel has them off ({:?})",
            thp.trim()
        );
        return;
    }
    let (region, _mapping) = aligned_anonymous(LEN as usize, libc::MADV_HUGEPAGE, None);
    // Whether the kernel found huge pages shows in the figures (AnonHugePages); the memory
    // is freed either way.
    run(case(
        "anonymous private with MADV_HUGEPAGE",
        region,
        RegionBacking::AnonymousPrivate,
        None,
        &[Gauge::Rss, Gauge::Anonymous],
    ));
}

#[test]
fn shared_memfd() {
    let (region, file) = map_shared_memfd(c"backings-shm");
    run(case(
        "MAP_SHARED memfd",
        region,
        RegionBacking::SharedFile,
        Some(file),
        &[Gauge::FileBlocks, Gauge::Rss],
    ));
}

#[test]
fn shared_memfd_with_the_madvise_override_keeps_its_blocks() {
    // What the backend did before it looked at the backing: MADV_DONTNEED drops the pages
    // from the mapping (Rss falls) but the memfd keeps every block.
    let (region, file) = map_shared_memfd(c"backings-shm-madvise");
    run(Case {
        policy: DiscardPolicy::Madvise,
        expect: Expect::Kept,
        ..case(
            "MAP_SHARED memfd, MADV_DONTNEED override",
            region,
            RegionBacking::SharedFile,
            Some(file),
            &[Gauge::FileBlocks],
        )
    });
}

#[test]
fn shared_anonymous_memory() {
    // No descriptor to punch: the device frees it with MADV_REMOVE.
    let region = mapped(
        LEN as usize,
        None,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS,
        None,
    )
    .expect("map shared anonymous memory");
    run(case(
        "MAP_SHARED|MAP_ANONYMOUS",
        region,
        RegionBacking::SharedFile,
        None,
        &[Gauge::Rss],
    ));
}

#[test]
fn private_file_mapping() {
    // A snapshot file restored copy-on-write: the guest's writes are private copies, which
    // inflation frees; the file must stay exactly as it is, and the inflated pages read its
    // data again.
    let mut file = vmm_sys_util::tempfile::TempFile::new_with_prefix("/tmp/backings-private-")
        .expect("temp file")
        .into_file();
    let chunk = vec![FILE_BYTE; MIB as usize];
    for _ in 0..LEN / MIB {
        file.write_all(&chunk).unwrap();
    }
    file.sync_all().unwrap();
    let region = mapped(
        LEN as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        libc::MAP_PRIVATE,
        None,
    )
    .expect("map the file privately");
    run(Case {
        expect: Expect::FreedFileData,
        ..case(
            "MAP_PRIVATE file",
            region,
            RegionBacking::PrivateFile,
            Some(file),
            &[Gauge::Anonymous],
        )
    });
}

#[test]
fn a_region_of_unknown_backing_is_left_alone_and_counted() {
    // Anonymous memory that tells vm-memory it is on hugetlbfs: the kernel disagrees, so the
    // device cannot tell what backs it and the default backend frees nothing there.
    let (region, _mapping) = aligned_anonymous(LEN as usize, libc::MADV_NOHUGEPAGE, Some(true));
    run(Case {
        expect: Expect::Kept,
        ..case(
            "anonymous memory claiming hugetlbfs",
            region,
            RegionBacking::Unknown,
            None,
            &[Gauge::Rss, Gauge::Anonymous],
        )
    });
}

/// 8 MiB hugetlbfs regions (four 2 MiB pages), 4 MiB inflated.
const HUGE_LEN: u64 = 8 * MIB;
const HUGE_N: u64 = 4 * MIB;

/// Runs a hugetlbfs case with four huge pages reserved, one such test at a time.
fn with_huge_pages(test: &str, make: impl FnOnce() -> io::Result<Case>) {
    let _serial = lock(&HUGETLB);
    let _pages = match HugePages::reserve(HUGE_LEN / HUGE) {
        Ok(p) => p,
        Err(why) => {
            eprintln!("backings: {test}: skipped: {why}");
            return;
        }
    };
    let case = match make() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("backings: {test}: skipped: cannot map hugetlbfs memory: {e}");
            return;
        }
    };
    run(case);
}

const HUGE_PRIVATE: RegionBacking = RegionBacking::HugeTlb {
    page_size: HUGE,
    shared: false,
};
const HUGE_SHARED: RegionBacking = RegionBacking::HugeTlb {
    page_size: HUGE,
    shared: true,
};

#[test]
fn hugetlb_anonymous_private() {
    with_huge_pages("MAP_HUGETLB private", || {
        let region = mapped(
            HUGE_LEN as usize,
            None,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            Some(true),
        )?;
        Ok(Case {
            halves: true,
            ..case(
                "MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB",
                region,
                HUGE_PRIVATE,
                None,
                &[Gauge::HugePagesFree, Gauge::Hugetlb],
            )
        })
    });
}

#[test]
fn hugetlb_shared_memfd() {
    with_huge_pages("MFD_HUGETLB memfd", || {
        let file = memfd(c"backings-huge", libc::MFD_HUGETLB, HUGE_LEN)?;
        let region = mapped(
            HUGE_LEN as usize,
            Some(FileOffset::new(file.try_clone()?, 0)),
            libc::MAP_SHARED,
            Some(true),
        )?;
        Ok(Case {
            halves: true,
            ..case(
                "MAP_SHARED memfd with MFD_HUGETLB",
                region,
                HUGE_SHARED,
                Some(file),
                &[Gauge::HugePagesFree, Gauge::FileBlocks, Gauge::Hugetlb],
            )
        })
    });
}

#[test]
fn hugetlb_anonymous_shared() {
    with_huge_pages("MAP_HUGETLB shared", || {
        // Without vm-memory's hugetlbfs flag: the device asks the kernel.
        let region = mapped(
            HUGE_LEN as usize,
            None,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
            None,
        )?;
        Ok(case(
            "MAP_SHARED|MAP_ANONYMOUS|MAP_HUGETLB",
            region,
            HUGE_SHARED,
            None,
            &[Gauge::HugePagesFree, Gauge::Hugetlb],
        ))
    });
}
