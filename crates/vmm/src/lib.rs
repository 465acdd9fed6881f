//! The Hearth microVM monitor: everything that turns a configuration into a running KVM
//! microVM. It owns the KVM VM and vCPUs (`vstate`), x86_64 boot details (`arch`), the
//! emulated devices, and the versioned snapshot format. The `hearth-vmm` binary in
//! `crates/vmm-bin` wraps it with a control socket and a jailer.

pub mod arch;
pub mod builder;
pub mod config;
pub mod device_manager;
pub mod devices;
pub mod fsutil;
pub mod kvm_host;
pub mod persist;
pub mod rpc;
pub mod snapshot;
pub mod thread;
pub mod vstate;
