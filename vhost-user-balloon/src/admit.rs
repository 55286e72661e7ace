// Copyright 2026 The virtio-balloon maintainers.
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! What the daemon admits from a frontend: the descriptors attached to its requests.
//!
//! The shim calls [`check_request`] on every request before `vhost` sees
//! it. A request it refuses ends the connection, with a log line naming what was wrong:
//!
//! * `VHOST_USER_SET_MEM_TABLE`: each region must lie inside its file
//!   (`mmap_offset + memory_size` at most the file's size, checked arithmetic), so mapping it
//!   cannot fault, and the file must not be on a FUSE filesystem (its server, which the
//!   frontend may run, could stall every page fault; the filesystem is read from `/proc`,
//!   not asked). Each file is then [`register`](crate::guard::register)ed with the SIGBUS
//!   guard, so a file the frontend shrinks *later* costs that frontend its connection, never
//!   the daemon.
//! * `VHOST_USER_SET_VRING_KICK` and `VHOST_USER_SET_VRING_ERR`: an eventfd. The daemon
//!   reads kicks 8 bytes at a time; anything else (a pipe holding part of a word) could
//!   block the vring worker forever.
//! * `VHOST_USER_SET_VRING_CALL`: an eventfd, a pipe or a Unix socket. User-Mode Linux's
//!   `virtio_uml` gives one end of a Unix stream socket pair (its `os_pipe`), because SIGIO
//!   does not work on eventfds. A regular file, another socket or a device is refused.
//!
//! Kick, call and error descriptors are made non-blocking (`O_NONBLOCK` on the open file
//! description the frontend shares), so a drained kick or a full call descriptor returns
//! `EAGAIN` instead of blocking.

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use vhost::vhost_user::message::{FrontendReq, VhostUserMemory, VhostUserMemoryRegion};
use vm_memory::ByteValued;

/// The vring index bits of a `VHOST_USER_SET_VRING_*` file payload.
const VRING_INDEX_MASK: u64 = 0xff;
/// The bit of a `VHOST_USER_SET_VRING_*` file payload that says no descriptor is attached.
const VRING_NOFD: u64 = 0x100;

/// Why a request was refused.
#[derive(Debug)]
pub struct Refused(String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

impl From<Refused> for io::Error {
    fn from(r: Refused) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, r.0)
    }
}

/// What kind of file a descriptor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FdKind {
    /// An eventfd.
    EventFd,
    /// A pipe or FIFO.
    Pipe,
    /// An `AF_UNIX` socket.
    UnixSocket,
    /// A regular file.
    File,
    /// Anything else (a socket, a device, another anonymous inode).
    Other,
}

impl FdKind {
    /// The kind of `fd`.
    pub fn of(fd: BorrowedFd<'_>) -> io::Result<FdKind> {
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is valid for writes and `fd` is open while borrowed.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO => FdKind::Pipe,
            libc::S_IFREG => FdKind::File,
            libc::S_IFSOCK if sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX) => {
                FdKind::UnixSocket
            }
            libc::S_IFSOCK => FdKind::Other,
            _ => {
                // An eventfd is an anonymous inode whose link names it.
                let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
                if link.as_os_str() == "anon_inode:[eventfd]" {
                    FdKind::EventFd
                } else {
                    FdKind::Other
                }
            }
        })
    }
}

/// A `SOL_SOCKET` option of socket `fd` (`None` if it is not a socket).
fn sockopt(fd: BorrowedFd<'_>, opt: libc::c_int) -> Option<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are valid for writes and `len` holds the size of `val`;
    // getsockopt writes at most `len` bytes. `fd` is open while borrowed.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(val)
}

/// Whether `fd` is an `AF_UNIX` `SOCK_STREAM` socket (what a backend channel must be).
pub fn is_unix_stream(fd: BorrowedFd<'_>) -> bool {
    sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && sockopt(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
}

/// Sets `O_NONBLOCK` on `fd`'s open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: F_GETFL reads the descriptor's flags and touches no memory.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL sets the flags of an open descriptor and touches no memory.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is valid for writes and `fd` is open while borrowed.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(st.st_size).unwrap_or(0))
}

/// The type of the filesystem `fd` is on, read from `/proc/self/fdinfo` and
/// `/proc/self/mountinfo`, never from the filesystem itself (a FUSE server may leave a
/// request unanswered for ever). `None` when its mount is not listed (a memfd's internal
/// mount, say).
pub fn mount_fs_type(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let Some(id) = fdinfo_mnt_id(&fdinfo) else {
        return Ok(None);
    };
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mountinfo_fs_type(&mountinfo, id).map(str::to_owned))
}

/// Whether a filesystem of type `fs` (as `/proc/<pid>/mountinfo` names it) is served by a
/// process: FUSE in all its forms (`fuse`, `fuseblk`, `fuse.<subtype>`).
fn served_by_a_process(fs: &str) -> bool {
    fs == "fuse" || fs == "fuseblk" || fs.starts_with("fuse.")
}

/// The `mnt_id:` of a `/proc/<pid>/fdinfo/<fd>` text.
fn fdinfo_mnt_id(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("mnt_id:"))
        .and_then(|v| v.trim().parse().ok())
}

/// The filesystem type of mount `id` in a `/proc/<pid>/mountinfo` text (the field after the
/// ` - ` separator).
fn mountinfo_fs_type(text: &str, id: u64) -> Option<&str> {
    text.lines().find_map(|l| {
        let first = l.split_ascii_whitespace().next()?;
        if first.parse::<u64>().ok()? != id {
            return None;
        }
        l.split_once(" - ")?.1.split_ascii_whitespace().next()
    })
}

/// Checks a `SET_MEM_TABLE` payload against its files and registers them with the SIGBUS
/// guard. A table `vhost` will refuse anyway (no regions, more than it takes, not one
/// descriptor per region, a short payload) passes unchecked for `vhost` to judge.
fn check_mem_table(payload: &[u8], fds: &[OwnedFd]) -> Result<(), Refused> {
    let head = std::mem::size_of::<VhostUserMemory>();
    let size = std::mem::size_of::<VhostUserMemoryRegion>();
    let Some(table) = payload.get(..head).and_then(VhostUserMemory::from_slice) else {
        return Ok(());
    };
    let count = table.num_regions as usize;
    let regions = count
        .checked_mul(size)
        .and_then(|n| n.checked_add(head))
        .and_then(|end| payload.get(head..end));
    let Some(regions) = regions else {
        return Ok(());
    };
    if count == 0 || fds.len() != count {
        return Ok(());
    }
    for (i, (raw, fd)) in regions.chunks_exact(size).zip(fds).enumerate() {
        let Some(region) = VhostUserMemoryRegion::from_slice(raw) else {
            return Ok(());
        };
        let (gpa, len, offset) = (
            region.guest_phys_addr,
            region.memory_size,
            region.mmap_offset,
        );
        // Before anything asks the file's filesystem: a FUSE server the frontend runs could
        // leave the question, or a page fault of the mapping, unanswered for ever.
        match mount_fs_type(fd.as_fd()) {
            Ok(Some(fs)) if served_by_a_process(&fs) => {
                return Err(Refused(format!(
                    "memory region {i}: its file is on a {fs} filesystem, whose server could \
                     stall every access"
                )))
            }
            Ok(_) => {}
            Err(e) => {
                return Err(Refused(format!(
                    "memory region {i}: cannot tell its file's filesystem: {e}"
                )))
            }
        }
        let file = file_size(fd.as_fd())
            .map_err(|e| Refused(format!("memory region {i}: cannot stat its file: {e}")))?;
        match offset.checked_add(len) {
            Some(end) if end <= file => {}
            _ => {
                return Err(Refused(format!(
                    "memory region {i} (guest address {gpa:#x}, {len:#x} bytes at file offset \
                     {offset:#x}) runs past the end of its file ({file:#x} bytes)"
                )))
            }
        }
        crate::guard::register(fd.as_fd()).map_err(|e| {
            Refused(format!(
                "memory region {i}: cannot register its file with the SIGBUS guard: {e}"
            ))
        })?;
    }
    Ok(())
}

/// Only eventfds: what a kick or an error descriptor must be.
const EVENTFD: (&[FdKind], &str) = (&[FdKind::EventFd], "an eventfd");
/// What a call descriptor may be.
const CALL: (&[FdKind], &str) = (
    &[FdKind::EventFd, FdKind::Pipe, FdKind::UnixSocket],
    "an eventfd, a pipe or a Unix socket",
);

/// Checks the descriptor of a `SET_VRING_KICK`, `_CALL` or `_ERR` (`what`) against the
/// kinds `allowed` (and their description) and makes it non-blocking.
fn check_vring_fd(
    what: &str,
    (allowed, wanted): (&[FdKind], &str),
    payload: &[u8],
    fds: &[OwnedFd],
) -> Result<(), Refused> {
    let Some(word) = payload.get(..8) else {
        return Ok(());
    };
    let mut b = [0u8; 8];
    b.copy_from_slice(word);
    let value = u64::from_le_bytes(b);
    let index = value & VRING_INDEX_MASK;
    let [fd] = fds else {
        // No descriptor (NOFD, polling) or several, which `vhost` refuses.
        return Ok(());
    };
    if value & VRING_NOFD != 0 {
        return Ok(());
    }
    let kind = FdKind::of(fd.as_fd())
        .map_err(|e| Refused(format!("{what} of vring {index}: cannot stat it: {e}")))?;
    if !allowed.contains(&kind) {
        return Err(Refused(format!(
            "{what} descriptor of vring {index} is {kind:?}, not {wanted}"
        )));
    }
    set_nonblocking(fd.as_fd()).map_err(|e| {
        Refused(format!(
            "{what} descriptor of vring {index}: cannot make it non-blocking: {e}"
        ))
    })
}

/// Checks one frontend request (its code, payload and attached descriptors) before it is
/// forwarded to `vhost`. A refusal should end the connection.
pub fn check_request(request: u32, payload: &[u8], fds: &[OwnedFd]) -> Result<(), Refused> {
    let Ok(req) = FrontendReq::try_from(request) else {
        return Ok(());
    };
    match req {
        FrontendReq::SET_MEM_TABLE => check_mem_table(payload, fds),
        FrontendReq::SET_VRING_KICK => check_vring_fd("kick", EVENTFD, payload, fds),
        FrontendReq::SET_VRING_CALL => check_vring_fd("call", CALL, payload, fds),
        FrontendReq::SET_VRING_ERR => check_vring_fd("err", EVENTFD, payload, fds),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::os::fd::FromRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn memfd(len: u64) -> OwnedFd {
        // SAFETY: memfd_create takes a NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"admit-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is new and owned by nobody else.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).unwrap();
        f.into()
    }

    fn table(regions: &[(u64, u64, u64)]) -> Vec<u8> {
        let mut p = VhostUserMemory::new(regions.len() as u32)
            .as_slice()
            .to_vec();
        for &(gpa, size, offset) in regions {
            let r = VhostUserMemoryRegion::new(gpa, size, 0x7000_0000_0000, offset);
            p.extend_from_slice(r.as_slice());
        }
        p
    }

    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }

    fn vring_payload(index: u64) -> Vec<u8> {
        index.to_le_bytes().to_vec()
    }

    const SET_MEM_TABLE: u32 = 5;
    const KICK: u32 = 12;
    const CALL: u32 = 13;

    #[test]
    fn regions_inside_their_files_pass() {
        let fds = [memfd(2 << 20), memfd(1 << 20)];
        let p = table(&[(0, 1 << 20, 1 << 20), (4 << 20, 1 << 20, 0)]);
        check_request(SET_MEM_TABLE, &p, &fds).unwrap();
    }

    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let fds = [memfd(1 << 20)];
        let e = check_request(SET_MEM_TABLE, &table(&[(0, 1 << 20, 4096)]), &fds).unwrap_err();
        assert!(
            e.to_string().contains("runs past the end of its file"),
            "{e}"
        );
        let e = check_request(SET_MEM_TABLE, &table(&[(0, 32 << 20, 0)]), &fds).unwrap_err();
        assert!(e.to_string().contains("region 0"), "{e}");
        // offset + size overflows.
        let e = check_request(SET_MEM_TABLE, &table(&[(0, 4096, u64::MAX)]), &fds).unwrap_err();
        assert!(e.to_string().contains("past the end"), "{e}");
    }

    #[test]
    fn the_filesystem_of_a_file_comes_from_proc() {
        let fdinfo = "pos:\t0\nflags:\t02100002\nmnt_id:\t27\nino:\t12\n";
        assert_eq!(fdinfo_mnt_id(fdinfo), Some(27));
        assert_eq!(fdinfo_mnt_id("pos:\t0\n"), None);
        let mountinfo = "22 1 0:21 / / rw,relatime - ext4 /dev/sda1 rw\n\
                         27 22 0:45 / /mnt/fuse rw,nosuid shared:3 - fuse.sshfs host: rw\n\
                         30 22 0:46 / /tmp rw - tmpfs tmpfs rw\n";
        assert_eq!(mountinfo_fs_type(mountinfo, 27), Some("fuse.sshfs"));
        assert_eq!(mountinfo_fs_type(mountinfo, 22), Some("ext4"));
        assert_eq!(mountinfo_fs_type(mountinfo, 99), None);
        for fs in ["fuse", "fuseblk", "fuse.sshfs"] {
            assert!(served_by_a_process(fs), "{fs}");
        }
        for fs in ["tmpfs", "ext4", "hugetlbfs", "fusectl", "overlay"] {
            assert!(!served_by_a_process(fs), "{fs}");
        }
        // A real file in the temporary directory is on a listed mount.
        let path = std::env::temp_dir().join(format!("admit-fs-{}", std::process::id()));
        let f = File::create(&path).unwrap();
        let fs = mount_fs_type(f.as_fd()).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(fs.is_some_and(|t| !t.is_empty()));
    }

    #[test]
    fn tables_vhost_refuses_anyway_pass_unchecked() {
        let fds = [memfd(4096)];
        // Two regions but one descriptor, and a payload cut short.
        let p = table(&[(0, 1 << 30, 0), (1 << 30, 1 << 30, 0)]);
        check_request(SET_MEM_TABLE, &p, &fds).unwrap();
        check_request(SET_MEM_TABLE, &p[..20], &fds).unwrap();
        check_request(SET_MEM_TABLE, &[], &fds).unwrap();
    }

    #[test]
    fn kick_must_be_an_eventfd() {
        let evt: OwnedFd = EventFd::new(0).unwrap().try_clone().unwrap().into_owned();
        check_request(KICK, &vring_payload(1), std::slice::from_ref(&evt)).unwrap();
        // SAFETY: F_GETFL touches no memory.
        let flags = unsafe { libc::fcntl(evt.as_raw_fd(), libc::F_GETFL) };
        assert!(flags & libc::O_NONBLOCK != 0, "kick made non-blocking");

        let (r, _w) = pipe();
        let e = check_request(KICK, &vring_payload(1), &[r]).unwrap_err();
        assert!(
            e.to_string().contains("kick descriptor of vring 1 is Pipe"),
            "{e}"
        );
        let e = check_request(KICK, &vring_payload(0), &[memfd(8)]).unwrap_err();
        assert!(e.to_string().contains("File"), "{e}");
        // NOFD with no descriptor: polling, allowed.
        check_request(KICK, &vring_payload(0x100), &[]).unwrap();
    }

    #[test]
    fn call_may_be_an_eventfd_a_pipe_or_a_unix_socket() {
        let (_r, w) = pipe();
        check_request(CALL, &vring_payload(0), &[w]).unwrap();
        let evt: OwnedFd = EventFd::new(0).unwrap().try_clone().unwrap().into_owned();
        check_request(CALL, &vring_payload(0), &[evt]).unwrap();
        // What User-Mode Linux gives.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        check_request(CALL, &vring_payload(1), &[a.into()]).unwrap();
        let e = check_request(CALL, &vring_payload(2), &[memfd(8)]).unwrap_err();
        assert!(
            e.to_string()
                .contains("not an eventfd, a pipe or a Unix socket"),
            "{e}"
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let e = check_request(CALL, &vring_payload(2), &[udp.into()]).unwrap_err();
        assert!(e.to_string().contains("Other"), "{e}");
        let null = File::open("/dev/null").unwrap();
        let e = check_request(CALL, &vring_payload(2), &[null.into()]).unwrap_err();
        assert!(e.to_string().contains("Other"), "{e}");
    }

    #[test]
    fn the_kind_of_a_descriptor() {
        let (r, w) = pipe();
        assert_eq!(FdKind::of(r.as_fd()).unwrap(), FdKind::Pipe);
        assert_eq!(FdKind::of(w.as_fd()).unwrap(), FdKind::Pipe);
        assert_eq!(FdKind::of(memfd(1).as_fd()).unwrap(), FdKind::File);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(FdKind::of(a.as_fd()).unwrap(), FdKind::UnixSocket);
        let evt = EventFd::new(0).unwrap();
        // SAFETY: `evt` is open for the borrow's lifetime.
        let b = unsafe { BorrowedFd::borrow_raw(evt.as_raw_fd()) };
        assert_eq!(FdKind::of(b).unwrap(), FdKind::EventFd);
    }

    trait IntoOwned {
        fn into_owned(self) -> OwnedFd;
    }

    impl IntoOwned for EventFd {
        fn into_owned(self) -> OwnedFd {
            use std::os::fd::IntoRawFd;
            // SAFETY: into_raw_fd gives up the EventFd's ownership of the descriptor.
            unsafe { OwnedFd::from_raw_fd(self.into_raw_fd()) }
        }
    }
}
