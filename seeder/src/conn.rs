//! Connection limits for the seeder's listener: caps per source address and overall (counted
//! from accept to close), the idle timeout, the minimum request-body rate, the file-descriptor
//! limit they need, and the tallies of what was refused, logged once per interval. The TLS
//! listener (`tls::serve`) applies them; this module holds the rules and their bookkeeping.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use axum::body::{Body, Bytes};
use std::future::Future;

use hyper::body::{Frame, SizeHint};
use tokio::sync::Notify;

use crate::proxy_protocol::Cidr;

/// Open files kept free for everything that is not a connection: the store, artifacts being
/// served, the campaign files, the runtime.
pub const FD_RESERVE: u64 = 256;

/// How often refusals and accept errors are summarised in the log.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What `seeder serve` allows a connection; the flags of `seeder serve` fill it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnLimits {
    /// From accept to the end of the TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/1.1: from waiting for a request head to having all of it (also between keep-alive
    /// requests, since hyper starts this timer whenever it waits for a head).
    pub header_timeout: Duration,
    /// No request in flight for this long closes the connection. A request in flight (a
    /// long-poll, an event stream) keeps it open: the caps still count it.
    pub idle_timeout: Duration,
    /// A request body may take this long plus one second per `min_body_rate` bytes received.
    pub body_timeout: Duration,
    /// Bytes per second a request body must keep up after `body_timeout`.
    pub min_body_rate: u64,
    /// Open connections from one source address.
    pub max_per_source: usize,
    /// Open connections overall.
    pub max_total: usize,
    /// Load balancers: connections from these ranges must start with a PROXY v2 header, whose
    /// source is then the connection's source; nobody else may send one.
    pub proxy_from: Vec<Cidr>,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            min_body_rate: 1024,
            max_per_source: 256,
            max_total: 16_384,
            proxy_from: Vec::new(),
        }
    }
}

/// Raises the soft open-file limit to the hard one and checks that the overall cap fits in it.
/// Returns the limit now in force.
pub fn raise_fd_limit(limits: &ConnLimits) -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let current = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (current.current, current.maximum) {
        if soft < hard {
            if let Err(e) = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: Some(hard),
                    maximum: Some(hard),
                },
            ) {
                tracing::warn!(soft, hard, error = %e, "could not raise the open-file limit");
            }
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    let need = limits.max_total as u64 + FD_RESERVE;
    match now {
        Some(limit) if limit < need => bail!(
            "--max-connections {} plus {FD_RESERVE} files for the store and artifacts needs {need} open files, \
             but this process may open at most {limit} (RLIMIT_NOFILE hard limit): raise it \
             (LimitNOFILE= in the unit) or lower --max-connections",
            limits.max_total
        ),
        Some(limit) => Ok(limit),
        None => Ok(u64::MAX),
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    Total,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    per_source: HashMap<IpAddr, usize>,
}

/// The connection caps: a connection holds a [`Slot`] from accept to close.
#[derive(Debug)]
pub struct Gate {
    max_per_source: usize,
    max_total: usize,
    open: Mutex<Open>,
}

impl Gate {
    pub fn new(limits: &ConnLimits) -> Arc<Self> {
        Arc::new(Self {
            max_per_source: limits.max_per_source,
            max_total: limits.max_total,
            open: Mutex::new(Open::default()),
        })
    }

    /// Takes a place under the overall cap and, with a `source`, under its per-source cap; a
    /// connection from a load balancer is admitted without one until its PROXY header names it.
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Result<Slot, Refusal> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if open.total >= self.max_total {
            return Err(Refusal::Total);
        }
        if let Some(source) = source {
            self.count_source(&mut open, source)?;
        }
        open.total += 1;
        Ok(Slot {
            gate: self.clone(),
            source,
        })
    }

    fn count_source(&self, open: &mut Open, source: IpAddr) -> Result<(), Refusal> {
        let n = open.per_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            if *n == 0 {
                open.per_source.remove(&source);
            }
            return Err(Refusal::PerSource);
        }
        *n += 1;
        Ok(())
    }
}

/// One admitted connection; dropping it frees its place under both caps.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    source: Option<IpAddr>,
}

impl Slot {
    /// Counts a connection admitted without a source (from a load balancer) under `source`.
    pub fn attribute(&mut self, source: IpAddr) -> Result<(), Refusal> {
        if self.source.is_some() {
            return Ok(());
        }
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        self.gate.count_source(&mut open, source)?;
        self.source = Some(source);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|e| e.into_inner());
        open.total = open.total.saturating_sub(1);
        let Some(source) = self.source else { return };
        if let Some(n) = open.per_source.get_mut(&source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.per_source.remove(&source);
            }
        }
    }
}

/// Counts of what the listener refused or failed at since the last summary; a flood makes one
/// log line per interval, not one per connection.
#[derive(Debug, Default)]
pub struct Tally {
    refused_per_source: AtomicU64,
    refused_total: AtomicU64,
    accept_errors: AtomicU64,
    last_accept_error: Mutex<Option<String>>,
}

impl Tally {
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::PerSource => &self.refused_per_source,
            Refusal::Total => &self.refused_total,
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    pub fn accept_error(&self, e: &std::io::Error) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
        *self
            .last_accept_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
    }

    /// Logs and resets what was counted since the last call.
    pub fn flush(&self) {
        let per_source = self.refused_per_source.swap(0, Ordering::Relaxed);
        let total = self.refused_total.swap(0, Ordering::Relaxed);
        if per_source + total > 0 {
            tracing::warn!(
                per_source_cap = per_source,
                overall_cap = total,
                interval_secs = LOG_INTERVAL.as_secs(),
                "connections closed at accept by the connection caps"
            );
        }
        let errors = self.accept_errors.swap(0, Ordering::Relaxed);
        if errors > 0 {
            let last = self
                .last_accept_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .unwrap_or_default();
            tracing::warn!(
                count = errors,
                last_error = %last,
                interval_secs = LOG_INTERVAL.as_secs(),
                "accept failed; backing off"
            );
        }
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
#[derive(Debug)]
pub struct Activity {
    base: Instant,
    in_flight: AtomicUsize,
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            base: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    /// Marks a request in flight until the returned guard (carried by its response body) drops.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    /// When the connection becomes idle for `idle`; None while a request is in flight.
    pub fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
        Some(self.base + since + idle)
    }
}

#[derive(Debug)]
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let ms = self.0.base.elapsed().as_millis() as u64;
        self.0.idle_since_ms.store(ms, Ordering::SeqCst);
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its request counted in flight until it is sent or dropped (an
/// event stream is in flight as long as it streams).
#[derive(Debug)]
pub struct Tracked {
    inner: Body,
    _in_flight: InFlight,
}

impl Tracked {
    pub fn new(inner: Body, in_flight: InFlight) -> Self {
        Self {
            inner,
            _in_flight: in_flight,
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The request body was slower than the minimum rate.
#[derive(Debug, thiserror::Error)]
#[error("request body slower than {rate} bytes/s after {grace:?} ({received} bytes received)")]
pub struct TooSlow {
    rate: u64,
    grace: Duration,
    received: u64,
}

/// A request body that must arrive within `body_timeout` plus one second per `min_body_rate`
/// bytes; when it falls behind, the handler sees an error and `cut` tells the connection to close.
#[derive(Debug)]
pub struct RateLimited<B> {
    inner: B,
    started: tokio::time::Instant,
    received: u64,
    grace: Duration,
    rate: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
    cut: Arc<Notify>,
}

impl<B> RateLimited<B> {
    pub fn new(inner: B, limits: &ConnLimits, cut: Arc<Notify>) -> Self {
        let started = tokio::time::Instant::now();
        Self {
            inner,
            started,
            received: 0,
            grace: limits.body_timeout,
            rate: limits.min_body_rate.max(1),
            timer: Box::pin(tokio::time::sleep_until(started + limits.body_timeout)),
            cut,
        }
    }

    fn deadline(&self) -> tokio::time::Instant {
        let allowance = Duration::from_secs_f64(self.received as f64 / self.rate as f64);
        self.started + self.grace + allowance
    }

    fn too_slow(&self) -> TooSlow {
        self.cut.notify_one();
        TooSlow {
            rate: self.rate,
            grace: self.grace,
            received: self.received,
        }
    }
}

impl<B> hyper::body::Body for RateLimited<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.received += data.len() as u64;
                }
                let deadline = this.deadline();
                if tokio::time::Instant::now() >= deadline {
                    return Poll::Ready(Some(Err(this.too_slow().into())));
                }
                this.timer.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.timer.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(this.too_slow().into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_count_per_source_and_overall_and_free_on_drop() {
        let limits = ConnLimits {
            max_per_source: 2,
            max_total: 3,
            ..ConnLimits::default()
        };
        let gate = Gate::new(&limits);
        let a: IpAddr = "127.0.78.1".parse().unwrap();
        let b: IpAddr = "127.0.78.2".parse().unwrap();
        let a1 = gate.admit(Some(a)).unwrap();
        let _a2 = gate.admit(Some(a)).unwrap();
        assert_eq!(gate.admit(Some(a)).unwrap_err(), Refusal::PerSource);
        let mut balanced = gate.admit(None).unwrap();
        assert_eq!(balanced.attribute(a).unwrap_err(), Refusal::PerSource);
        assert_eq!(gate.admit(Some(b)).unwrap_err(), Refusal::Total);
        drop(a1);
        balanced.attribute(a).unwrap();
        drop(balanced);
        assert!(
            gate.admit(Some(a)).is_ok(),
            "a closed connection frees its place"
        );
    }

    #[test]
    fn idle_deadline_waits_for_requests_in_flight() {
        let activity = Activity::new();
        let idle = Duration::from_secs(5);
        assert!(activity.idle_deadline(idle).is_some());
        let guard = activity.begin();
        assert_eq!(activity.idle_deadline(idle), None);
        drop(guard);
        let d = activity.idle_deadline(idle).unwrap();
        assert!(d > Instant::now() + Duration::from_secs(4));
    }
}
