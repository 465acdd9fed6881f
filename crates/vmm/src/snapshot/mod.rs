//! The snapshot state file: a versioned, checksummed container around a postcard payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "HEARTHSN"
//!      8     4  format version, little-endian (FORMAT_VERSION)
//!     12     4  flags, zero
//!     16     8  payload length N, little-endian, at most MAX_PAYLOAD
//!     24     N  payload: the microVM state in postcard (`persist::MicrovmState`)
//!   24+N     8  CRC-64/XZ of bytes 0..24+N, little-endian
//! ```
//!
//! Version 2 ended with the 32-byte SHA-256 of the same bytes instead, and is still read. The
//! checksum catches corruption, not tampering (a SHA-256 without a key does not either); a
//! CRC-64, as Firecracker's snapshots use, checks a 20 KiB state in a tenth of the time, which a
//! restore pays in every new VMM.
//!
//! A reader checks, in order: the size cap, the magic, the version, that the file is exactly
//! as long as the header says, the checksum, and only then parses the payload. Each failure is
//! its own [`SnapshotError`]; none panics. Writers write to a temporary name and rename, so a
//! state file either is complete or does not exist. The layout of a whole snapshot directory
//! is in `docs/SNAPSHOTS.md`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use crc::{Crc, CRC_64_XZ};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The first bytes of every state file.
pub const MAGIC: &[u8; 8] = b"HEARTHSN";
/// The format version this build writes and reads.
/// Version 1 held a JSON payload; 2 is postcard, which decodes with far less code (a restore
/// runs it for the first time in each new VMM: see `docs/SNAPSHOTS.md`); 3 replaces 2's
/// SHA-256 by a CRC-64.
pub const FORMAT_VERSION: u32 = 3;
/// The oldest format version this build reads: 2, whose payload is 3's.
pub const OLDEST_READ_VERSION: u32 = 2;
/// The largest payload accepted (a state file holds registers and device state, not memory).
pub const MAX_PAYLOAD: u64 = 64 << 20;
const HEADER_LEN: usize = 24;
/// The longest checksum, version 2's.
const MAX_CHECKSUM_LEN: usize = 32;
const CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_XZ);

/// The checksum a state file of format `version` ends with, over `bytes`: SHA-256 for version
/// 2, CRC-64/XZ (little-endian) from version 3.
fn checksum(version: u32, bytes: &[u8]) -> Vec<u8> {
    if version == 2 {
        Sha256::digest(bytes).to_vec()
    } else {
        CRC64.checksum(bytes).to_le_bytes().to_vec()
    }
}

/// The checksum's length in a state file of format `version`.
fn checksum_len(version: u32) -> usize {
    if version == 2 {
        32
    } else {
        8
    }
}

/// Why a state file could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The file could not be read or written.
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{} is not a Hearth snapshot state file (bad magic)", path.display())]
    BadMagic { path: PathBuf },
    /// The file has a format version this build does not read.
    #[error("{} has snapshot format version {found}; this build reads versions {OLDEST_READ_VERSION} to {FORMAT_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    /// The file is shorter (or longer) than its header says.
    #[error("{} is truncated or padded: {found} bytes, the header says {expected}", path.display())]
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    /// The file or its payload is over the size cap.
    #[error("{} is too large: {found} bytes, the limit is {MAX_PAYLOAD}", path.display())]
    TooLarge { path: PathBuf, found: u64 },
    /// The checksum does not match: the file is corrupt.
    #[error("{} is corrupt: its checksum does not match", path.display())]
    Checksum { path: PathBuf },
    /// The payload is not the state this build expects.
    #[error("{} has an unreadable payload: {message}", path.display())]
    Payload { path: PathBuf, message: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Encodes `state` as a state file image.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, postcard::Error> {
    Ok(wrap(&postcard::to_stdvec(state)?))
}

/// The state file image around `payload`.
fn wrap(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + checksum_len(FORMAT_VERSION));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let sum = checksum(FORMAT_VERSION, &out);
    out.extend_from_slice(&sum);
    out
}

/// Decodes a state file image read from `path` (named in errors).
pub fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, SnapshotError> {
    let path = path.to_owned();
    let found = bytes.len() as u64;
    if found > MAX_PAYLOAD + (HEADER_LEN + MAX_CHECKSUM_LEN) as u64 {
        return Err(SnapshotError::TooLarge { path, found });
    }
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic { path });
    }
    let (Some(version), Some(len)) = (
        bytes
            .get(8..12)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default())),
        bytes
            .get(16..24)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default())),
    ) else {
        return Err(SnapshotError::Length {
            path,
            expected: HEADER_LEN as u64,
            found,
        });
    };
    if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(SnapshotError::UnsupportedVersion {
            path,
            found: version,
        });
    }
    if len > MAX_PAYLOAD {
        return Err(SnapshotError::TooLarge { path, found: len });
    }
    let expected = (HEADER_LEN + checksum_len(version)) as u64 + len;
    if found != expected {
        return Err(SnapshotError::Length {
            path,
            expected,
            found,
        });
    }
    let body_end = HEADER_LEN + len as usize;
    if checksum(version, &bytes[..body_end]) != bytes[body_end..] {
        return Err(SnapshotError::Checksum { path });
    }
    match postcard::take_from_bytes(&bytes[HEADER_LEN..body_end]) {
        Ok((state, [])) => Ok(state),
        Ok((_, rest)) => Err(SnapshotError::Payload {
            path,
            message: format!("{} bytes follow the state", rest.len()),
        }),
        Err(e) => Err(SnapshotError::Payload {
            path,
            message: e.to_string(),
        }),
    }
}

/// Writes `state` to `path` durably: a temporary file, fsync, rename.
pub fn write<T: Serialize>(path: &Path, state: &T) -> Result<(), SnapshotError> {
    let bytes = encode(state).map_err(|e| SnapshotError::Payload {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(io_err("cannot create", &tmp))?;
    file.write_all(&bytes)
        .map_err(io_err("cannot write", &tmp))?;
    file.sync_all().map_err(io_err("cannot sync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("cannot rename into place", path))?;
    Ok(())
}

/// Reads a state file, never reading more than the size cap.
pub fn read<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let file = File::open(path).map_err(io_err("cannot open the snapshot state", path))?;
    let cap = MAX_PAYLOAD + (HEADER_LEN + MAX_CHECKSUM_LEN) as u64;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err("cannot read the snapshot state", path))?;
    decode(&bytes, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct State {
        name: String,
        regs: Vec<u64>,
    }

    fn state() -> State {
        State {
            name: "vm".into(),
            regs: vec![1, 2, 3],
        }
    }

    fn decode_state(bytes: &[u8]) -> Result<State, SnapshotError> {
        decode(bytes, Path::new("vmstate"))
    }

    #[test]
    fn test_snapshot_round_trip_preserves_state() {
        let bytes = encode(&state()).expect("encode");

        assert_eq!(decode_state(&bytes).expect("decode"), state());
    }

    #[test]
    fn test_snapshot_bad_magic_is_rejected() {
        let mut bytes = encode(&state()).expect("encode");
        bytes[0] = b'X';

        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::BadMagic { .. })
        ));
    }

    #[test]
    fn test_snapshot_other_version_is_rejected() {
        // Version 1 (JSON payloads) is the one a file written by an older build has.
        let mut bytes = encode(&state()).expect("encode");
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());

        let err = decode_state(&bytes).expect_err("version 1");

        assert!(matches!(
            err,
            SnapshotError::UnsupportedVersion { found: 1, .. }
        ));
        assert!(err.to_string().contains("version 1;"), "{err}");
        assert!(err.to_string().contains("reads versions 2 to 3"), "{err}");

        // And a version from a newer build.
        bytes[8..12].copy_from_slice(&4u32.to_le_bytes());
        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::UnsupportedVersion { found: 4, .. })
        ));
    }

    /// A version 2 file, as the builds before version 3 wrote it: SHA-256 at the end.
    fn version_2_file(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(payload);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    #[test]
    fn test_snapshot_version_2_files_still_read_and_are_checked() {
        let payload = postcard::to_stdvec(&state()).expect("encode");
        let mut bytes = version_2_file(&payload);

        assert_eq!(decode_state(&bytes).expect("version 2"), state());

        bytes[HEADER_LEN + 1] ^= 0x40;
        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn test_snapshot_version_3_ends_with_the_crc64_of_the_rest() {
        let bytes = encode(&state()).expect("encode");
        let (body, sum) = bytes.split_at(bytes.len() - 8);

        assert_eq!(&bytes[8..12], &3u32.to_le_bytes());
        // CRC-64/XZ's check value, the CRC of "123456789", pins the variant.
        assert_eq!(CRC64.checksum(b"123456789"), 0x995d_c9bb_df19_39fa);
        assert_eq!(sum, CRC64.checksum(body).to_le_bytes());
    }

    #[test]
    fn test_snapshot_every_truncation_is_rejected_cleanly() {
        let bytes = encode(&state()).expect("encode");

        for len in 0..bytes.len() {
            assert!(decode_state(&bytes[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn test_snapshot_flipped_payload_bit_fails_checksum() {
        let mut bytes = encode(&state()).expect("encode");
        bytes[HEADER_LEN + 3] ^= 0x01;

        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::Checksum { .. })
        ));
    }

    #[test]
    fn test_snapshot_huge_declared_length_is_rejected() {
        let mut bytes = encode(&state()).expect("encode");
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());

        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::TooLarge { .. })
        ));
    }

    #[test]
    fn test_snapshot_valid_container_with_wrong_payload_is_a_payload_error() {
        // A name and one register announced, but no register follows.
        let bytes = encode(&("vm", 1u8)).expect("encode");

        assert!(matches!(
            decode_state(&bytes),
            Err(SnapshotError::Payload { .. })
        ));
    }

    /// State with the shapes a real one has: strings, sequences, options and a KVM structure.
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Rich {
        name: String,
        runs: Vec<(u64, u64)>,
        tsc_khz: Option<u32>,
        regs: kvm_bindings::kvm_regs,
    }

    #[test]
    fn test_snapshot_damaged_payloads_with_valid_checksums_are_errors_not_panics() {
        let rich = Rich {
            name: "vm".into(),
            runs: vec![(1, 2), (300, 70000)],
            tsc_khz: Some(2_000_000),
            regs: kvm_bindings::kvm_regs {
                rip: 0xffff_ffff_8100_0000,
                ..Default::default()
            },
        };
        let payload = postcard::to_stdvec(&rich).expect("encode");
        let decode_rich = |p: &[u8]| decode::<Rich>(&wrap(p), Path::new("vmstate"));
        assert_eq!(decode_rich(&payload).expect("intact"), rich);

        for len in 0..payload.len() {
            assert!(decode_rich(&payload[..len]).is_err(), "truncated to {len}");
        }
        // Every byte set to 0xff in turn: lengths and varints become huge or overlong.
        for i in 0..payload.len() {
            let mut damaged = payload.clone();
            damaged[i] = 0xff;
            let _ = decode_rich(&damaged);
        }
    }

    #[test]
    fn test_snapshot_payload_with_bytes_after_the_state_is_a_payload_error() {
        let bytes = encode(&(state(), 7u8)).expect("encode");

        match decode_state(&bytes) {
            Err(SnapshotError::Payload { message, .. }) => {
                assert!(message.contains("1 bytes follow"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn test_snapshot_write_then_read_file() {
        let dir = vmm_sys_util::tempdir::TempDir::new().expect("tempdir");
        let path = dir.as_path().join("vmstate");

        write(&path, &state()).expect("write");

        assert_eq!(read::<State>(&path).expect("read"), state());
        assert!(!path.with_extension("tmp").exists());
    }
}
