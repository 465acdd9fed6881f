//! KVM state: the guest memory (`memory`), the VM with its in-kernel irqchip and PIT (`vm`),
//! and the vCPUs with their run loop and pause/stop control (`vcpu`).

pub mod memory;
pub mod vcpu;
pub mod vm;
