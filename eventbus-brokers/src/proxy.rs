//! An in-process TCP fault proxy between the SDK and a broker, on loopback.
//!
//! Every accepted connection gets its own upstream connection and two pumps. The [`Mode`] applies
//! to both directions and can change at any time: pass, delay every chunk, cap the bandwidth, or
//! hold (a blackhole: nothing is forwarded and nothing is closed, no RST, like a partition).
//! [`FaultProxy::reset`] aborts every open connection with a TCP RST, and
//! [`FaultProxy::cut_after`] forwards a number of bytes more and then resets, so a frame is cut
//! in the middle.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

/// What the proxy does to the bytes it forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Hold every chunk this long before forwarding it.
    Delay(Duration),
    /// Forward at most this many bytes per second in each direction.
    Bandwidth(u64),
    /// Forward nothing and close nothing (no RST): the peer only notices by its own timeouts.
    Hold,
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Mutex<Vec<[AbortHandle; 2]>>,
    /// Bytes still allowed through before every connection is reset; negative = disarmed.
    cut: AtomicI64,
    accepted: AtomicU64,
}

/// A running proxy; stops (and resets its connections) when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: AbortHandle,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let port = crate::free_port()?;
        Self::start_on(port, upstream).await
    }

    /// Listen on loopback `port` and forward to `upstream`.
    pub async fn start_on(port: u16, upstream: SocketAddr) -> std::io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            mode: watch::Sender::new(Mode::Pass),
            conns: Mutex::new(Vec::new()),
            cut: AtomicI64::new(-1),
            accepted: AtomicU64::new(0),
        });
        let st = Arc::clone(&state);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                st.accepted.fetch_add(1, Ordering::Relaxed);
                let st = Arc::clone(&st);
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(st.upstream).await else {
                        return;
                    };
                    for s in [&client, &server] {
                        let _ = s.set_nodelay(true);
                        // Dropping a socket then sends RST, not FIN: `reset` needs that.
                        let _ = s.set_zero_linger();
                    }
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(cr, sw, Arc::clone(&st)));
                    let down = tokio::spawn(pump(sr, cw, Arc::clone(&st)));
                    st.conns
                        .lock()
                        .push([up.abort_handle(), down.abort_handle()]);
                });
            }
        })
        .abort_handle();
        Ok(FaultProxy {
            addr,
            state,
            accept,
        })
    }

    /// The address clients should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Change what happens to forwarded bytes.
    pub fn set(&self, mode: Mode) {
        self.state.mode.send_replace(mode);
    }

    /// Reset (RST) every open connection now. New connections are still accepted.
    pub fn reset(&self) {
        reset_all(&self.state);
    }

    /// Forward `bytes` more bytes (both directions together), then reset every connection.
    pub fn cut_after(&self, bytes: u64) {
        self.state
            .cut
            .store(i64::try_from(bytes).unwrap_or(i64::MAX), Ordering::SeqCst);
    }

    /// Connections accepted so far (a reconnect storm shows here).
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Relaxed)
    }

    /// After a client gave up: connections accepted so far, and how many more arrive within
    /// `quiet` (a client that keeps reconnecting after reporting an error shows here).
    pub async fn attempts_then_reconnects(&self, quiet: std::time::Duration) -> (u64, u64) {
        let attempts = self.accepted();
        tokio::time::sleep(quiet).await;
        (attempts, self.accepted() - attempts)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        reset_all(&self.state);
    }
}

fn reset_all(st: &State) {
    for [a, b] in st.conns.lock().drain(..) {
        a.abort();
        b.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    st: Arc<State>,
) {
    let mut mode = st.mode.subscribe();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // Hold: read nothing, so the sender's own buffers fill and it stalls, like a partition.
        if *mode.borrow_and_update() == Mode::Hold {
            if mode.changed().await.is_err() {
                return;
            }
            continue;
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = mode.changed() => continue,
        };
        let mut chunk = &buf[..n];
        let now = *mode.borrow();
        match now {
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Bandwidth(bps) => {
                tokio::time::sleep(Duration::from_secs_f64(n as f64 / bps.max(1) as f64)).await;
            }
            Mode::Pass | Mode::Hold => {}
        }
        // Wait out a Hold that began while this chunk was in hand.
        while *mode.borrow() == Mode::Hold {
            if mode.changed().await.is_err() {
                return;
            }
        }
        let mut cut_now = false;
        let budget = st.cut.load(Ordering::SeqCst);
        if budget >= 0 {
            let take = (budget as usize).min(chunk.len());
            st.cut.fetch_sub(take as i64, Ordering::SeqCst);
            chunk = &chunk[..take];
            cut_now = st.cut.load(Ordering::SeqCst) <= 0;
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
        if cut_now {
            st.cut.store(-1, Ordering::SeqCst);
            reset_all(&st);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn pass_hold_and_reset() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        c.write_all(b"ping").await.expect("write");
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.expect("echo");
        assert_eq!(&got, b"ping");

        proxy.set(Mode::Hold);
        c.write_all(b"held").await.expect("write");
        let r = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut got)).await;
        assert!(r.is_err(), "nothing passes while held");
        proxy.set(Mode::Pass);
        c.read_exact(&mut got).await.expect("released");
        assert_eq!(&got, b"held", "held bytes arrive intact once released");

        proxy.reset();
        let mut one = [0u8; 1];
        let r = c.read(&mut one).await;
        assert!(
            matches!(r, Ok(0)) || r.is_err(),
            "reset closes the connection: {r:?}"
        );
        assert_eq!(proxy.accepted(), 1);
    }

    #[tokio::test]
    async fn cut_after_forwards_exactly_that_many_bytes() {
        let proxy = FaultProxy::start(echo_server().await).await.expect("proxy");
        let mut c = TcpStream::connect(proxy.addr()).await.expect("connect");
        // 5 bytes upstream + 5 echoed back = 10: allow 7, so the echo is cut after 2 bytes.
        proxy.cut_after(7);
        c.write_all(b"hello").await.expect("write");
        let mut got = Vec::new();
        let _ = c.read_to_end(&mut got).await;
        assert_eq!(got, b"he");
    }
}
