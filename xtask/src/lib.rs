//! The developer and CI tasks of the Hearth workspace, behind `cargo xtask`. Each task lives
//! in the module named for it; shared plumbing (paths, caching, running commands) is in
//! `util`. It is a library too so that the KVM suites in `xtask/tests/` reuse the same code.
#![forbid(unsafe_code)]

pub mod bench;
pub mod demo;
pub mod deps;
pub mod initramfs;
pub mod kernel;
pub mod qemu;
pub mod rootfs;
pub mod test;
pub mod testbed;
pub mod util;
