//! Lifecycle hooks: a minimal HTTP/1.1 client that POSTs
//! `/aws/lambda-microvms/runtime/v1/<hook>` to the app on `127.0.0.1:<port>`, and the retry
//! semantics around it.
//!
//! Polled hooks (`ready`, `validate`) treat a 503, a refused connection and a connection the
//! app dropped without answering as "not yet" and ask again every 100 ms until the timeout.
//! The other hooks are sent once; only a refused connection is retried until the timeout (the
//! request never reached the app, which may be restarting), since repeating a `run` or
//! `terminate` the app did receive would not be safe. Any other status fails at once. A
//! request still open when the whole budget is spent is abandoned.

use std::io;
use std::time::{Duration, Instant};

use agent_proto::{AgentError, ErrorCode, HookName, HookOutcome, HookRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head the client reads.
const MAX_HEAD: usize = 64 << 10;
/// The pause between attempts.
const RETRY_DELAY: Duration = Duration::from_millis(100);

/// Why one attempt got no status.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    #[error("connection refused")]
    Refused,
    #[error("connection closed without a response")]
    Closed,
    #[error("connection reset")]
    Reset,
    #[error("malformed HTTP response: {0}")]
    Malformed(String),
    #[error("I/O error")]
    Io(#[source] io::Error),
}

impl From<io::Error> for HooksError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::Refused,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Self::Reset,
            _ => Self::Io(e),
        }
    }
}

/// The request bytes for `hook`.
pub fn request_bytes(hook: HookName, port: u16, body: &str) -> Vec<u8> {
    format!(
        "POST /aws/lambda-microvms/runtime/v1/{} HTTP/1.1\r\n\
         Host: localhost:{port}\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        hook.as_str(),
        body.len()
    )
    .into_bytes()
}

/// The status code of a response head in `buf`: `None` while incomplete.
pub fn parse_status(buf: &[u8]) -> Result<Option<u16>, HooksError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(buf) {
        Ok(httparse::Status::Complete(_)) => response
            .code
            .map(Some)
            .ok_or_else(|| HooksError::Malformed("no status code".into())),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(HooksError::Malformed(e.to_string())),
    }
}

/// One request: its status code.
async fn attempt(hook: HookName, port: u16, body: &str) -> Result<u16, HooksError> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(&request_bytes(hook, port, body)).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(if buf.is_empty() {
                HooksError::Closed
            } else {
                HooksError::Malformed("the response ended inside its headers".into())
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(status) = parse_status(&buf)? {
            return Ok(status);
        }
        if buf.len() > MAX_HEAD {
            return Err(HooksError::Malformed(format!(
                "response headers over {} KiB",
                MAX_HEAD >> 10
            )));
        }
    }
}

fn retryable(hook: HookName, outcome: &Result<u16, HooksError>) -> Option<String> {
    match outcome {
        Ok(503) if hook.polls() => Some("HTTP 503".into()),
        Err(HooksError::Refused) => Some("connection refused".into()),
        Err(e @ (HooksError::Closed | HooksError::Reset)) if hook.polls() => Some(e.to_string()),
        _ => None,
    }
}

/// Calls the hook with its retry semantics.
pub async fn call(req: &HookRequest) -> Result<HookOutcome, AgentError> {
    let start = Instant::now();
    let budget = Duration::from_millis(req.timeout_ms);
    let deadline = tokio::time::Instant::from_std(start + budget);
    let body = req.body.as_deref().unwrap_or("");
    let name = req.hook.as_str();
    let mut attempts = 0u32;
    let mut last = "no response".to_string();
    let timeout = |last: &str| {
        AgentError::new(
            ErrorCode::HookTimeout,
            format!(
                "{name} hook did not return 200 within {} ms (last: {last})",
                req.timeout_ms
            ),
        )
    };
    loop {
        attempts += 1;
        let outcome =
            match tokio::time::timeout_at(deadline, attempt(req.hook, req.port, body)).await {
                Ok(outcome) => outcome,
                Err(_) if attempts == 1 => return Err(timeout(&last)),
                Err(_) => return Err(timeout(&format!("{last}, then no response"))),
            };
        if let Ok(200) = outcome {
            return Ok(HookOutcome {
                attempts,
                elapsed_ms: start.elapsed().as_millis() as u64,
            });
        }
        match retryable(req.hook, &outcome) {
            Some(why) => last = why,
            None => {
                let message = match outcome {
                    Ok(status) => format!("{name} hook returned HTTP {status}"),
                    Err(HooksError::Io(e)) => format!("{name} hook failed: I/O error: {e}"),
                    Err(e) => format!("{name} hook failed: {e}"),
                };
                return Err(AgentError::new(ErrorCode::HookFailed, message));
            }
        }
        if tokio::time::Instant::now() + RETRY_DELAY > deadline {
            return Err(timeout(&last));
        }
        tokio::time::sleep(RETRY_DELAY).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use tokio::net::TcpListener;

    use super::*;

    /// A fake app that answers the n-th request with `responses[n]` (the last one repeats); an
    /// empty response means "read the request and never answer".
    async fn fake_app(responses: Vec<&'static str>) -> (u16, Arc<AtomicU32>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(AtomicU32::new(0));
        let seen = Arc::clone(&count);
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let n = seen.fetch_add(1, Ordering::SeqCst) as usize;
                let response = responses[n.min(responses.len() - 1)];
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    if response.is_empty() {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    let _ = conn.write_all(response.as_bytes()).await;
                });
            }
        });
        (port, count)
    }

    fn request(hook: HookName, port: u16, timeout_ms: u64) -> HookRequest {
        HookRequest {
            hook,
            port,
            timeout_ms,
            body: None,
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
    const UNAVAILABLE: &str = "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
    const NOT_FOUND: &str = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";

    #[test]
    fn test_request_bytes_has_path_headers_and_body() {
        let bytes = request_bytes(HookName::Run, 8080, "{}");

        assert_eq!(
            String::from_utf8(bytes).unwrap(),
            "POST /aws/lambda-microvms/runtime/v1/run HTTP/1.1\r\nHost: localhost:8080\r\n\
             Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        );
    }

    #[test]
    fn test_parse_status_partial_head_is_none() {
        let result = parse_status(b"HTTP/1.1 200 OK\r\nContent-Le");

        assert!(matches!(result, Ok(None)));
    }

    #[tokio::test]
    async fn test_call_ready_503_twice_then_200_is_done() {
        let (port, _) = fake_app(vec![UNAVAILABLE, UNAVAILABLE, OK]).await;

        let outcome = call(&request(HookName::Ready, port, 5000)).await.unwrap();

        assert_eq!(outcome.attempts, 3);
    }

    #[tokio::test]
    async fn test_call_ready_404_fails_at_once() {
        let (port, count) = fake_app(vec![NOT_FOUND]).await;

        let error = call(&request(HookName::Ready, port, 5000))
            .await
            .unwrap_err();

        assert_eq!(
            (error, count.load(Ordering::SeqCst)),
            (
                AgentError::new(ErrorCode::HookFailed, "ready hook returned HTTP 404"),
                1
            )
        );
    }

    #[tokio::test]
    async fn test_call_ready_always_503_times_out_naming_503() {
        let (port, _) = fake_app(vec![UNAVAILABLE]).await;

        let error = call(&request(HookName::Ready, port, 350))
            .await
            .unwrap_err();

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::HookTimeout,
                "ready hook did not return 200 within 350 ms (last: HTTP 503)"
            )
        );
    }

    #[tokio::test]
    async fn test_call_never_answering_app_times_out() {
        let (port, _) = fake_app(vec![""]).await;

        let error = call(&request(HookName::Suspend, port, 200))
            .await
            .unwrap_err();

        assert_eq!(error.code, ErrorCode::HookTimeout);
    }

    #[tokio::test]
    async fn test_call_garbage_response_is_hook_failed() {
        let (port, _) = fake_app(vec!["SSH-2.0-OpenSSH\r\n\r\n"]).await;

        let error = call(&request(HookName::Validate, port, 1000))
            .await
            .unwrap_err();

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::HookFailed,
                "validate hook failed: malformed HTTP response: invalid HTTP version"
            )
        );
    }

    #[tokio::test]
    async fn test_call_run_503_fails_without_retry() {
        let (port, count) = fake_app(vec![UNAVAILABLE, OK]).await;

        let error = call(&request(HookName::Run, port, 2000)).await.unwrap_err();

        assert_eq!(
            (error.code, count.load(Ordering::SeqCst)),
            (ErrorCode::HookFailed, 1)
        );
    }

    #[tokio::test]
    async fn test_call_nothing_listening_times_out_naming_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);

        let error = call(&request(HookName::Ready, port, 250))
            .await
            .unwrap_err();

        assert_eq!(
            error,
            AgentError::new(
                ErrorCode::HookTimeout,
                "ready hook did not return 200 within 250 ms (last: connection refused)"
            )
        );
    }
}
