//! `hearth-agent`: the guest's PID 1. It will mount the guest's filesystems, start and
//! supervise the application, and serve exec, files and port forwarding over vsock. It is
//! built as a static binary (`-C target-feature=+crt-static`).

fn main() {
    println!("hearth-agent {}", env!("CARGO_PKG_VERSION"));
}
