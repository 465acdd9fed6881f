//! The microVM configuration: a versioned JSON document, given to `hearth-vmm` as a file or
//! over the control socket. Parsing rejects unknown fields; validation checks every value and
//! names the field at fault.
//!
//! ```json
//! {
//!   "version": 1,
//!   "machine": { "vcpus": 2, "memory_mib": 256 },
//!   "boot": { "kernel": "/path/vmlinux", "cmdline": "console=ttyS0 reboot=k", "initrd": null },
//!   "drives": [
//!     { "id": "root", "path": "/path/rootfs.ext4", "read_only": true, "root": true },
//!     { "id": "data", "path": "/path/data-base.ext4", "overlay": "/run/vm/data.overlay" }
//!   ],
//!   "vsock": { "guest_cid": 3, "uds_path": "/run/vm/vsock.sock" },
//!   "rng": true,
//!   "serial": { "output": "stdout" }
//! }
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::vstate::memory::{MAX_MEM_MIB, MIN_MEM_MIB};

/// The config version this VMM reads.
pub const CONFIG_VERSION: u32 = 1;
/// The most vCPUs a microVM may have.
pub const MAX_VCPUS: u8 = 16;
/// The most drives a microVM may have (each virtio device takes one of IRQs 5-23).
pub const MAX_DRIVES: usize = 8;

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// The JSON path of the field at fault, e.g. `machine.memory_mib`.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    pub version: u32,
    pub machine: MachineConfig,
    pub boot: BootConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    #[serde(default)]
    pub rng: bool,
    #[serde(default)]
    pub serial: SerialConfig,
}

/// vCPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// Have KVM log the pages the guest writes, so that diff snapshots can be taken. A
    /// restored VM always logs them.
    #[serde(default)]
    pub track_dirty_pages: bool,
}

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// An ELF vmlinux with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub cmdline: String,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
}

/// A virtio-blk disk backed by a raw image, or by a read-only base image with a copy-on-write
/// overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub id: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// Mount it as the root filesystem (`root=/dev/vdX` is added to the command line).
    #[serde(default)]
    pub root: bool,
    /// The data file of a copy-on-write overlay (with its map, `<overlay>.map`; both created
    /// if missing): `path` is then a read-only base that is never written, and the guest's
    /// writes go to the overlay. Format and guarantees in `docs/VMM.md`.
    #[serde(default)]
    pub overlay: Option<PathBuf>,
}

/// The virtio-vsock device and its host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// Where the serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    pub output: SerialOutput,
    /// The file, for `output: "file"`.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// Serial console destinations.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (`serial.path`), created or truncated.
    File,
    /// No serial port at all.
    #[default]
    Off,
}

impl VmConfig {
    /// Parses and validates a JSON document.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ConfigError::new("(document)", format!("not valid JSON: {e}")))?;
        match value.get("version").and_then(serde_json::Value::as_u64) {
            Some(v) if v == u64::from(CONFIG_VERSION) => {}
            Some(v) => {
                return Err(ConfigError::new(
                    "version",
                    format!(
                        "version {v} is not supported (this VMM reads version {CONFIG_VERSION})"
                    ),
                ))
            }
            None => return Err(ConfigError::new("version", "missing or not a number")),
        }
        let config: Self = serde_json::from_value(value)
            .map_err(|e| ConfigError::new("(document)", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.machine;
        if !(1..=MAX_VCPUS).contains(&m.vcpus) {
            return Err(ConfigError::new(
                "machine.vcpus",
                format!("{} is outside 1..={MAX_VCPUS}", m.vcpus),
            ));
        }
        if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&m.memory_mib) {
            return Err(ConfigError::new(
                "machine.memory_mib",
                format!(
                    "{} MiB is outside {MIN_MEM_MIB}..={MAX_MEM_MIB} MiB",
                    m.memory_mib
                ),
            ));
        }
        if self.boot.kernel.as_os_str().is_empty() {
            return Err(ConfigError::new("boot.kernel", "must name a kernel image"));
        }
        if self.drives.len() > MAX_DRIVES {
            return Err(ConfigError::new(
                "drives",
                format!("{} drives given, at most {MAX_DRIVES}", self.drives.len()),
            ));
        }
        for (i, d) in self.drives.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > 20 {
                return Err(ConfigError::new(
                    format!("drives[{i}].id"),
                    "must be 1 to 20 bytes (the virtio-blk serial)",
                ));
            }
            if d.overlay.is_some() && d.read_only {
                return Err(ConfigError::new(
                    format!("drives[{i}].overlay"),
                    "a read-only drive cannot have a copy-on-write overlay",
                ));
            }
            if self.drives[..i].iter().any(|o| o.id == d.id) {
                return Err(ConfigError::new(
                    format!("drives[{i}].id"),
                    format!("{:?} is used twice", d.id),
                ));
            }
        }
        if self.drives.iter().filter(|d| d.root).count() > 1 {
            return Err(ConfigError::new("drives", "at most one drive may be root"));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 {
                return Err(ConfigError::new(
                    "vsock.guest_cid",
                    format!("{} is reserved; guest CIDs start at 3", v.guest_cid),
                ));
            }
            if v.uds_path.as_os_str().is_empty() {
                return Err(ConfigError::new(
                    "vsock.uds_path",
                    "must name a socket path",
                ));
            }
        }
        if self.serial.output == SerialOutput::File && self.serial.path.is_none() {
            return Err(ConfigError::new(
                "serial.path",
                "required when serial.output is \"file\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "version": 1,
            "machine": {"vcpus": 2, "memory_mib": 256},
            "boot": {"kernel": "/k", "cmdline": "console=ttyS0"},
            "drives": [{"id": "root", "path": "/r", "root": true}],
            "vsock": {"guest_cid": 3, "uds_path": "/v.sock"},
            "rng": true,
            "serial": {"output": "stdout"}
        })
    }

    fn parse(v: &serde_json::Value) -> Result<VmConfig, ConfigError> {
        VmConfig::from_json(&v.to_string())
    }

    #[test]
    fn test_config_full_document_parses() {
        let config = parse(&base()).expect("valid");

        assert_eq!(config.machine.vcpus, 2);
        assert_eq!(config.serial.output, SerialOutput::Stdout);
        assert!(config.drives[0].root);
    }

    #[test]
    fn test_config_memory_below_minimum_names_field() {
        let mut v = base();
        v["machine"]["memory_mib"] = 64.into();

        let err = parse(&v).expect_err("too small");

        assert_eq!(err.field, "machine.memory_mib");
        assert!(err.message.contains("64 MiB"));
    }

    #[test]
    fn test_config_memory_above_maximum_rejected() {
        let mut v = base();
        v["machine"]["memory_mib"] = (32 * 1024 + 1).into();

        assert_eq!(parse(&v).expect_err("too big").field, "machine.memory_mib");
    }

    #[test]
    fn test_config_vcpus_out_of_range_rejected() {
        let mut v = base();
        v["machine"]["vcpus"] = 17.into();

        assert_eq!(parse(&v).expect_err("too many").field, "machine.vcpus");
    }

    #[test]
    fn test_config_unknown_version_rejected() {
        let mut v = base();
        v["version"] = 2.into();

        let err = parse(&v).expect_err("version");

        assert_eq!(err.field, "version");
        assert!(err.message.contains("not supported"));
    }

    #[test]
    fn test_config_unknown_field_rejected() {
        let mut v = base();
        v["machine"]["turbo"] = true.into();

        let err = parse(&v).expect_err("unknown field");

        assert!(err.message.contains("turbo"));
    }

    #[test]
    fn test_config_reserved_cid_rejected() {
        let mut v = base();
        v["vsock"]["guest_cid"] = 2.into();

        assert_eq!(parse(&v).expect_err("cid").field, "vsock.guest_cid");
    }

    #[test]
    fn test_config_duplicate_drive_id_rejected() {
        let mut v = base();
        v["drives"] = serde_json::json!([{"id": "a", "path": "/a"}, {"id": "a", "path": "/b"}]);

        assert_eq!(parse(&v).expect_err("dup").field, "drives[1].id");
    }

    #[test]
    fn test_config_drive_overlay_parses() {
        let mut v = base();
        v["drives"][0]["overlay"] = "/r.overlay".into();

        let config = parse(&v).expect("valid");

        assert_eq!(config.drives[0].overlay, Some(PathBuf::from("/r.overlay")));
    }

    #[test]
    fn test_config_overlay_on_read_only_drive_rejected() {
        let mut v = base();
        v["drives"][0]["read_only"] = true.into();
        v["drives"][0]["overlay"] = "/r.overlay".into();

        assert_eq!(parse(&v).expect_err("read-only").field, "drives[0].overlay");
    }

    #[test]
    fn test_config_not_json_rejected() {
        assert!(VmConfig::from_json("{").is_err());
    }
}
