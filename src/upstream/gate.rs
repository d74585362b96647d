//! The bounds on one endpoint's HTTP/1.1 connections (`max_connections`, `max_connecting`)
//! and the line of requests waiting for one (`max_waiting`, `wait_timeout`): what keeps a
//! storm of clients from becoming a storm of connection attempts on a backend (nginx's
//! upstream `max_conns` and `queue`, Envoy's `max_connections` and `max_pending_requests`).
//!
//! A request that finds no idle connection opens one when both bounds allow; otherwise it
//! joins the line, first come first served: a connection given back goes straight to the
//! first waiter (never through the idle pool, where a newcomer could take it), and room
//! made by a connection that closed or an attempt that ended becomes a permit to connect,
//! handed to the first waiter too. Past `max_waiting` waiters, or after `wait_timeout` in
//! line, the request is refused with [`Busy`] (a 503 `upstream_busy`), never sent.
//!
//! The fast path (a connection idle, nobody waiting) reads one atomic; the line's lock is
//! only taken while the endpoint is at its bounds.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tokio::time::Instant;

pub use crate::error::{Busy, Refused};
use crate::routes::ConnLimits;

/// What a waiter is handed: a connection given back, or room to open one.
pub enum Grant<T: 'static> {
    Conn(T),
    Dial(Dial<T>),
}

/// Room for one connection attempt and the connection it opens. Dropped, both are given
/// back; [`Dial::opened`] keeps the connection's part as a [`Slot`].
pub struct Dial<T: 'static> {
    gate: Option<Arc<Gate<T>>>,
}

impl<T> Dial<T> {
    /// The attempt succeeded: the attempt's room is given back, the connection's is kept
    /// until the returned slot is dropped (when the connection closes).
    pub fn opened(mut self) -> Slot<T> {
        let gate = self.gate.take();
        if let Some(g) = &gate {
            g.dialing.fetch_sub(1, Ordering::AcqRel);
            g.freed();
        }
        Slot { gate }
    }
}

impl<T> Drop for Dial<T> {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take() {
            g.dialing.fetch_sub(1, Ordering::AcqRel);
            g.open.fetch_sub(1, Ordering::AcqRel);
            g.freed();
        }
    }
}

/// One open connection's place under `max_connections`, held by its task.
pub struct Slot<T: 'static> {
    gate: Option<Arc<Gate<T>>>,
}

impl<T> Drop for Slot<T> {
    fn drop(&mut self) {
        if let Some(g) = self.gate.take() {
            g.open.fetch_sub(1, Ordering::AcqRel);
            g.freed();
        }
    }
}

/// One endpoint's bounds and line.
pub struct Gate<T: 'static> {
    limits: ConnLimits,
    /// Connections open or being opened.
    open: AtomicUsize,
    /// Connection attempts under way.
    dialing: AtomicUsize,
    /// Requests in line (mirrors the live entries of `line`, read without its lock).
    waiting: AtomicUsize,
    line: Mutex<VecDeque<oneshot::Sender<Grant<T>>>>,
    /// Requests refused, by [`Busy`].
    refused: [AtomicU64; 2],
}

/// A place in line; leaving it (answered, timed out, or the client gone) counts it out.
struct Place<'g, T: 'static>(&'g Gate<T>);

impl<T> Drop for Place<'_, T> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<T: 'static> Gate<T> {
    pub fn new(limits: ConnLimits) -> Arc<Self> {
        Arc::new(Gate {
            limits,
            open: AtomicUsize::new(0),
            dialing: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            line: Mutex::new(VecDeque::new()),
            refused: Default::default(),
        })
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Connections open or being opened, attempts under way, requests waiting.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.open.load(Ordering::Acquire),
            self.dialing.load(Ordering::Acquire),
            self.waiting.load(Ordering::Acquire),
        )
    }

    /// Requests refused since the endpoint was made: line full, waited too long.
    pub fn refused(&self) -> [u64; 2] {
        self.refused.each_ref().map(|n| n.load(Ordering::Relaxed))
    }

    fn refuse(&self, why: Busy) -> Busy {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
        why
    }

    /// Whether a request may take an idle connection now: nobody is waiting before it.
    pub fn no_line(&self) -> bool {
        self.waiting.load(Ordering::Acquire) == 0
    }

    /// Room to open a connection, if both bounds allow one more.
    pub fn try_dial(self: &Arc<Self>) -> Option<Dial<T>> {
        let room = |max: usize| move |n: usize| (n < max).then_some(n + 1);
        let l = self.limits;
        self.dialing
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, room(l.max_connecting))
            .ok()?;
        if self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, room(l.max_connections))
            .is_err()
        {
            // No room after all: give the attempt back (a waiter may use it once a
            // connection closes; the close hands it over).
            self.dialing.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Dial {
            gate: Some(self.clone()),
        })
    }

    /// A connection given back: to the first waiter if anyone waits, else returned for the
    /// idle pool.
    pub fn give_back(&self, conn: T) -> Option<T> {
        if self.no_line() {
            return Some(conn);
        }
        match self.hand_over(Grant::Conn(conn)) {
            Some(Grant::Conn(c)) => Some(c),
            _ => None,
        }
    }

    /// Room was made (an attempt ended, a connection closed): a permit to connect for the
    /// first waiter, if the bounds allow one.
    fn freed(self: &Arc<Self>) {
        if self.no_line() || self.line().is_empty() {
            return;
        }
        if let Some(dial) = self.try_dial() {
            // Nobody took it (every waiter left meanwhile, the line is empty now): dropping
            // it frees the room again, which finds the empty line and stops.
            drop(self.hand_over(Grant::Dial(dial)));
        }
    }

    fn line(&self) -> std::sync::MutexGuard<'_, VecDeque<oneshot::Sender<Grant<T>>>> {
        self.line.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `grant` to the first waiter still there; back when there is none.
    fn hand_over(&self, mut grant: Grant<T>) -> Option<Grant<T>> {
        let mut line = self.line();
        while let Some(w) = line.pop_front() {
            match w.send(grant) {
                Ok(()) => return None,
                Err(back) => grant = back,
            }
        }
        Some(grant)
    }

    /// Waits in line for a connection or room to open one, until `wait_timeout` (or
    /// `deadline`, if sooner). `ready` is asked once the place is taken (a connection given
    /// back in the instant before, or room freed then, would otherwise be missed).
    pub async fn wait(
        self: &Arc<Self>,
        deadline: Option<Instant>,
        ready: impl FnOnce(&Arc<Self>) -> Option<Grant<T>>,
    ) -> Result<Grant<T>, Busy> {
        let (tx, rx) = oneshot::channel();
        let _place = {
            let mut line = self.line();
            if self.waiting.load(Ordering::Acquire) >= self.limits.max_waiting {
                return Err(self.refuse(Busy::LineFull));
            }
            if line.len() >= self.limits.max_waiting {
                // Places of requests that left without being served.
                line.retain(|w| !w.is_closed());
            }
            line.push_back(tx);
            self.waiting.fetch_add(1, Ordering::AcqRel);
            Place(self)
        };
        if let Some(g) = ready(self) {
            return Ok(g);
        }
        let until = Instant::now() + self.limits.wait_timeout;
        let until = deadline.map_or(until, |d| d.min(until));
        match tokio::time::timeout_at(until, rx).await {
            Ok(Ok(grant)) => Ok(grant),
            // The gate went away with its endpoint (a reload): the request was never sent.
            Ok(Err(_)) | Err(_) => Err(self.refuse(Busy::Waited)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(max_connections: usize, max_connecting: usize, max_waiting: usize) -> ConnLimits {
        ConnLimits {
            max_connections,
            max_connecting,
            max_waiting,
            wait_timeout: Duration::from_millis(200),
        }
    }

    #[test]
    fn dials_within_both_bounds_only() {
        let g = Gate::<u32>::new(limits(3, 2, 10));
        let a = g.try_dial().expect("first");
        let b = g.try_dial().expect("second");
        assert!(g.try_dial().is_none(), "two attempts at most");
        let a = a.opened();
        let c = g.try_dial().expect("an attempt ended");
        let _b = b.opened();
        assert!(g.try_dial().is_none(), "three connections at most");
        assert_eq!(g.counts(), (3, 1, 0));
        drop(a);
        drop(c);
        assert_eq!(g.counts(), (1, 0, 0));
    }

    #[tokio::test]
    async fn a_connection_given_back_goes_to_the_first_waiter() {
        let g = Gate::<u32>::new(limits(1, 1, 10));
        let _slot = g.try_dial().expect("room").opened();
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.wait(None, |_| None).await }
        });
        while g.counts().2 == 0 {
            tokio::task::yield_now().await;
        }
        let second = tokio::spawn({
            let g = g.clone();
            async move { g.wait(None, |_| None).await }
        });
        while g.counts().2 < 2 {
            tokio::task::yield_now().await;
        }
        assert!(g.give_back(7).is_none(), "handed over, not pooled");
        assert!(matches!(first.await.unwrap(), Ok(Grant::Conn(7))));
        assert!(g.give_back(8).is_none());
        assert!(matches!(second.await.unwrap(), Ok(Grant::Conn(8))));
        assert_eq!(g.give_back(9), Some(9), "nobody waits: back to the pool");
    }

    #[tokio::test]
    async fn a_closed_connection_is_room_for_the_first_waiter() {
        let g = Gate::<u32>::new(limits(1, 1, 10));
        let slot = g.try_dial().expect("room").opened();
        let waiter = tokio::spawn({
            let g = g.clone();
            async move {
                g.wait(None, |_| None)
                    .await
                    .map(|g| matches!(g, Grant::Dial(_)))
            }
        });
        while g.counts().2 == 0 {
            tokio::task::yield_now().await;
        }
        drop(slot);
        assert_eq!(waiter.await.unwrap(), Ok(true));
        assert_eq!(
            g.counts(),
            (0, 0, 0),
            "the permit was dropped with the task's result"
        );
    }

    #[tokio::test]
    async fn without_a_line_a_request_at_the_bounds_is_refused_at_once() {
        let g = Gate::<u32>::new(limits(1, 1, 0));
        let _slot = g.try_dial().expect("room").opened();
        let started = Instant::now();
        assert_eq!(g.wait(None, |_| None).await.err(), Some(Busy::LineFull));
        assert!(started.elapsed() < Duration::from_millis(100));
        assert_eq!(g.refused(), [1, 0]);
        let said = Refused {
            why: Busy::LineFull,
            max_connections: 1,
            max_waiting: 0,
            wait_timeout: Duration::from_secs(5),
        }
        .to_string();
        assert!(said.contains("max_waiting = 0"), "{said}");
    }

    #[tokio::test]
    async fn the_line_is_bounded_in_length_and_time() {
        let g = Gate::<u32>::new(limits(1, 1, 1));
        let _slot = g.try_dial().expect("room").opened();
        let first = tokio::spawn({
            let g = g.clone();
            async move { g.wait(None, |_| None).await.err() }
        });
        while g.counts().2 == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(g.wait(None, |_| None).await.err(), Some(Busy::LineFull));
        let started = Instant::now();
        assert_eq!(first.await.unwrap(), Some(Busy::Waited));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(g.counts().2, 0, "a waiter that left is counted out");
    }
}
