//! `Forward`: connects to TCP `127.0.0.1:<port>` in the guest and, after `Ok`, relays raw
//! bytes both ways until both directions are closed, passing each half-close on.

use std::io;
use std::time::Duration;

use agent_proto::{frame, AgentError, ErrorCode, Message};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// How long the connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the guest-side connection failed.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("nothing listens on 127.0.0.1:{0} in the guest (connection refused)")]
    Refused(u16),
    #[error("connecting to 127.0.0.1:{0} in the guest timed out after 5 s")]
    Timeout(u16),
    #[error("cannot connect to 127.0.0.1:{port} in the guest: {source}")]
    Connect {
        port: u16,
        #[source]
        source: io::Error,
    },
}

impl From<ForwardError> for AgentError {
    fn from(e: ForwardError) -> Self {
        AgentError::new(ErrorCode::ConnectFailed, e.to_string())
    }
}

/// Connects to the guest port.
pub async fn connect(port: u16) -> Result<TcpStream, ForwardError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(ForwardError::Refused(port))
        }
        Ok(Err(source)) => Err(ForwardError::Connect { port, source }),
        Err(_) => Err(ForwardError::Timeout(port)),
    }
}

/// Serves `Forward` on `stream` (whose request has been read).
pub async fn serve<S>(port: u16, mut stream: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut tcp = match connect(port).await {
        Ok(tcp) => tcp,
        Err(e) => {
            let _ = frame::send(&mut stream, Message::Error(e.into())).await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if frame::send(&mut stream, Message::Ok).await.is_err() {
        return;
    }
    // copy_bidirectional shuts down each writer when its reader reaches EOF, so half-closes
    // travel in both directions; it returns once both directions are done.
    match tokio::io::copy_bidirectional(&mut stream, &mut tcp).await {
        Ok((up, down)) => log::debug!("forward {port}: {up} bytes in, {down} bytes out"),
        Err(e) => log::debug!("forward {port}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_connect_closed_port_is_refused_with_clear_message() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);

        let error: AgentError = connect(port).await.unwrap_err().into();

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::ConnectFailed,
                format!("nothing listens on 127.0.0.1:{port} in the guest (connection refused)")
            )
        );
    }
}
