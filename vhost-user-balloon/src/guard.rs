// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! Guest memory files that shrink under the daemon: a `SIGBUS` guard.
//!
//! The frontend's memory table is checked against each file's size when it arrives (the
//! shim refuses a region that runs past the end of its file), but the
//! frontend keeps its files and may truncate one later. An access to a page of a mapping
//! past the end of its file raises `SIGBUS`, which would kill the daemon.
//!
//! [`install`] sets a `SIGBUS` handler for the process. For a fault at an address inside a
//! mapping of a file [`register`]ed as guest memory, the handler maps a private anonymous
//! page (or huge page, for hugetlbfs) over the faulting page and returns, so the access is
//! retried and sees zeros; writes to that page are not kept in the file (it has no page
//! there any more). It counts the page and signals [`fault_event`], on which the daemon ends
//! the connection of the frontend that did it. Any other `SIGBUS` keeps its default action:
//! the process dies as it would have without the guard.
//!
//! The handler finds the faulting mapping in `/proc/self/maps` (opened by [`install`], so a
//! process out of descriptors is covered too) with async-signal-safe calls only (`pread`,
//! `mmap`, `write`) and stack buffers, and identifies guest
//! memory by the file's device and inode, which the shim registers before the memory table
//! reaches the code that maps it, so no window exists in which a mapping is unguarded.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// How many guest memory files are remembered (the most recent ones). A frontend sends at
/// most 8 regions per table; older entries are overwritten in turn.
const SLOTS: usize = 64;

/// `HUGETLBFS_MAGIC` from `linux/magic.h`.
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// One registered file: device, inode and the page size of its mappings. A slot is valid
/// when its page size is non-zero; writers clear it, fill device and inode, then set it.
struct Slot {
    dev: AtomicU64,
    ino: AtomicU64,
    page: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    dev: AtomicU64::new(0),
    ino: AtomicU64::new(0),
    page: AtomicUsize::new(0),
};

static FILES: [Slot; SLOTS] = [EMPTY; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
/// Pages replaced by zeros since the process started.
static REPLACED: AtomicU64 = AtomicU64::new(0);
/// The eventfd the handler signals after a replacement (-1 before [`install`]).
static EVENT_FD: AtomicI32 = AtomicI32::new(-1);
/// `/proc/self/maps`, opened by [`install`] so the handler needs no new descriptor (the
/// process may be out of them); read with `pread` from offset 0 each time.
static MAPS_FD: AtomicI32 = AtomicI32::new(-1);
static INSTALLED: OnceLock<io::Result<()>> = OnceLock::new();

/// Pages of guest memory replaced by zeros since the process started (accesses past the end
/// of a file the frontend shrank).
pub fn pages_replaced() -> u64 {
    REPLACED.load(Ordering::Relaxed)
}

/// The eventfd the handler signals after replacing a page: readable while a replacement has
/// not been consumed. `None` before [`install`].
pub fn fault_event() -> Option<BorrowedFd<'static>> {
    let fd = EVENT_FD.load(Ordering::Acquire);
    // SAFETY: the descriptor was created by `install` and is never closed (it lives as long
    // as the process).
    (fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(fd) })
}

/// Empties [`fault_event`] (a no-op before [`install`]).
pub fn consume_fault_event() {
    if let Some(fd) = fault_event() {
        let mut n = 0u64;
        // SAFETY: reads at most 8 bytes into a local from the guard's non-blocking eventfd.
        unsafe { libc::read(fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
    }
}

/// Installs the handler (once per process; later calls return the first result).
pub fn install() -> io::Result<()> {
    let r = INSTALLED.get_or_init(|| {
        // SAFETY: eventfd takes two integer arguments and returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        EVENT_FD.store(fd, Ordering::Release);
        // SAFETY: the path is a NUL-terminated literal; open returns a descriptor or -1.
        let maps = unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if maps < 0 {
            return Err(io::Error::last_os_error());
        }
        MAPS_FD.store(maps, Ordering::Release);
        // SAFETY: an all-zero sigaction is a valid value of this plain C struct.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as libc::sighandler_t;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is fully initialised and outlives the call; the handler only makes
        // async-signal-safe calls.
        if unsafe { libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    });
    match r {
        Ok(()) => Ok(()),
        Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
    }
}

/// Registers the file behind `fd` as guest memory: a `SIGBUS` inside one of its mappings is
/// survived. Call it before the file is mapped.
pub fn register(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes and `fd` is open while borrowed.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `fs` is valid for writes and `fd` is open while borrowed.
    let page = if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } == 0
        && fs.f_type as i64 == HUGETLBFS_MAGIC
    {
        usize::try_from(fs.f_bsize).unwrap_or(0).max(page_size())
    } else {
        page_size()
    };
    let (dev, ino) = (st.st_dev, st.st_ino);
    if FILES.iter().any(|s| {
        s.page.load(Ordering::Acquire) != 0
            && s.dev.load(Ordering::Relaxed) == dev
            && s.ino.load(Ordering::Relaxed) == ino
    }) {
        return Ok(());
    }
    let slot = &FILES[NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS];
    slot.page.store(0, Ordering::Release);
    slot.dev.store(dev, Ordering::Relaxed);
    slot.ino.store(ino, Ordering::Relaxed);
    slot.page.store(page, Ordering::Release);
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf takes an integer and returns a value; it touches no memory.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// The page size to replace at, if `(dev, ino)` is registered guest memory.
fn registered(dev: u64, ino: u64) -> Option<usize> {
    FILES.iter().find_map(|s| {
        let page = s.page.load(Ordering::Acquire);
        (page != 0 && s.dev.load(Ordering::Relaxed) == dev && s.ino.load(Ordering::Relaxed) == ino)
            .then_some(page)
    })
}

/// One `/proc/self/maps` line as far as the handler needs it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MapsLine {
    start: usize,
    end: usize,
    dev: u64,
    ino: u64,
}

/// A streaming parser of `/proc/self/maps` (`start-end perms offset major:minor inode path`)
/// that allocates nothing: fed byte by byte, it yields each line's fields at its newline.
#[derive(Default)]
struct MapsParser {
    field: u8,
    cur: MapsLine,
    major: u64,
    num: u64,
}

impl MapsParser {
    fn feed(&mut self, b: u8) -> Option<MapsLine> {
        if b == b'\n' {
            let mut line = self.cur;
            if self.field == 5 {
                // The inode was the last field (no path): it ends at the newline.
                line.ino = self.num;
            }
            let complete = self.field >= 5;
            *self = MapsParser::default();
            return complete.then_some(line);
        }
        let hex = |n: u64, b: u8| -> u64 {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => 0,
            };
            n.wrapping_mul(16).wrapping_add(u64::from(d))
        };
        match (self.field, b) {
            (0, b'-') => {
                self.cur.start = self.num as usize;
                self.num = 0;
                self.field = 1;
            }
            (0, _) => self.num = hex(self.num, b),
            (1, b' ') => {
                self.cur.end = self.num as usize;
                self.num = 0;
                self.field = 2;
            }
            (1, _) => self.num = hex(self.num, b),
            // Permissions, then the offset.
            (2 | 3, b' ') => self.field += 1,
            (2 | 3, _) => {}
            (4, b':') => {
                self.major = self.num;
                self.num = 0;
            }
            (4, b' ') => {
                self.cur.dev = libc::makedev(self.major as u32, self.num as u32);
                self.num = 0;
                self.field = 5;
            }
            (4, _) => self.num = hex(self.num, b),
            (5, b' ') => {
                self.cur.ino = self.num;
                self.field = 6;
            }
            (5, b'0'..=b'9') => {
                self.num = self.num.wrapping_mul(10).wrapping_add(u64::from(b - b'0'))
            }
            _ => {}
        }
        None
    }
}

/// Finds the mapping holding `addr` in `/proc/self/maps` (the descriptor [`install`]
/// opened), with async-signal-safe calls only.
fn find_mapping(addr: usize) -> Option<MapsLine> {
    let fd = MAPS_FD.load(Ordering::Acquire);
    if fd < 0 {
        return None;
    }
    let mut buf = [0u8; 4096];
    let mut parser = MapsParser::default();
    let mut offset: libc::off_t = 0;
    loop {
        // SAFETY: `buf` is valid for writes of its length; `fd` is open for the process's
        // life. pread keeps no shared file position, so concurrent faults do not interfere.
        let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), buf.len(), offset) };
        if n <= 0 {
            return None;
        }
        // 0 < n <= buf.len() (4096), so neither conversion loses anything.
        offset += n as libc::off_t;
        for &b in &buf[..n as usize] {
            if let Some(line) = parser.feed(b) {
                if line.start <= addr && addr < line.end {
                    return Some(line);
                }
            }
        }
    }
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // Only faults the kernel raised (si_code > 0), not a SIGBUS sent by kill().
    if code > 0 {
        if let Some(line) = find_mapping(addr) {
            if let Some(page) = registered(line.dev, line.ino) {
                let at = addr & !(page - 1);
                // SAFETY: [at, at + page) lies inside a mapping of guest memory (found
                // above) that the faulting thread is using, so it is not unmapped meanwhile;
                // MAP_FIXED replaces that page with a private zero page and nothing else.
                let r = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                        -1,
                        0,
                    )
                };
                if r != libc::MAP_FAILED {
                    REPLACED.fetch_add(1, Ordering::Relaxed);
                    let fd = EVENT_FD.load(Ordering::Relaxed);
                    let one: u64 = 1;
                    // SAFETY: writes 8 bytes from a local to the guard's own eventfd (or
                    // fails harmlessly on -1).
                    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
                    return;
                }
            }
        }
    }
    // Not ours: the default action, as if no handler had been installed.
    // SAFETY: signal and raise are async-signal-safe; SIG_DFL is a valid disposition. A
    // fault re-executes the access and dies; a sent signal is raised again.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd};

    #[test]
    fn maps_lines_are_parsed() {
        let text = b"7f00a000-7f00c000 rw-s 00000000 00:01 1234  /memfd:guest (deleted)\n\
                     7f00c000-7f00d000 r--p 00002000 fd:01 98765 /usr/lib/libc.so.6\n\
                     7ffd0000-7ffd1000 rw-p 00000000 00:00 0\n";
        let mut p = MapsParser::default();
        let lines: Vec<_> = text.iter().filter_map(|&b| p.feed(b)).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            MapsLine {
                start: 0x7f00_a000,
                end: 0x7f00_c000,
                dev: libc::makedev(0, 1),
                ino: 1234
            }
        );
        assert_eq!(lines[1].dev, libc::makedev(0xfd, 1));
        assert_eq!(lines[1].ino, 98765);
        assert_eq!(lines[2].ino, 0);
        assert_eq!(lines[2].end, 0x7ffd_1000);
    }

    fn memfd(len: u64) -> std::fs::File {
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nobody else.
        let f = unsafe { std::fs::File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f
    }

    fn map(f: &std::fs::File, len: usize) -> *mut u8 {
        // SAFETY: maps `len` bytes of an open file shared; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p.cast()
    }

    #[test]
    fn the_mapping_of_an_address_is_found() {
        install().unwrap();
        let f = memfd(8192);
        let p = map(&f, 8192);
        // SAFETY: an all-zero stat is valid; `f` is open.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is writable and `f` is open.
        assert_eq!(unsafe { libc::fstat(f.as_raw_fd(), &mut st) }, 0);
        let line = find_mapping(p as usize + 100).expect("mapping found");
        assert_eq!((line.dev, line.ino), (st.st_dev, st.st_ino));
        assert!(line.start <= p as usize && p as usize + 8192 <= line.end);
        assert!(find_mapping(8).is_none());
        // SAFETY: unmaps what `map` mapped.
        unsafe { libc::munmap(p.cast(), 8192) };
    }

    #[test]
    fn a_shrunk_guest_file_reads_zeros_instead_of_killing_the_process() {
        install().unwrap();
        let f = memfd(3 * 4096);
        register(f.as_fd()).unwrap();
        let p = map(&f, 3 * 4096);
        // SAFETY: the first page is inside the file.
        unsafe { p.write_volatile(7) };
        f.set_len(4096).unwrap();
        let before = pages_replaced();
        // SAFETY: the mapping is 3 pages long; page 2 is now past the end of the file, which
        // the guard turns into a zero page instead of SIGBUS.
        let v = unsafe { p.add(2 * 4096 + 5).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: as above, the replaced page is writable private memory now.
        unsafe { p.add(2 * 4096).write_volatile(9) };
        assert_eq!(pages_replaced(), before + 1);
        let mut n = 0u64;
        let fd = fault_event().unwrap().as_raw_fd();
        // SAFETY: reads 8 bytes into a local from the guard's eventfd.
        let r = unsafe { libc::read(fd, (&mut n as *mut u64).cast(), 8) };
        assert_eq!(r, 8);
        assert!(n >= 1);
        // SAFETY: the first page is still in the file.
        assert_eq!(unsafe { p.read_volatile() }, 7);
        // SAFETY: unmaps what `map` mapped.
        unsafe { libc::munmap(p.cast(), 3 * 4096) };
    }
}
