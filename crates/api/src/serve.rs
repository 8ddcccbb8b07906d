//! The HTTP/1.1 server loop, with the connection hygiene `axum::serve` leaves out:
//!
//! - a header read timeout: a client must send a request's complete headers within it, and a
//!   kept-alive connection may stay idle between requests no longer than it (hyper starts the
//!   timer whenever it waits for a request head);
//! - a cap on open connections: at the cap, the oldest connection with no request in progress
//!   is closed to make room, so idle or half-open sockets (which never authenticated) cannot
//!   keep a keyed client out, and file descriptors stay bounded;
//! - a bounded graceful shutdown: requests in progress get a grace period, then connections are
//!   dropped.
//!
//! Request bodies have their own read timeout ([`crate::hygiene`]), as the head timeout ends
//! where the body begins.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tower::ServiceExt;

/// Limits of the server loop.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    /// Time to send a request's complete headers, and the longest a kept-alive connection may
    /// stay idle between requests.
    pub header_timeout: Duration,
    /// Open connections at most; at the cap the oldest idle one is closed for each new one.
    pub max_connections: usize,
    /// How long shutdown lets requests in progress finish before dropping their connections.
    pub shutdown_grace: Duration,
}

/// One open connection, as the accept loop sees it.
struct Conn {
    /// Requests being served on it (0 = idle: waiting for a request head).
    in_flight: Arc<AtomicUsize>,
    /// Asks the connection to close once its request in progress (if any) is answered.
    close: Arc<Notify>,
    /// Already asked to close (it no longer counts against the cap).
    closing: bool,
}

/// Open connections by acceptance order (the smallest id is the oldest).
type ConnTable = Arc<Mutex<BTreeMap<u64, Conn>>>;

/// Serves `app` on `listener` until `shutdown` completes, then lets requests in progress
/// finish for at most `options.shutdown_grace`.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()>,
) {
    let table: ConnTable = Arc::new(Mutex::new(BTreeMap::new()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut next_id = 0u64;
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if !make_room(&table, options.max_connections) {
            tracing::warn!(
                max_connections = options.max_connections,
                "connection refused: every open connection has a request in progress"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let id = next_id;
        next_id += 1;
        let conn = Conn {
            in_flight: Arc::new(AtomicUsize::new(0)),
            close: Arc::new(Notify::new()),
            closing: false,
        };
        let (in_flight, close) = (conn.in_flight.clone(), conn.close.clone());
        lock(&table).insert(id, conn);
        let (app, table, stop) = (app.clone(), table.clone(), stop_rx.clone());
        tokio::spawn(async move {
            serve_connection(stream, app, options.header_timeout, in_flight, close, stop).await;
            lock(&table).remove(&id);
        });
    }
    // New connections are refused from now on (clients retry against the next server), rather
    // than left waiting in the backlog until the process exits.
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + options.shutdown_grace;
    while !lock(&table).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = lock(&table).len();
    if left > 0 {
        tracing::warn!(
            connections = left,
            "shutdown grace period over; dropping connections"
        );
    }
}

/// Makes room for one more connection: below the cap, nothing to do; at it, asks the oldest
/// idle connection to close. False when every connection has a request in progress.
fn make_room(table: &ConnTable, max: usize) -> bool {
    let mut table = lock(table);
    let open = table.values().filter(|c| !c.closing).count();
    if open < max {
        return true;
    }
    let oldest_idle = table
        .values_mut()
        .find(|c| !c.closing && c.in_flight.load(Ordering::Acquire) == 0);
    match oldest_idle {
        Some(conn) => {
            conn.closing = true;
            conn.close.notify_one();
            true
        }
        None => false,
    }
}

async fn serve_connection(
    stream: tokio::net::TcpStream,
    app: Router,
    header_timeout: Duration,
    in_flight: Arc<AtomicUsize>,
    close: Arc<Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let service = tower::service_fn(move |req: Request<Incoming>| {
        let busy = InFlight::new(in_flight.clone());
        let response = app.clone().oneshot(req.map(Body::new));
        async move {
            let response = response.await;
            drop(busy);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            () = close.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            changed = stop.changed(), if !closing => {
                if changed.is_err() || *stop.borrow() {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Counts a request in progress on its connection for as long as it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        InFlight(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
