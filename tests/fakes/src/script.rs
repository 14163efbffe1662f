//! Scripted answers: a queue of replies a fake gives before its normal behaviour.

use axum::body::Body;
use axum::response::Response;
use http::{HeaderName, HeaderValue, StatusCode};
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Answer with this status, headers and body.
    Respond {
        /// HTTP status.
        status: u16,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Raw body.
        body: Vec<u8>,
    },
    /// Never answer (the client's timeout must fire).
    Hang,
}

impl Reply {
    /// A status with an empty body.
    pub fn status(status: u16) -> Self {
        Self::raw(status, Vec::new())
    }

    /// A status with a raw body (e.g. garbage).
    pub fn raw(status: u16, body: impl Into<Vec<u8>>) -> Self {
        Self::Respond {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// A status with a JSON body.
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Self::raw(status, body.to_string()).header("content-type", "application/json")
    }

    /// Adds a header.
    #[must_use]
    pub fn header(mut self, name: &str, value: &str) -> Self {
        if let Self::Respond { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    /// Turns the reply into a response, or waits forever for [`Reply::Hang`].
    pub async fn into_response(self) -> Response {
        match self {
            Self::Hang => std::future::pending().await,
            Self::Respond {
                status,
                headers,
                body,
            } => {
                let mut response = Response::new(Body::from(body));
                *response.status_mut() =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                for (name, value) in headers {
                    if let (Ok(n), Ok(v)) =
                        (HeaderName::try_from(name), HeaderValue::try_from(value))
                    {
                        response.headers_mut().append(n, v);
                    }
                }
                response
            }
        }
    }
}

/// The queue of scripted replies of one fake, and how long it takes to answer.
#[derive(Debug, Default)]
pub struct Script {
    queue: Mutex<VecDeque<Reply>>,
    latency_us: AtomicU64,
}

impl Script {
    /// Answers the next `times` requests with `reply`.
    pub fn push(&self, times: usize, reply: Reply) {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.extend(std::iter::repeat_n(reply, times));
    }

    /// The reply for the current request, if one is scripted.
    pub fn take(&self) -> Option<Reply> {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
    }

    /// Every answer from now on takes `latency` (a provider's processing time: requests
    /// are still received and recorded at once, only the answer waits).
    pub fn set_latency(&self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency_us.store(us, Ordering::Relaxed);
    }

    /// Waits out the configured latency (none by default).
    pub async fn latency(&self) {
        let us = self.latency_us.load(Ordering::Relaxed);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

/// What a fake received, in order — or, once [`Log::count_only`] is set, only how many
/// (a benchmark sends hundreds of thousands of requests and reads nothing but the count;
/// keeping each would grow the fake by a kilobyte a request and bill the worker under
/// test for the fake's page faults).
#[derive(Debug)]
pub struct Log<T> {
    items: Mutex<Vec<T>>,
    count: AtomicUsize,
    count_only: AtomicBool,
}

impl<T> Default for Log<T> {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::new()),
            count: AtomicUsize::new(0),
            count_only: AtomicBool::new(false),
        }
    }
}

impl<T: Clone> Log<T> {
    /// Appends one request.
    pub fn push(&self, item: T) {
        self.record(|| item);
    }

    /// Counts one request, and keeps the one `item` builds unless only counting.
    pub fn record(&self, item: impl FnOnce() -> T) {
        if !self.count_only.load(Ordering::Relaxed) {
            let item = item();
            self.items
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(item);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// From now on, counts requests without keeping them.
    pub fn count_only(&self) {
        self.count_only.store(true, Ordering::Relaxed);
    }

    /// How many so far.
    pub fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Nothing so far.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything kept so far.
    pub fn all(&self) -> Vec<T> {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
