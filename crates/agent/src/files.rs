//! File requests: streaming a file out (`ReadFile`), replacing one atomically (`WriteFile`:
//! a temporary file beside it, fsync, chmod, rename), and `Stat`, `List`, `Mkdir`, `Remove`,
//! `Chmod`. Every failure becomes an `AgentError` whose message names the path.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use agent_proto::frame::{self, read_frame, write_frame, Frame, FrameError, Stream, CHUNK};
use agent_proto::{AgentError, DirEntry, ErrorCode, FileKind, FileStat, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::sys;

/// Why a file request failed: what was being done, to which path, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {path}")]
pub struct FilesError {
    pub action: &'static str,
    pub path: String,
    #[source]
    pub source: io::Error,
}

impl FilesError {
    fn new(action: &'static str, path: impl AsRef<Path>, source: io::Error) -> Self {
        Self {
            action,
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

impl From<FilesError> for AgentError {
    fn from(e: FilesError) -> Self {
        let (code, reason) = match e.source.raw_os_error() {
            Some(libc::ENOENT) => (ErrorCode::NotFound, "no such file or directory".into()),
            Some(libc::ENOTDIR) => (ErrorCode::NotFound, "not a directory".into()),
            Some(libc::EACCES) | Some(libc::EPERM) => {
                (ErrorCode::PermissionDenied, "permission denied".into())
            }
            Some(libc::EROFS) => (ErrorCode::PermissionDenied, "read-only file system".into()),
            Some(libc::EEXIST) => (ErrorCode::AlreadyExists, "it already exists".into()),
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => {
                (ErrorCode::NoSpace, "no space left on device".into())
            }
            Some(libc::EISDIR) => (ErrorCode::BadRequest, "it is a directory".into()),
            Some(libc::ENOTEMPTY) => (
                ErrorCode::BadRequest,
                "the directory is not empty (remove it recursively)".into(),
            ),
            _ => (ErrorCode::Io, e.source.to_string()),
        };
        if code == ErrorCode::NoSpace && e.action == "write" {
            return AgentError::new(code, format!("no space left on device writing {}", e.path));
        }
        AgentError::new(code, format!("{e}: {reason}"))
    }
}

fn mode_bits(meta: &std::fs::Metadata) -> u32 {
    meta.mode() & 0o7777
}

fn kind(meta: &std::fs::Metadata) -> FileKind {
    let t = meta.file_type();
    if t.is_symlink() {
        FileKind::Symlink
    } else if t.is_dir() {
        FileKind::Dir
    } else if t.is_file() {
        FileKind::File
    } else {
        FileKind::Other
    }
}

/// `Stat`: `lstat` of `path`.
pub async fn stat(path: &str) -> Result<FileStat, FilesError> {
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| FilesError::new("stat", path, e))?;
    Ok(FileStat {
        kind: kind(&meta),
        size: meta.len(),
        mode: mode_bits(&meta),
        uid: meta.uid(),
        gid: meta.gid(),
        mtime: meta.mtime(),
    })
}

/// `List`: the entries of `path`, sorted by name, each `lstat`ed.
pub async fn list(path: &str) -> Result<Vec<DirEntry>, FilesError> {
    let owned = path.to_string();
    let joined = tokio::task::spawn_blocking(move || {
        let mut entries = Vec::new();
        let dir = std::fs::read_dir(&owned).map_err(|e| FilesError::new("list", &owned, e))?;
        for entry in dir {
            let entry = entry.map_err(|e| FilesError::new("list", &owned, e))?;
            // `DirEntry::metadata` does not follow symlinks. An entry that vanished meanwhile
            // is skipped.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            entries.push(DirEntry {
                name: entry.file_name().to_string_lossy().into_owned(),
                kind: kind(&meta),
                size: meta.len(),
                mode: mode_bits(&meta),
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    })
    .await;
    joined.unwrap_or_else(|e| Err(FilesError::new("list", path, io::Error::other(e))))
}

/// `Mkdir`.
pub async fn mkdir(path: &str, mode: Option<u32>, parents: bool) -> Result<(), FilesError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(parents).mode(mode.unwrap_or(0o755));
    builder
        .create(path)
        .await
        .map_err(|e| FilesError::new("create directory", path, e))?;
    if let Some(mode) = mode {
        // The umask may have cleared bits the host asked for.
        chmod(path, mode).await?;
    }
    Ok(())
}

/// `Remove`: a file, a symlink, an empty directory, or (recursive) a whole tree, never
/// following symlinks.
pub async fn remove(path: &str, recursive: bool) -> Result<(), FilesError> {
    if Path::new(path) == Path::new("/") {
        let e = io::Error::new(io::ErrorKind::InvalidInput, "refusing to remove /");
        return Err(FilesError::new("remove", path, e));
    }
    let meta = tokio::fs::symlink_metadata(path)
        .await
        .map_err(|e| FilesError::new("remove", path, e))?;
    let result = if meta.is_dir() && recursive {
        tokio::fs::remove_dir_all(path).await
    } else if meta.is_dir() {
        tokio::fs::remove_dir(path).await
    } else {
        tokio::fs::remove_file(path).await
    };
    result.map_err(|e| FilesError::new("remove", path, e))
}

/// `Chmod`.
pub async fn chmod(path: &str, mode: u32) -> Result<(), FilesError> {
    let perms = std::fs::Permissions::from_mode(mode & 0o7777);
    tokio::fs::set_permissions(path, perms)
        .await
        .map_err(|e| FilesError::new("chmod", path, e))
}

/// `ReadFile`: `FileInfo`, the bytes, an empty chunk, `Done`; or `Error` (also mid-stream).
pub async fn read_file<W: AsyncWrite + Unpin>(path: &str, tx: &mut W) -> Result<(), FrameError> {
    let opened = async {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| FilesError::new("read", path, e))?;
        let meta = file
            .metadata()
            .await
            .map_err(|e| FilesError::new("read", path, e))?;
        if meta.is_dir() {
            let e = io::Error::from_raw_os_error(libc::EISDIR);
            return Err(FilesError::new("read", path, e));
        }
        Ok((file, meta))
    }
    .await;
    let (mut file, meta) = match opened {
        Ok(o) => o,
        Err(e) => return frame::send(tx, Message::Error(e.into())).await,
    };
    let info = Message::FileInfo {
        size: meta.len(),
        mode: mode_bits(&meta),
    };
    frame::send(tx, info).await?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = match file.read(&mut buf).await {
            Ok(n) => n,
            Err(e) => {
                let error = FilesError::new("read", path, e);
                return frame::send(tx, Message::Error(error.into())).await;
            }
        };
        write_frame(tx, &Frame::Data(Stream::File, buf[..n].to_vec())).await?;
        if n == 0 {
            break;
        }
    }
    frame::send(tx, Message::Done).await
}

/// The temporary file a `WriteFile` fills, removed unless it was renamed into place.
struct TempFile {
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Why a `WriteFile` stopped.
enum WriteEnd {
    /// The request failed; tell the host.
    Failed(AgentError),
    /// The connection broke; nobody to tell.
    HostGone,
}

impl From<FilesError> for WriteEnd {
    fn from(e: FilesError) -> Self {
        Self::Failed(e.into())
    }
}

fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    let tmp = format!(".{name}.hearth-tmp-{:016x}", sys::random_u64());
    Some(path.with_file_name(tmp))
}

/// `WriteFile`: `Ready`, then file chunks until an empty one, then `Written` (or `Error`).
/// The old file is untouched unless everything succeeded.
pub async fn write_file<R, W>(path: &str, mode: Option<u32>, rx: &mut R, tx: &mut W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let result = match receive_file(path, mode, rx, tx).await {
        Ok(bytes) => frame::send(tx, Message::Written { bytes }).await,
        Err(WriteEnd::Failed(e)) => frame::send(tx, Message::Error(e)).await,
        Err(WriteEnd::HostGone) => Ok(()),
    };
    if let Err(e) = result {
        log::debug!("write {path}: {e}");
    }
}

async fn receive_file<R, W>(
    path: &str,
    mode: Option<u32>,
    rx: &mut R,
    tx: &mut W,
) -> Result<u64, WriteEnd>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let target = Path::new(path);
    let Some(tmp_path) = temp_path(target) else {
        let message = format!("cannot write {path}: it names no file");
        return Err(WriteEnd::Failed(AgentError::new(
            ErrorCode::BadRequest,
            message,
        )));
    };
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        match tokio::fs::metadata(parent).await {
            Ok(m) if m.is_dir() => {}
            _ => {
                let message = format!(
                    "cannot write {path}: directory {} does not exist",
                    parent.display()
                );
                return Err(WriteEnd::Failed(AgentError::new(
                    ErrorCode::NotFound,
                    message,
                )));
            }
        }
    }
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp_path)
        .await
        .map_err(|e| FilesError::new("write", path, e))?;
    let mut file = tokio::io::BufWriter::with_capacity(CHUNK, file);
    let mut guard = TempFile {
        path: Some(tmp_path.clone()),
    };
    frame::send(tx, Message::Ready)
        .await
        .map_err(|_| WriteEnd::HostGone)?;
    let mut bytes = 0u64;
    loop {
        match read_frame(rx).await {
            Ok(Some(Frame::Data(Stream::File, chunk))) if chunk.is_empty() => break,
            Ok(Some(Frame::Data(Stream::File, chunk))) => {
                file.write_all(&chunk)
                    .await
                    .map_err(|e| FilesError::new("write", path, e))?;
                bytes += chunk.len() as u64;
            }
            Ok(Some(other)) => {
                let message = format!("unexpected frame during WriteFile: {other:?}");
                let message: String = message.chars().take(200).collect();
                return Err(WriteEnd::Failed(AgentError::new(
                    ErrorCode::BadRequest,
                    message,
                )));
            }
            Ok(None) | Err(FrameError::Io(_)) | Err(FrameError::Truncated) => {
                return Err(WriteEnd::HostGone)
            }
            Err(e) => {
                let message = format!("malformed frame during WriteFile: {e}");
                return Err(WriteEnd::Failed(AgentError::new(
                    ErrorCode::BadRequest,
                    message,
                )));
            }
        }
    }
    file.flush()
        .await
        .map_err(|e| FilesError::new("write", path, e))?;
    let file = file.into_inner();
    file.sync_all()
        .await
        .map_err(|e| FilesError::new("write", path, e))?;
    let perms = std::fs::Permissions::from_mode(mode.unwrap_or(0o644) & 0o7777);
    file.set_permissions(perms)
        .await
        .map_err(|e| FilesError::new("chmod", path, e))?;
    drop(file);
    tokio::fs::rename(&tmp_path, target)
        .await
        .map_err(|e| FilesError::new("write", path, e))?;
    guard.path = None;
    if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
        if let Ok(dir) = tokio::fs::File::open(parent).await {
            let _ = dir.sync_all().await;
        }
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent_error(errno: i32) -> AgentError {
        FilesError::new("write", "/data/f", io::Error::from_raw_os_error(errno)).into()
    }

    #[test]
    fn test_files_error_enoent_is_not_found_naming_path() {
        let error = agent_error(libc::ENOENT);

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::NotFound,
                "cannot write /data/f: no such file or directory"
            )
        );
    }

    #[test]
    fn test_files_error_enospc_is_no_space() {
        let error = agent_error(libc::ENOSPC);

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::NoSpace,
                "no space left on device writing /data/f"
            )
        );
    }

    #[test]
    fn test_files_error_erofs_is_permission_denied_naming_read_only() {
        let error = agent_error(libc::EROFS);

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::PermissionDenied,
                "cannot write /data/f: read-only file system"
            )
        );
    }

    #[test]
    fn test_files_error_eexist_is_already_exists() {
        let error = agent_error(libc::EEXIST);

        assert_eq!(error.code, ErrorCode::AlreadyExists);
    }

    #[test]
    fn test_files_error_other_errno_is_io() {
        let error = agent_error(libc::EMFILE);

        assert_eq!(error.code, ErrorCode::Io);
    }

    #[test]
    fn test_temp_path_is_hidden_sibling() {
        let tmp = temp_path(Path::new("/etc/app.conf")).unwrap();

        assert!(tmp
            .to_string_lossy()
            .starts_with("/etc/.app.conf.hearth-tmp-"));
    }
}
