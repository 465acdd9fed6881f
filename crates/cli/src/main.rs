//! `hearth`: the command line. It talks to `hearthd` through the Lambda MicroVMs API only.
#![forbid(unsafe_code)]

fn main() {
    println!(
        "hearth {} (API {})",
        env!("CARGO_PKG_VERSION"),
        api_types::API_VERSION
    );
}
