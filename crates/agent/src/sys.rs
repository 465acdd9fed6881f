//! Thin safe wrappers over the libc calls the agent needs: mounts, chroot, hostname, signals,
//! waitpid, PTYs, the loopback interface, the clock, the kernel RNG, reboot. Every `unsafe`
//! block of the agent outside the child's pre-exec hook lives here, each with its invariants.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use agent_proto::ExitStatus;

/// `_IOW('R', 0x03, int[2])`: add entropy to the pool and credit it.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Turns a `-1` return into the thread's `errno`.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cstring(s: &OsStr) -> io::Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cpath(p: &Path) -> io::Result<CString> {
    cstring(p.as_os_str())
}

/// `mount(2)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = cstring(OsStr::new(source))?;
    let target = cpath(target)?;
    let fstype = fstype.map(|f| cstring(OsStr::new(f))).transpose()?;
    let data = data.map(|d| cstring(OsStr::new(d))).transpose()?;
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call;
    // the kernel copies them and keeps no reference.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>()),
        )
    };
    check(ret).map(drop)
}

/// `chroot(2)`.
pub fn chroot(path: &Path) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: `path` is a NUL-terminated string valid for the call.
    check(unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

/// `sethostname(2)`.
pub fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, valid for the call.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// The current hostname (empty if it cannot be read).
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is writable for its whole length; we pass one byte less so the
    // result is always NUL-terminated.
    let ret = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len() - 1) };
    if ret != 0 {
        return String::new();
    }
    CStr::from_bytes_until_nul(&buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `kill(2)`.
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory-safety preconditions.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Signals the whole process group `pgid`.
pub fn killpg(pgid: i32, signal: i32) -> io::Result<()> {
    kill(-pgid, signal)
}

/// This process's pid.
pub fn getpid() -> i32 {
    // SAFETY: getpid cannot fail and touches no memory.
    unsafe { libc::getpid() }
}

/// Sets a signal's disposition to ignore.
pub fn ignore_signal(signal: i32) {
    // SAFETY: SIG_IGN is a valid disposition; no handler code runs.
    unsafe {
        libc::signal(signal, libc::SIG_IGN);
    }
}

/// Translates a `waitpid` status word.
pub fn exit_status(status: libc::c_int) -> ExitStatus {
    if libc::WIFEXITED(status) {
        ExitStatus {
            code: Some(libc::WEXITSTATUS(status)),
            signal: None,
        }
    } else if libc::WIFSIGNALED(status) {
        ExitStatus {
            code: None,
            signal: Some(libc::WTERMSIG(status)),
        }
    } else {
        ExitStatus {
            code: None,
            signal: None,
        }
    }
}

/// Reaps one exited child of any pid without blocking: `None` when none is waiting (or the
/// process has no children at all).
pub fn reap_any() -> Option<(i32, ExitStatus)> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable int for the call.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        match pid {
            0 => return None,
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) => continue,
            -1 => return None,
            pid => return Some((pid, exit_status(status))),
        }
    }
}

/// Puts `fd` in non-blocking mode.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL take and return plain ints; an invalid fd yields EBADF.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Whether `fd` is an open descriptor.
pub fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD has no memory-safety preconditions.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// `dup2(2)`.
pub fn dup2(from: RawFd, to: RawFd) -> io::Result<()> {
    // SAFETY: dup2 has no memory-safety preconditions; `to` is a descriptor number we own.
    check(unsafe { libc::dup2(from, to) }).map(drop)
}

/// `read(2)` into `buf`.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is writable for `buf.len()` bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `write(2)` from `buf`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is readable for `buf.len()` bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A pseudo-terminal pair.
#[derive(Debug)]
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

/// Opens a PTY of `rows` x `cols`. Both ends are close-on-exec from the start, so a process
/// spawned concurrently by another session cannot inherit them (`openpty(3)` would leave a
/// window where they are inheritable); the child gets the slave through `dup2`.
pub fn open_pty(rows: u16, cols: u16) -> io::Result<Pty> {
    // SAFETY: the path is a NUL-terminated literal; open returns a new descriptor or -1.
    let master = check(unsafe {
        libc::open(
            c"/dev/ptmx".as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `master` was just returned by open and is owned by nobody else.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int from the pointer, which is valid for the call.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags by value and returns a new descriptor or -1.
    let slave = check(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `slave` was just returned by the kernel and is owned by nobody else.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    set_winsize(master.as_raw_fd(), rows, cols)?;
    Ok(Pty { master, slave })
}

/// Sets a terminal's size (TIOCSWINSZ); the kernel sends SIGWINCH to its foreground group.
pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, valid for the call.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &size) }).map(drop)
}

/// Brings a network interface up (SIOCGIFFLAGS, then SIOCSIFFLAGS with IFF_UP).
pub fn interface_up(name: &str) -> io::Result<()> {
    // SAFETY: socket takes plain ints and returns a new descriptor or -1.
    let sock =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `sock` was just returned by socket and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`, valid for
    // the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just filled `ifru_flags`, the union member SIOCGIFFLAGS writes.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
    }
    // SAFETY: SIOCSIFFLAGS reads `req`, valid for the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) }).map(drop)
}

/// Writes `value` at byte 0 of the physical page `phys` through `/dev/mem`: the VMM's
/// boot-timer device.
pub fn poke_physical_byte(phys: u64, value: u8) -> io::Result<()> {
    // SAFETY: the path is a NUL-terminated literal; open returns a new descriptor or -1.
    let fd = check(unsafe {
        libc::open(
            c"/dev/mem".as_ptr(),
            libc::O_RDWR | libc::O_SYNC | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let page = 4096;
    // SAFETY: we ask for a fresh shared mapping (address chosen by the kernel) of one page of
    // the device; nothing else in the process refers to it.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            phys as libc::off_t,
        )
    };
    if addr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `addr` is a live, writable mapping of at least one byte; the write is volatile
    // because it is a device register.
    unsafe { std::ptr::write_volatile(addr.cast::<u8>(), value) };
    // SAFETY: `addr`/`page` are exactly the mapping created above, unmapped once.
    unsafe { libc::munmap(addr, page) };
    Ok(())
}

/// Sets CLOCK_REALTIME to `ns` nanoseconds since the epoch.
pub fn set_realtime_ns(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec for the call.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// Mixes `entropy` into the kernel's input pool, credits it, and reseeds the CRNG from it.
pub fn add_entropy_and_reseed(fd: RawFd, entropy: &[u8]) -> io::Result<()> {
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }, built in u32
    // words so the header and the buffer are aligned.
    let words = 2 + entropy.len().div_ceil(4);
    let mut info = vec![0u32; words];
    let bits =
        i32::try_from(entropy.len() * 8).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    info[0] = bits as u32;
    info[1] = entropy.len() as u32;
    for (i, chunk) in entropy.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        info[2 + i] = u32::from_ne_bytes(word);
    }
    // SAFETY: `info` holds the header and `buf_size` bytes of buffer, as the kernel reads.
    check(unsafe { libc::ioctl(fd, RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(fd, RNDRESEEDCRNG) }).map(drop)
}

/// `sync(2)`.
pub fn sync() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Restarts the machine (`reboot(LINUX_REBOOT_CMD_RESTART)`); returns only on failure.
pub fn reboot_restart() -> io::Error {
    // SAFETY: reboot has no memory-safety preconditions.
    unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_RESTART) };
    io::Error::last_os_error()
}

/// Random bytes from the kernel (used for temp-file names).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: the buffer is writable for 8 bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), libc::GRND_NONBLOCK) };
    if n == 8 {
        u64::from_ne_bytes(buf)
    } else {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        t ^ u64::from(std::process::id()).rotate_left(32)
    }
}

/// The identity a child switches to before exec.
#[derive(Debug, Clone)]
pub struct ChildIdentity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
}

/// Runs in the forked child just before exec: only async-signal-safe calls, no allocation.
/// Starts a new session, takes the PTY on stdin as the controlling terminal, restores
/// default signal dispositions and an empty mask, and switches user.
pub fn child_setup(pty: bool, identity: Option<&ChildIdentity>) -> io::Result<()> {
    // SAFETY: all calls below are async-signal-safe and touch only memory owned by the
    // child's copy of this address space (the sigset on the stack, the groups slice).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        check(libc::setsid())?;
        if pty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
        }
        if let Some(id) = identity {
            check(libc::setgroups(id.groups.len(), id.groups.as_ptr()))?;
            check(libc::setgid(id.gid))?;
            check(libc::setuid(id.uid))?;
        }
    }
    Ok(())
}

/// Whether `path` has a different filesystem mounted on it than its parent.
pub fn is_mountpoint(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(me) = std::fs::metadata(path) else {
        return false;
    };
    let Ok(parent) = std::fs::metadata(path.join("..")) else {
        return false;
    };
    me.dev() != parent.dev() || me.ino() == parent.ino()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_status_exited_reports_code() {
        let status = 3 << 8;

        let result = exit_status(status);

        assert_eq!(
            result,
            ExitStatus {
                code: Some(3),
                signal: None
            }
        );
    }

    #[test]
    fn test_exit_status_signaled_reports_signal() {
        let status = 15;

        let result = exit_status(status);

        assert_eq!(
            result,
            ExitStatus {
                code: None,
                signal: Some(15)
            }
        );
    }

    #[test]
    fn test_open_pty_fresh_pair_has_requested_size() {
        let pty = open_pty(33, 99).unwrap();
        let mut size: libc::winsize = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };

        // SAFETY: TIOCGWINSZ writes one winsize into `size`, valid for the call.
        let ret = unsafe { libc::ioctl(pty.slave.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };

        assert_eq!((ret, size.ws_row, size.ws_col), (0, 33, 99));
    }
}
