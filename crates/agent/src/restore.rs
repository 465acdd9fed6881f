//! `Restored`: a VM resumed from a snapshot wakes with the clock and the RNG state of the
//! moment it was snapshotted, and every clone of the snapshot shares them. Our guests have no
//! vmgenid device, so the kernel cannot notice the restore by itself: without this request its
//! CRNG would keep producing the pre-snapshot stream, identical in every clone. The host sends
//! its wall clock, fresh entropy and optionally a new hostname; the agent sets the clock, mixes
//! the entropy into the input pool (RNDADDENTROPY, credited) and forces a CRNG reseed
//! (RNDRESEEDCRNG).

use std::io;
use std::os::fd::AsRawFd;

use agent_proto::{AgentError, ErrorCode, RestoreInfo};

use crate::server::Agent;
use crate::sys;

/// The least entropy the host must send.
pub const MIN_ENTROPY: usize = 32;

/// Why the restore could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("entropy of {0} bytes is too short: at least {MIN_ENTROPY} are needed")]
    ShortEntropy(usize),
    #[error("cannot set the clock")]
    Clock(#[source] io::Error),
    #[error("cannot add entropy to the kernel RNG")]
    Entropy(#[source] io::Error),
    #[error("cannot set the hostname")]
    Hostname(#[source] io::Error),
}

impl From<RestoreError> for AgentError {
    fn from(e: RestoreError) -> Self {
        let message = match &e {
            RestoreError::ShortEntropy(_) => e.to_string(),
            RestoreError::Clock(s) | RestoreError::Entropy(s) | RestoreError::Hostname(s) => {
                format!("{e}: {s}")
            }
        };
        let code = match e {
            RestoreError::ShortEntropy(_) => ErrorCode::BadRequest,
            _ => ErrorCode::Io,
        };
        AgentError::new(code, message)
    }
}

/// Applies `info`. In development mode (`--serve-unix`, on a host) the clock is left alone.
pub fn apply(agent: &Agent, info: &RestoreInfo) -> Result<(), RestoreError> {
    if info.entropy.len() < MIN_ENTROPY {
        return Err(RestoreError::ShortEntropy(info.entropy.len()));
    }
    if agent.is_pid1() {
        sys::set_realtime_ns(info.wall_clock_ns).map_err(RestoreError::Clock)?;
    }
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(RestoreError::Entropy)?;
    sys::add_entropy_and_reseed(urandom.as_raw_fd(), &info.entropy)
        .map_err(RestoreError::Entropy)?;
    if let Some(name) = &info.hostname {
        agent.set_hostname(name).map_err(RestoreError::Hostname)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_restore_error_short_entropy_is_bad_request() {
        let error: AgentError = RestoreError::ShortEntropy(8).into();

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::BadRequest,
                "entropy of 8 bytes is too short: at least 32 are needed"
            )
        );
    }
}
