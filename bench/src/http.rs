//! The HTTP client: one GET of the workload's page per connection (busybox httpd closes
//! after each answer), every answer checked for the page's token.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::workload::PAGE_TOKEN;

/// A request that did not get the page.
#[derive(Debug, Error)]
pub enum HttpError {
    /// Connecting, sending or reading failed.
    #[error("GET http://{addr}/: {source}")]
    Io {
        /// The server.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// The answer was not the workload's page.
    #[error("GET http://{addr}/ answered {got:?}, not the bench page")]
    WrongPage {
        /// The server.
        addr: SocketAddr,
        /// The start of the answer.
        got: String,
    },
    /// Nothing answered in time.
    #[error("http://{addr}/ did not answer within {secs} s")]
    Timeout {
        /// The server.
        addr: SocketAddr,
        /// How long the bench waited.
        secs: u64,
    },
}

/// How long a server that accepted a connection has to answer.
const ANSWER_LIMIT: Duration = Duration::from_secs(10);

/// One GET with `timeout` for each step; returns how long it took.
pub fn get(addr: SocketAddr, timeout: Duration) -> Result<Duration, HttpError> {
    get_within(addr, timeout, timeout)
}

/// One GET: `connect` to connect, `timeout` for each step after that.
fn get_within(
    addr: SocketAddr,
    connect: Duration,
    timeout: Duration,
) -> Result<Duration, HttpError> {
    let io = |source| HttpError::Io { addr, source };
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, connect).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: wisp-bench\r\n\r\n")
        .map_err(io)?;
    let mut answer = Vec::new();
    s.take(1 << 20).read_to_end(&mut answer).map_err(io)?;
    let took = t0.elapsed();
    let text = String::from_utf8_lossy(&answer);
    if !text.starts_with("HTTP/1.") || !text.contains(PAGE_TOKEN) {
        return Err(HttpError::WrongPage {
            addr,
            got: text.chars().take(80).collect(),
        });
    }
    Ok(took)
}

/// Retries [`get`] until it succeeds, `alive` says the server is gone, or `limit`
/// passes; returns when the answer arrived. Connecting is retried often; a connection
/// that was accepted gets a slow server's time to answer (a busy guest whose kernel
/// mode is emulated takes hundreds of ms).
pub fn first_answer(
    addr: SocketAddr,
    limit: Duration,
    alive: &mut dyn FnMut() -> bool,
) -> Result<Instant, HttpError> {
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        match get_within(addr, Duration::from_millis(200), ANSWER_LIMIT) {
            Ok(_) => return Ok(Instant::now()),
            Err(e) => last = Some(e),
        }
        if !alive() || crate::interrupted() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Err(last.unwrap_or(HttpError::Timeout {
        addr,
        secs: limit.as_secs(),
    }))
}

/// `n` GETs one after the other; their latencies in ms.
pub fn latencies(addr: SocketAddr, n: usize) -> Result<Vec<f64>, HttpError> {
    (0..n)
        .map(|_| get(addr, ANSWER_LIMIT).map(|d| d.as_secs_f64() * 1000.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn serve(answer: &'static str, n: usize) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let (mut c, _) = l.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = c.read(&mut buf);
                c.write_all(answer.as_bytes()).unwrap();
            }
        });
        addr
    }

    #[test]
    fn the_page_is_checked() {
        let ok = serve("HTTP/1.0 200 OK\r\n\r\n<html>wisp-bench-page</html>", 3);
        assert_eq!(latencies(ok, 3).unwrap().len(), 3);
        let wrong = serve("HTTP/1.0 404 Not Found\r\n\r\nnope", 1);
        let e = get(wrong, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, HttpError::WrongPage { .. }), "{e}");
    }

    #[test]
    fn a_slow_answer_after_a_quick_accept_is_waited_for() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            while let Ok((mut c, _)) = l.accept() {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 512];
                    let _ = c.read(&mut buf);
                    std::thread::sleep(Duration::from_millis(600));
                    let _ = c.write_all(b"HTTP/1.0 200 OK\r\n\r\nwisp-bench-page");
                });
            }
        });
        let t0 = Instant::now();
        let at = first_answer(addr, Duration::from_secs(20), &mut || true).unwrap();
        let took = at.duration_since(t0);
        assert!(took >= Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn nobody_listening_ends_when_the_server_is_gone() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut polls = 0;
        let e = first_answer(addr, Duration::from_secs(30), &mut || {
            polls += 1;
            polls < 3
        })
        .unwrap_err();
        assert!(matches!(e, HttpError::Io { .. }), "{e}");
        assert_eq!(polls, 3);
    }
}
