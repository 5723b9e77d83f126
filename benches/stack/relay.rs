//! A counting TCP relay on loopback, put between flow-proxy and its registry: it forwards bytes
//! unchanged and counts the connections it carries and the HTTP/1.1 requests flow-proxy sends
//! (request heads parsed with `httparse`, bodies skipped by `Content-Length`). It needs nothing
//! from the product: flow-proxy is simply given the relay's address as `--consul-address`.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What the relay has seen.
#[derive(Default)]
pub struct Counters {
    /// Connections open now.
    open: AtomicUsize,
    /// Connections accepted so far.
    accepted: AtomicUsize,
    /// Request heads seen so far.
    requests: AtomicUsize,
    /// Connections whose requests could not be followed (a chunked body, a head that does not
    /// parse): their later requests are not counted.
    unfollowed: AtomicUsize,
}

/// A running relay; it stops (and cuts its connections) when dropped.
pub struct CountingRelay {
    address: SocketAddr,
    counters: Arc<Counters>,
    _tasks: JoinSet<()>,
}

impl CountingRelay {
    /// Listens on 127.0.0.1 (an ephemeral port) and relays each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> CountingRelay {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the relay");
        let address = listener.local_addr().expect("relay address");
        let counters = Arc::new(Counters::default());
        let mut tasks = JoinSet::new();
        let shared = counters.clone();
        tasks.spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        shared.accepted.fetch_add(1, Ordering::Relaxed);
                        connections.spawn(relay(client, upstream, shared.clone()));
                    }
                    // Reap finished connections so the set does not grow.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        CountingRelay {
            address,
            counters,
            _tasks: tasks,
        }
    }

    /// `127.0.0.1:<port>`, as `--consul-address` takes it.
    pub fn address(&self) -> String {
        self.address.to_string()
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    pub fn open_connections(&self) -> usize {
        self.counters.open.load(Ordering::Relaxed)
    }

    pub fn accepted_connections(&self) -> usize {
        self.counters.accepted.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> usize {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn unfollowed_connections(&self) -> usize {
        self.counters.unfollowed.load(Ordering::Relaxed)
    }
}

/// Decrements the open count when a relayed connection ends, however it ends.
struct OpenGuard(Arc<Counters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, counters: Arc<Counters>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    counters.open.fetch_add(1, Ordering::Relaxed);
    let _guard = OpenGuard(counters.clone());
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upward = async {
        let mut counter = RequestCounter::default();
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            let read = match client_read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => read,
            };
            let requests = counter.feed(&buffer[..read]);
            counters.requests.fetch_add(requests, Ordering::Relaxed);
            if server_write.write_all(&buffer[..read]).await.is_err() {
                break;
            }
        }
        if counter.lost {
            counters.unfollowed.fetch_add(1, Ordering::Relaxed);
        }
        let _ = server_write.shutdown().await;
    };
    let downward = async {
        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
    };
    tokio::join!(upward, downward);
}

/// Follows one connection's client-to-server bytes request by request.
#[derive(Default)]
struct RequestCounter {
    pending: Vec<u8>,
    /// Body bytes still to skip before the next request head.
    body_left: usize,
    /// The stream could not be followed any more.
    lost: bool,
}

impl RequestCounter {
    /// Takes the next bytes; returns how many request heads they completed.
    fn feed(&mut self, bytes: &[u8]) -> usize {
        if self.lost {
            return 0;
        }
        self.pending.extend_from_slice(bytes);
        let mut heads = 0;
        loop {
            if self.body_left > 0 {
                let skipped = self.body_left.min(self.pending.len());
                self.pending.drain(..skipped);
                self.body_left -= skipped;
                if self.body_left > 0 {
                    return heads;
                }
            }
            if self.pending.is_empty() {
                return heads;
            }
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&self.pending) {
                Ok(httparse::Status::Complete(length)) => {
                    heads += 1;
                    let mut body = 0;
                    for header in request.headers.iter() {
                        if header.name.eq_ignore_ascii_case("content-length") {
                            body = std::str::from_utf8(header.value)
                                .ok()
                                .and_then(|value| value.trim().parse().ok())
                                .unwrap_or(0);
                        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
                            self.lost = true;
                        }
                    }
                    self.pending.drain(..length);
                    self.body_left = body;
                    if self.lost {
                        self.pending.clear();
                        return heads;
                    }
                }
                Ok(httparse::Status::Partial) => return heads,
                Err(_) => {
                    self.lost = true;
                    self.pending.clear();
                    return heads;
                }
            }
        }
    }
}
