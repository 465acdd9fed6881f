//! What kind of KVM this host offers. Hearth boots Linux guests only on hardware-style KVM
//! (`kvm_intel` or `kvm_amd`); PVM's `kvm_pvm` instruction-emulates ordinary guests thousands
//! of times slower, so tests and tools ask here before they try.

use std::path::Path;

/// The flavour of `/dev/kvm` on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmKind {
    /// KVM backed by VT-x (`kvm_intel`).
    Intel,
    /// KVM backed by AMD-V (`kvm_amd`).
    Amd,
    /// PVM's pagetable-based KVM (`kvm_pvm`): it cannot boot an ordinary Linux guest.
    Pvm,
    /// No usable KVM module is loaded.
    None,
}

impl KvmKind {
    /// Reads the loaded modules under `/sys/module`.
    pub fn detect() -> Self {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// Reads the loaded modules under `sys_module`, a directory laid out like `/sys/module`.
    pub fn detect_in(sys_module: &Path) -> Self {
        let loaded = |name: &str| sys_module.join(name).exists();
        if loaded("kvm_intel") {
            Self::Intel
        } else if loaded("kvm_amd") {
            Self::Amd
        } else if loaded("kvm_pvm") {
            Self::Pvm
        } else {
            Self::None
        }
    }

    /// Whether this KVM boots unmodified guests at hardware speed.
    pub fn is_hardware(self) -> bool {
        matches!(self, Self::Intel | Self::Amd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys_module(modules: &[&str]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for m in modules {
            std::fs::create_dir(dir.path().join(m)).expect("create module dir");
        }
        dir
    }

    mod tempdir {
        use std::path::{Path, PathBuf};

        /// A directory removed when dropped.
        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = std::env::temp_dir()
                    .join(format!("hearth-kvm-host-test-{}-{n}", std::process::id()));
                std::fs::create_dir_all(&path).expect("create temp dir");
                Self(path)
            }

            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn test_detect_amd_is_hardware() {
        let dir = fake_sys_module(&["kvm", "kvm_amd"]);

        let kind = KvmKind::detect_in(dir.path());

        assert_eq!(kind, KvmKind::Amd);
        assert!(kind.is_hardware());
    }

    #[test]
    fn test_detect_pvm_is_not_hardware() {
        let dir = fake_sys_module(&["kvm", "kvm_pvm"]);

        let kind = KvmKind::detect_in(dir.path());

        assert_eq!(kind, KvmKind::Pvm);
        assert!(!kind.is_hardware());
    }

    #[test]
    fn test_detect_nothing_loaded_is_none() {
        let dir = fake_sys_module(&[]);

        assert_eq!(KvmKind::detect_in(dir.path()), KvmKind::None);
    }
}
