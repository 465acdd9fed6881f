//! `hearthd`: the per-host daemon. It will serve the Lambda MicroVMs API, the ingress proxy,
//! the image builder, and supervise one `hearth-vmm` per microVM, with its state in SQLite.
#![forbid(unsafe_code)]

fn main() {
    println!(
        "hearthd {} (API {})",
        env!("CARGO_PKG_VERSION"),
        api_types::API_VERSION
    );
}
