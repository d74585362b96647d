//! A bounded copy of a body as it streams past, for the shadow comparison. Frames are kept as
//! `Bytes` handles (no copy); past `max` bytes, or when the process-wide budget is spent, the
//! copy is dropped and the comparison is skipped. The stream itself is never delayed, changed
//! or failed by the tee.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use tokio::sync::oneshot;

/// Bytes held by every tee and shadow leg of the process, together.
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Budget {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            max,
        })
    }

    fn reserve(self: &Arc<Self>, n: usize, held: &mut Reservation) -> bool {
        let ok = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                u.checked_add(n).filter(|&t| t <= self.max)
            })
            .is_ok();
        if ok {
            held.bytes += n;
        }
        ok
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// Bytes reserved from a [`Budget`], released on drop.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A captured body and the budget it holds.
pub struct Held {
    pub bytes: Bytes,
    /// Trailer fields that ended the body (gRPC's `grpc-status`), if any.
    pub trailers: Option<HeaderMap>,
    _reservation: Reservation,
}

impl Held {
    /// A body that needs no budget (empty).
    pub fn empty(budget: &Arc<Budget>) -> Self {
        Held {
            bytes: Bytes::new(),
            trailers: None,
            _reservation: Reservation {
                budget: budget.clone(),
                bytes: 0,
            },
        }
    }
}

/// What the tee saw.
pub enum Captured {
    Body(Held),
    /// Over `max` or over the budget: not compared.
    TooLarge,
}

/// Where a tee's copy goes.
enum Deliver {
    /// To a waiting shadow leg.
    Channel(oneshot::Sender<Captured>),
    /// To a function, called once: with the copy, or `None` when the body ended early (a
    /// tee dropped before its end). For the stale store, which nothing waits on.
    Call(Box<dyn FnOnce(Option<Captured>) + Send>),
}

impl Deliver {
    fn send(self, c: Captured) {
        match self {
            Deliver::Channel(tx) => {
                let _ = tx.send(c);
            }
            Deliver::Call(f) => f(Some(c)),
        }
    }
}

/// The capturing side, carried by a body.
pub struct Tee {
    parts: Vec<Bytes>,
    /// Boxed: rare (gRPC), and bodies carrying a tee stay small.
    trailers: Option<Box<HeaderMap>>,
    len: usize,
    max: usize,
    held: Reservation,
    tx: Option<Deliver>,
}

impl Drop for Tee {
    fn drop(&mut self) {
        if let Some(Deliver::Call(f)) = self.tx.take() {
            f(None);
        }
    }
}

impl Tee {
    pub fn new(max: usize, budget: &Arc<Budget>) -> (Tee, oneshot::Receiver<Captured>) {
        let (tx, rx) = oneshot::channel();
        (Tee::to(max, budget, Deliver::Channel(tx)), rx)
    }

    /// A tee whose copy is handed to `f` (once; `None` when the body ends early).
    pub fn calling(
        max: usize,
        budget: &Arc<Budget>,
        f: impl FnOnce(Option<Captured>) + Send + 'static,
    ) -> Tee {
        Tee::to(max, budget, Deliver::Call(Box::new(f)))
    }

    fn to(max: usize, budget: &Arc<Budget>, tx: Deliver) -> Tee {
        Tee {
            parts: Vec::new(),
            trailers: None,
            len: 0,
            max,
            held: Reservation {
                budget: budget.clone(),
                bytes: 0,
            },
            tx: Some(tx),
        }
    }

    /// Records a frame's data.
    pub fn push(&mut self, data: &Bytes) {
        if self.tx.is_none() || data.is_empty() {
            return;
        }
        // Nobody waits for the copy any more (a shadow leg that gave up, a retry copy whose
        // attempt is over): stop copying and give the bytes back.
        if matches!(&self.tx, Some(Deliver::Channel(tx)) if tx.is_closed()) {
            self.tx = None;
            self.give_up();
            return;
        }
        let budget = self.held.budget.clone();
        if self.len + data.len() > self.max || !budget.reserve(data.len(), &mut self.held) {
            self.give_up();
            if let Some(tx) = self.tx.take() {
                tx.send(Captured::TooLarge);
            }
            return;
        }
        self.len += data.len();
        self.parts.push(data.clone());
    }

    /// Drops what was copied and its share of the budget at once, not when the body ends.
    fn give_up(&mut self) {
        self.parts = Vec::new();
        let empty = Reservation {
            budget: self.held.budget.clone(),
            bytes: 0,
        };
        drop(std::mem::replace(&mut self.held, empty));
    }

    /// Records the trailer fields (they end the body; `finish` follows). Small: bounded by
    /// the header size limits of the connection they came on.
    pub fn trailers(&mut self, trailers: &HeaderMap) {
        if self.tx.is_some() {
            self.trailers = Some(Box::new(trailers.clone()));
        }
    }

    /// Records a frame: its data, or its trailers.
    pub fn frame(&mut self, frame: &http_body::Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.push(data);
        } else if let Some(t) = frame.trailers_ref() {
            self.trailers(t);
        }
    }

    /// Whether the copy was handed over or given up.
    pub fn is_done(&self) -> bool {
        self.tx.is_none()
    }

    /// The body ended: hands the copy over.
    pub fn finish(&mut self) {
        let Some(tx) = self.tx.take() else { return };
        let bytes = match self.parts.len() {
            0 => Bytes::new(),
            1 => self.parts.pop().unwrap_or_default(),
            _ => {
                let mut joined = BytesMut::with_capacity(self.len);
                self.parts
                    .drain(..)
                    .for_each(|p| joined.extend_from_slice(&p));
                joined.freeze()
            }
        };
        let empty = Reservation {
            budget: self.held.budget.clone(),
            bytes: 0,
        };
        let held = std::mem::replace(&mut self.held, empty);
        tx.send(Captured::Body(Held {
            bytes,
            trailers: self.trailers.take().map(|t| *t),
            _reservation: held,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_up_to_max_and_releases_the_budget() {
        let budget = Budget::new(100);
        let (mut tee, mut rx) = Tee::new(10, &budget);
        tee.push(&Bytes::from_static(b"hello "));
        tee.push(&Bytes::from_static(b"you"));
        tee.finish();
        let Ok(Captured::Body(held)) = rx.try_recv() else {
            panic!("no body")
        };
        assert_eq!(held.bytes, "hello you");
        assert_eq!(budget.used(), 9);
        drop(held);
        assert_eq!(budget.used(), 0);
        drop(tee);
    }

    #[test]
    fn over_max_or_over_budget_is_too_large() {
        let budget = Budget::new(8);
        let (mut tee, mut rx) = Tee::new(100, &budget);
        tee.push(&Bytes::from_static(b"12345"));
        tee.push(&Bytes::from_static(b"6789"));
        assert!(matches!(rx.try_recv(), Ok(Captured::TooLarge)));
        drop(tee);
        assert_eq!(budget.used(), 0);
        let (mut tee, mut rx) = Tee::new(4, &budget);
        tee.push(&Bytes::from_static(b"12345"));
        tee.finish();
        assert!(matches!(rx.try_recv(), Ok(Captured::TooLarge)));
    }

    #[test]
    fn a_copy_nobody_waits_for_stops_and_gives_its_bytes_back() {
        let budget = Budget::new(100);
        let (mut tee, rx) = Tee::new(100, &budget);
        tee.push(&Bytes::from_static(b"12345"));
        assert_eq!(budget.used(), 5);
        drop(rx);
        tee.push(&Bytes::from_static(b"6789"));
        assert_eq!(budget.used(), 0, "released when the receiver went away");
        assert!(tee.is_done());
        // Past the cap, the reservation goes at once too.
        let (mut tee, _rx) = Tee::new(4, &budget);
        tee.push(&Bytes::from_static(b"123"));
        tee.push(&Bytes::from_static(b"45"));
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_tee_dropped_before_the_end_sends_nothing() {
        let budget = Budget::new(100);
        let (mut tee, mut rx) = Tee::new(100, &budget);
        tee.push(&Bytes::from_static(b"partial"));
        drop(tee);
        assert!(rx.try_recv().is_err());
        assert_eq!(budget.used(), 0);
    }
}
