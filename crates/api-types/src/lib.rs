//! Request, response and error types of the Lambda MicroVMs API (service `lambda-microvms`,
//! version 2025-09-09), shared by `hearthd` and the `hearth` command line. The botocore
//! service model is the contract these types follow.
#![forbid(unsafe_code)]

/// The API version Hearth is wire-compatible with.
pub const API_VERSION: &str = "2025-09-09";
