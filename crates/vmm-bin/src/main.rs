//! `hearth-vmm`: one process per microVM. It will own the control socket, the jailer and the
//! seccomp filters around the `vmm` library. For now it reports what KVM this host offers.

fn main() {
    let kind = vmm::kvm_host::KvmKind::detect();
    println!("hearth-vmm: host KVM is {kind:?} (hardware-backed: {})", kind.is_hardware());
}
