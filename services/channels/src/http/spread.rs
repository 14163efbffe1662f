//! Several HTTP/2 connections to one provider, filled one after another.
//!
//! One HTTP/2 connection carries at most the streams its server allows at once (APNs
//! advertises up to 1,000; hyper's default is 200), and all of them go through one
//! connection task on each side, so one connection bounds a busy worker. A light load
//! keeps to the first connection (as Apple asks: reuse connections, do not churn them);
//! a burst spills onto the next one once a connection has [`STREAMS_PER_CONNECTION`]
//! requests in flight. Each `reqwest::Client` holds its own connection pool, so one
//! client per slot is one connection per slot.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests in flight on one connection before the next one is used.
pub const STREAMS_PER_CONNECTION: usize = 250;

/// Connections at most.
pub const MAX_CONNECTIONS: usize = 4;

/// Clients to spread requests over.
#[derive(Debug)]
pub struct Spread {
    clients: Vec<(reqwest::Client, AtomicUsize)>,
}

/// A request's slot on one connection, released when dropped.
#[derive(Debug)]
pub struct Slot<'a> {
    client: &'a reqwest::Client,
    in_flight: &'a AtomicUsize,
}

impl Slot<'_> {
    /// The client of this slot's connection.
    pub fn client(&self) -> &reqwest::Client {
        self.client
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Spread {
    /// `MAX_CONNECTIONS` clients built by `build`.
    ///
    /// # Errors
    /// The first error of `build`.
    pub fn new<E>(mut build: impl FnMut() -> Result<reqwest::Client, E>) -> Result<Self, E> {
        let clients = (0..MAX_CONNECTIONS)
            .map(|_| Ok((build()?, AtomicUsize::new(0))))
            .collect::<Result<_, E>>()?;
        Ok(Self { clients })
    }

    /// The first connection with room, or the least busy one when all are full.
    pub fn slot(&self) -> Slot<'_> {
        let mut least = 0;
        let mut least_load = usize::MAX;
        for (i, (_, in_flight)) in self.clients.iter().enumerate() {
            let load = in_flight.load(Ordering::Relaxed);
            if load < STREAMS_PER_CONNECTION {
                least = i;
                break;
            }
            if load < least_load {
                least = i;
                least_load = load;
            }
        }
        let (client, in_flight) = &self.clients[least];
        in_flight.fetch_add(1, Ordering::Relaxed);
        Slot { client, in_flight }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fills_the_first_connection_then_spills_over() {
        let spread =
            Spread::new(|| Ok::<_, reqwest::Error>(reqwest::Client::new())).expect("clients");
        let first: Vec<_> = (0..STREAMS_PER_CONNECTION).map(|_| spread.slot()).collect();
        assert!(
            first
                .iter()
                .all(|s| std::ptr::eq(s.in_flight, &spread.clients[0].1)),
            "a light load keeps to one connection"
        );
        let next = spread.slot();
        assert!(std::ptr::eq(next.in_flight, &spread.clients[1].1));
        drop(first);
        let again = spread.slot();
        assert!(
            std::ptr::eq(again.in_flight, &spread.clients[0].1),
            "freed slots are reused first"
        );
    }
}
