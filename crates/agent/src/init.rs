//! The boot sequence of PID 1: devtmpfs and the boot-timer mark, proc and sysfs, the switch
//! from the initramfs to the root disk named by `root=`, the standard mounts of the final root
//! (devpts, /dev/shm, /tmp, /run, cgroup2), the loopback interface and the hostname. Every
//! step logs its failure and the boot goes on: one missing mount must not cost the host its
//! agent.

use std::io;
use std::path::Path;

use crate::sys;

/// The VMM's boot-timer device: a write of [`BOOT_TIMER_MARK`] at this physical address marks
/// "the guest's userspace is running".
const BOOT_TIMER_ADDR: u64 = 0xd000_0000;
const BOOT_TIMER_MARK: u8 = 123;

/// Why a boot step failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot mount {what} on {target}")]
    Mount {
        what: String,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {0}")]
    Mkdir(String, #[source] io::Error),
    #[error("cannot switch to the root filesystem: {step}")]
    SwitchRoot {
        step: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What the agent reads from the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cmdline {
    /// `root=`: the root disk, when the VM has one.
    pub root: Option<String>,
    /// `rootfstype=`.
    pub rootfstype: Option<String>,
    /// `ro` is given and `rw` is not.
    pub read_only: bool,
    /// `hearth.hostname=`.
    pub hostname: Option<String>,
    /// `hearth.debug`: verbose agent logging.
    pub debug: bool,
}

impl Cmdline {
    /// Parses `/proc/cmdline` text.
    pub fn parse(text: &str) -> Self {
        let mut out = Self::default();
        let (mut ro, mut rw) = (false, false);
        for word in text.split_ascii_whitespace() {
            match word.split_once('=') {
                Some(("root", v)) if !v.is_empty() => out.root = Some(v.to_string()),
                Some(("rootfstype", v)) if !v.is_empty() => out.rootfstype = Some(v.to_string()),
                Some(("hearth.hostname", v)) if !v.is_empty() => out.hostname = Some(v.to_string()),
                None if word == "ro" => ro = true,
                None if word == "rw" => rw = true,
                None if word == "hearth.debug" => out.debug = true,
                _ => {}
            }
        }
        out.read_only = ro && !rw;
        out
    }

    /// Reads and parses `/proc/cmdline` (empty if unreadable).
    pub fn read() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default())
    }
}

/// The filesystem type mounted on `/`, from `/proc/mounts` text (the last entry wins).
pub fn root_fstype(mounts: &str) -> Option<String> {
    mounts.lines().rev().find_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (_dev, target, fstype) = (f.next()?, f.next()?, f.next()?);
        (target == "/").then(|| fstype.to_string())
    })
}

/// Mounts `fstype` on `target` unless something is mounted there already, creating the
/// directory first if it is missing (which fails on a read-only root).
fn mount_fs(fstype: &str, target: &str, flags: libc::c_ulong, data: Option<&str>) {
    let path = Path::new(target);
    if !path.is_dir() {
        if let Err(e) = std::fs::create_dir_all(path) {
            let e = InitError::Mkdir(target.to_string(), e);
            log::warn!("{e}: {}; {fstype} not mounted", source_of(&e));
            return;
        }
    }
    if sys::is_mountpoint(path) {
        log::debug!("{target} is already mounted");
        return;
    }
    if let Err(source) = sys::mount(fstype, path, Some(fstype), flags, data) {
        let e = InitError::Mount {
            what: fstype.to_string(),
            target: target.to_string(),
            source,
        };
        log::warn!("{e}: {}", source_of(&e));
    }
}

fn source_of(e: &dyn std::error::Error) -> String {
    e.source().map(|s| s.to_string()).unwrap_or_default()
}

/// Makes sure fds 0-2 are open (the kernel leaves them closed when the initramfs has no
/// /dev/console), so no later file lands on them by accident.
fn ensure_stdio() {
    if (0..3).all(sys::fd_is_open) {
        return;
    }
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .or_else(|_| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
        });
    if let Ok(file) = console {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            if !sys::fd_is_open(fd) {
                let _ = sys::dup2(file.as_raw_fd(), fd);
            }
        }
    }
}

/// Mounts the root disk on /newroot and makes it `/`, carrying /dev, /proc and /sys along.
fn switch_root(cmdline: &Cmdline, device: &str) -> Result<(), InitError> {
    let step = |step: &'static str| move |source| InitError::SwitchRoot { step, source };
    let fstype = cmdline.rootfstype.as_deref().unwrap_or("ext4");
    let flags = if cmdline.read_only {
        libc::MS_RDONLY
    } else {
        0
    };
    std::fs::create_dir_all("/newroot").map_err(step("mkdir /newroot"))?;
    sys::mount(device, Path::new("/newroot"), Some(fstype), flags, None).map_err(|source| {
        InitError::Mount {
            what: format!("{device} ({fstype})"),
            target: "/newroot".into(),
            source,
        }
    })?;
    for dir in ["/dev", "/proc", "/sys"] {
        let target = format!("/newroot{dir}");
        if !Path::new(&target).is_dir() {
            if let Err(e) = std::fs::create_dir_all(&target) {
                log::warn!("cannot create {target}: {e}; {dir} is not carried over");
                continue;
            }
        }
        if let Err(e) = sys::mount(dir, Path::new(&target), None, libc::MS_MOVE, None) {
            log::warn!("cannot move {dir} to {target}: {e}");
        }
    }
    let moved = std::env::set_current_dir("/newroot")
        .map_err(step("chdir /newroot"))
        .and_then(|()| {
            sys::mount(".", Path::new("/"), None, libc::MS_MOVE, None).map_err(step("move to /"))
        });
    if let Err(e) = moved {
        // Stay in the initramfs with /dev, /proc and /sys where they were.
        let _ = std::env::set_current_dir("/");
        for dir in ["/dev", "/proc", "/sys"] {
            let from = format!("/newroot{dir}");
            let _ = sys::mount(&from, Path::new(dir), None, libc::MS_MOVE, None);
        }
        return Err(e);
    }
    sys::chroot(Path::new(".")).map_err(step("chroot"))?;
    std::env::set_current_dir("/").map_err(step("chdir /"))?;
    Ok(())
}

/// Mounts devpts and makes sure /dev/ptmx reaches it.
fn mount_devpts() {
    mount_fs(
        "devpts",
        "/dev/pts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    );
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/ptmx")
        .is_ok();
    if !usable {
        let _ = std::fs::remove_file("/dev/ptmx");
        if let Err(e) = std::os::unix::fs::symlink("pts/ptmx", "/dev/ptmx") {
            log::warn!("cannot link /dev/ptmx to pts/ptmx: {e}");
        }
    }
}

/// Runs the boot sequence; returns the command line it read.
pub fn boot() -> Cmdline {
    mount_fs("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755"));
    ensure_stdio();
    if let Err(e) = sys::poke_physical_byte(BOOT_TIMER_ADDR, BOOT_TIMER_MARK) {
        log::debug!("no boot timer: {e}");
    }
    let nodev = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount_fs("proc", "/proc", nodev, None);
    mount_fs("sysfs", "/sys", nodev, None);
    let cmdline = Cmdline::read();
    if cmdline.debug {
        log::set_max_level(log::LevelFilter::Debug);
    }

    if let Some(device) = &cmdline.root {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let fstype = root_fstype(&mounts);
        if matches!(fstype.as_deref(), Some("rootfs" | "tmpfs" | "ramfs")) {
            match switch_root(&cmdline, device) {
                Ok(()) => log::info!("switched root to {device}"),
                Err(e) => log::error!("{e}: {}; staying in the initramfs", source_of(&e)),
            }
        } else {
            log::debug!("root is {fstype:?}, not an initramfs: not switching root");
        }
    }

    mount_devpts();
    mount_fs(
        "tmpfs",
        "/dev/shm",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/tmp",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        libc::MS_NOSUID | libc::MS_NODEV,
        Some("mode=0755"),
    );
    mount_fs("cgroup2", "/sys/fs/cgroup", nodev, None);

    if let Err(e) = sys::interface_up("lo") {
        log::warn!("cannot bring lo up: {e}");
    }
    if let Some(name) = &cmdline.hostname {
        if let Err(e) = sys::sethostname(name) {
            log::warn!("cannot set the hostname to {name:?}: {e}");
        }
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cmdline_parse_root_ro_and_hostname() {
        let text = "console=ttyS0 reboot=k root=/dev/vda ro hearth.hostname=web-1\n";

        let cmdline = Cmdline::parse(text);

        assert_eq!(
            cmdline,
            Cmdline {
                root: Some("/dev/vda".into()),
                rootfstype: None,
                read_only: true,
                hostname: Some("web-1".into()),
                debug: false,
            }
        );
    }

    #[test]
    fn test_cmdline_parse_rw_wins_over_ro() {
        let cmdline = Cmdline::parse("root=/dev/vda ro rw");

        assert!(!cmdline.read_only);
    }

    #[test]
    fn test_cmdline_parse_rootfstype_is_read() {
        let cmdline = Cmdline::parse("root=/dev/vdb rootfstype=xfs");

        assert_eq!(cmdline.rootfstype.as_deref(), Some("xfs"));
    }

    #[test]
    fn test_cmdline_parse_no_root_is_none() {
        let cmdline = Cmdline::parse("console=ttyS0 quiet");

        assert_eq!(cmdline, Cmdline::default());
    }

    #[test]
    fn test_root_fstype_initramfs_is_rootfs() {
        let mounts = "rootfs / rootfs rw 0 0\nproc /proc proc rw 0 0\n";

        assert_eq!(root_fstype(mounts).as_deref(), Some("rootfs"));
    }

    #[test]
    fn test_root_fstype_last_mount_wins() {
        let mounts = "none / rootfs rw 0 0\n/dev/vda / ext4 ro 0 0\n";

        assert_eq!(root_fstype(mounts).as_deref(), Some("ext4"));
    }
}
