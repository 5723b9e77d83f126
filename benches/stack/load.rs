//! The load generator: HTTP/1.1 requests through HAProxy with hyper, either one connection per
//! request (`Connection: close`, the way a fresh client or a health checker arrives) or over
//! long-lived keep-alive connections (a browser, a service calling another). Every request is
//! bounded in time; a request fails with a socket error (no complete answer: refused, reset,
//! cut, timed out) or with a non-2xx answer, and both are counted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

/// The longest one request (connect + answer) may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How many failures a report keeps the text of.
const KEPT_ERRORS: usize = 5;

/// Why a request got no complete answer.
#[derive(Debug)]
pub struct SocketError(pub String);

/// The answer to one request.
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    /// The first word of the body: the backends answer `<name> <path>`.
    pub fn backend(&self) -> &str {
        std::str::from_utf8(&self.body)
            .unwrap_or_default()
            .split(' ')
            .next()
            .unwrap_or_default()
    }
}

fn request(path: &str, close: bool) -> Request<Empty<Bytes>> {
    let mut builder = Request::get(path).header(hyper::header::HOST, "127.0.0.1");
    if close {
        builder = builder.header(hyper::header::CONNECTION, "close");
    }
    builder.body(Empty::new()).expect("a GET with a valid path")
}

async fn connect(port: u16) -> Result<SendRequest<Empty<Bytes>>, SocketError> {
    let stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|error| SocketError(format!("connect: {error}")))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| SocketError(format!("handshake: {error}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

async fn exchange(
    sender: &mut SendRequest<Empty<Bytes>>,
    path: &str,
    close: bool,
) -> Result<Answer, SocketError> {
    let response = sender
        .send_request(request(path, close))
        .await
        .map_err(|error| SocketError(format!("request: {error}")))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| SocketError(format!("body: {error}")))?
        .to_bytes();
    Ok(Answer { status, body })
}

/// `GET <path>` through HAProxy on 127.0.0.1:`port` on a new connection (`Connection: close`).
pub async fn get_once(port: u16, path: &str) -> Result<Answer, SocketError> {
    let attempt = async {
        let mut sender = connect(port).await?;
        exchange(&mut sender, path, true).await
    };
    tokio::time::timeout(REQUEST_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err(SocketError("timed out".into())))
}

/// Whether `path` answers 200 through HAProxy now.
pub async fn served(port: u16, path: &str) -> bool {
    get_once(port, path)
        .await
        .is_ok_and(|answer| answer.status == StatusCode::OK)
}

/// What one load run counted.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Requests that got an answer or failed (not those cut short by the end of the run).
    pub requests: u64,
    pub non_2xx: u64,
    pub socket_errors: u64,
    /// Keep-alive connections found closed between two requests (HAProxy closed an idle one,
    /// or answered `Connection: close`); the next request went on a new connection. Not a
    /// failure.
    pub reconnects: u64,
    pub elapsed: Duration,
    /// The first few failures, for the reader.
    pub examples: Vec<String>,
}

impl LoadReport {
    fn add(&mut self, other: LoadReport) {
        self.requests += other.requests;
        self.non_2xx += other.non_2xx;
        self.socket_errors += other.socket_errors;
        self.reconnects += other.reconnects;
        for example in other.examples {
            if self.examples.len() < KEPT_ERRORS {
                self.examples.push(example);
            }
        }
    }

    fn record(&mut self, result: Result<Answer, SocketError>) {
        self.requests += 1;
        let failure = match result {
            Ok(answer) if answer.status.is_success() => None,
            Ok(answer) => {
                self.non_2xx += 1;
                Some(format!("answered {}", answer.status))
            }
            Err(SocketError(why)) => {
                self.socket_errors += 1;
                Some(why)
            }
        };
        if let Some(failure) = failure {
            if self.examples.len() < KEPT_ERRORS {
                self.examples.push(failure.chars().take(120).collect());
            }
        }
    }

    /// Requests per second over the run.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Which kind of client a [`Load`] runs.
#[derive(Debug, Clone, Copy)]
pub enum ClientKind {
    /// A new connection per request, `Connection: close`.
    Close,
    /// One keep-alive connection per task, reopened when HAProxy closes it.
    KeepAlive,
}

/// Clients sending `GET <path>` through HAProxy as fast as they are answered, until
/// [`finish`](Load::finish).
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: JoinSet<LoadReport>,
    started: Instant,
}

impl Load {
    /// Starts `clients` concurrent clients of `kind`.
    pub fn start(kind: ClientKind, port: u16, path: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = JoinSet::new();
        for _ in 0..clients {
            let stop = stop.clone();
            let path = path.to_string();
            match kind {
                ClientKind::Close => tasks.spawn(close_client(port, path, stop)),
                ClientKind::KeepAlive => tasks.spawn(keep_alive_client(port, path, stop)),
            };
        }
        Load {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    /// Stops the clients (each finishes the request it is in) and adds up what they counted.
    pub async fn finish(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = LoadReport::default();
        while let Some(report) = self.tasks.join_next().await {
            total.add(report.expect("a load client does not panic"));
        }
        total.elapsed = self.started.elapsed();
        total
    }
}

async fn close_client(port: u16, path: String, stop: Arc<AtomicBool>) -> LoadReport {
    let mut report = LoadReport::default();
    while !stop.load(Ordering::Relaxed) {
        report.record(get_once(port, &path).await);
    }
    report
}

async fn keep_alive_client(port: u16, path: String, stop: Arc<AtomicBool>) -> LoadReport {
    let mut report = LoadReport::default();
    let mut connection: Option<SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let mut sender = match connection.take() {
            Some(mut sender) => {
                // Closed since the last answer: a new connection, as any client would open.
                if sender.ready().await.is_err() {
                    report.reconnects += 1;
                    continue;
                }
                sender
            }
            None => match tokio::time::timeout(REQUEST_TIMEOUT, connect(port)).await {
                Ok(Ok(sender)) => sender,
                Ok(Err(error)) => {
                    report.record(Err(error));
                    continue;
                }
                Err(_) => {
                    report.record(Err(SocketError("connect timed out".into())));
                    continue;
                }
            },
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut sender, &path, false))
            .await
            .unwrap_or_else(|_| Err(SocketError("timed out".into())));
        if result.is_ok() {
            connection = Some(sender);
        }
        report.record(result);
    }
    report
}
