//! Framing: every byte on an agent connection (until a `Forward` turns it raw) is a frame of
//! `kind: u8`, `len: u32` little-endian, then `len` bytes of payload. Kind 0 carries one JSON
//! [`Message`]; kinds 1-4 carry a chunk of a byte stream, and an empty chunk ends that stream.
//! A frame longer than [`MAX_FRAME`] is an error, so a peer cannot make the other allocate
//! without bound.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::message::Message;

/// The largest payload either side accepts.
pub const MAX_FRAME: usize = 1 << 20;
/// The chunk size senders use for streams.
pub const CHUNK: usize = 64 << 10;
const HEADER: usize = 5;
const KIND_MESSAGE: u8 = 0;

/// The byte streams a connection can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdin,
    Stdout,
    Stderr,
    /// A file's contents (ReadFile, WriteFile).
    File,
}

impl Stream {
    fn kind(self) -> u8 {
        match self {
            Self::Stdin => 1,
            Self::Stdout => 2,
            Self::Stderr => 3,
            Self::File => 4,
        }
    }

    fn from_kind(kind: u8) -> Option<Self> {
        match kind {
            1 => Some(Self::Stdin),
            2 => Some(Self::Stdout),
            3 => Some(Self::Stderr),
            4 => Some(Self::File),
            _ => None,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Message(Message),
    /// A chunk of `Stream`; empty means the stream ended.
    Data(Stream, Vec<u8>),
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection error")]
    Io(#[from] std::io::Error),
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    #[error("the connection closed in the middle of a frame")]
    Truncated,
}

/// The bytes of `frame` on the wire.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let (kind, payload) = match frame {
        Frame::Message(m) => (KIND_MESSAGE, serde_json::to_vec(m)?),
        Frame::Data(stream, bytes) => (stream.kind(), bytes.clone()),
    };
    if payload.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

fn header(buf: [u8; HEADER]) -> Result<(u8, usize), FrameError> {
    let kind = buf[0];
    let len = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if kind != KIND_MESSAGE && Stream::from_kind(kind).is_none() {
        return Err(FrameError::UnknownKind(kind));
    }
    Ok((kind, len))
}

fn payload(kind: u8, payload: Vec<u8>) -> Result<Frame, FrameError> {
    match Stream::from_kind(kind) {
        Some(stream) => Ok(Frame::Data(stream, payload)),
        None => Ok(Frame::Message(serde_json::from_slice(&payload)?)),
    }
}

/// Decodes the first frame of `buf`: `None` if `buf` does not hold a whole frame yet, else
/// the frame and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(head) = buf.get(..HEADER) else {
        return Ok(None);
    };
    let (kind, len) = header(head.try_into().map_err(|_| FrameError::Truncated)?)?;
    let Some(body) = buf.get(HEADER..HEADER + len) else {
        return Ok(None);
    };
    Ok(Some((payload(kind, body.to_vec())?, HEADER + len)))
}

/// Reads one frame; `None` when the peer closed the connection between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let (kind, len) = header(head)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    })?;
    payload(kind, body).map(Some)
}

/// Writes one frame and flushes it. Data chunks go out from the caller's buffer, without the
/// copy `encode` makes: they are the bulk of every stream.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    match frame {
        Frame::Data(stream, bytes) => {
            if bytes.len() > MAX_FRAME {
                return Err(FrameError::TooLarge(bytes.len()));
            }
            let mut head = [0u8; HEADER];
            head[0] = stream.kind();
            head[1..].copy_from_slice(&(bytes.len() as u32).to_le_bytes());
            w.write_all(&head).await?;
            w.write_all(bytes).await?;
        }
        Frame::Message(_) => w.write_all(&encode(frame)?).await?,
    }
    w.flush().await?;
    Ok(())
}

/// Writes a message frame.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, message: Message) -> Result<(), FrameError> {
    write_frame(w, &Frame::Message(message)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ErrorCode, Request};

    #[test]
    fn test_encode_decode_message_round_trips() {
        let frame = Frame::Message(Message::Request(Request::Stat { path: "/a".into() }));

        let bytes = encode(&frame).unwrap();

        assert_eq!(decode(&bytes).unwrap(), Some((frame, bytes.len())));
    }

    #[test]
    fn test_encode_decode_data_round_trips() {
        let frame = Frame::Data(Stream::Stderr, b"oops".to_vec());

        let bytes = encode(&frame).unwrap();

        assert_eq!(bytes[..5], [3, 4, 0, 0, 0]);
        assert_eq!(decode(&bytes).unwrap(), Some((frame, 9)));
    }

    #[test]
    fn test_decode_partial_frame_needs_more() {
        let bytes = encode(&Frame::Data(Stream::Stdout, vec![7; 100])).unwrap();

        assert!(decode(&bytes[..50]).unwrap().is_none());
    }

    #[test]
    fn test_decode_oversized_length_is_rejected() {
        let bytes = [2, 0xff, 0xff, 0xff, 0xff];

        assert!(matches!(decode(&bytes), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn test_decode_unknown_kind_is_rejected() {
        let bytes = [9, 0, 0, 0, 0];

        assert!(matches!(decode(&bytes), Err(FrameError::UnknownKind(9))));
    }

    #[test]
    fn test_decode_garbage_json_is_rejected() {
        let bytes = [0, 3, 0, 0, 0, b'{', b'x', b'}'];

        assert!(matches!(decode(&bytes), Err(FrameError::Json(_))));
    }

    #[test]
    fn test_decode_random_input_never_panics() {
        let mut seed = 0x1234_5678_u32;
        for _ in 0..10_000 {
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    (seed % 6) as u8
                })
                .collect();

            let _ = decode(&bytes);
        }
    }

    #[test]
    fn test_error_message_serialises_with_code() {
        let m = Message::Error(crate::message::AgentError::new(
            ErrorCode::NoSpace,
            "disk full",
        ));

        let json = serde_json::to_string(&m).unwrap();

        assert_eq!(
            json,
            r#"{"type":"error","code":"no_space","message":"disk full"}"#
        );
    }

    #[tokio::test]
    async fn test_read_frame_truncated_body_is_error() {
        let mut bytes = encode(&Frame::Data(Stream::File, vec![1; 10])).unwrap();
        bytes.truncate(8);

        let result = read_frame(&mut bytes.as_slice()).await;

        assert!(matches!(result, Err(FrameError::Truncated)));
    }

    #[tokio::test]
    async fn test_write_frame_data_matches_encode() {
        let frame = Frame::Data(Stream::Stdout, vec![9; 300]);
        let mut out = Vec::new();

        write_frame(&mut out, &frame).await.unwrap();

        assert_eq!(out, encode(&frame).unwrap());
    }

    #[tokio::test]
    async fn test_read_frame_clean_eof_is_none() {
        let result = read_frame(&mut [].as_slice()).await.unwrap();

        assert!(result.is_none());
    }
}
