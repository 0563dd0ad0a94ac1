//! The two hand-offs between a [`StreamPublisher`](super::StreamPublisher)'s
//! callers and its collector task, made for one message at a time at
//! full speed:
//!
//! - [`Slots`], the in-flight bound: a counter a publish takes from with
//!   one compare-and-swap and the collector gives back to in bulk. It
//!   replaced a `tokio::sync::Semaphore`, whose every release took its
//!   waiters' lock (about 470 instructions a message with the permit's
//!   `Arc`, callgrind). It keeps the semaphore's one ordering promise
//!   that matters here: a flush waiting for every slot holds back later
//!   publishes. Publishes waiting for a slot are no longer served first
//!   come, first served; whichever is polled first after a give-back
//!   takes it.
//! - [`Handoff`], the sent messages on their way to the collector: a
//!   vector behind a lock, taken whole by the collector, which is woken
//!   only when it was empty. It replaced an unbounded channel (about 630
//!   instructions a message: per-slot atomics, a block allocation every
//!   32 messages, three copies of each job).

use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::sync::Notify;

use crate::core::error::{Error, Result};
use crate::core::sync::lock;

/// The in-flight bound of a pipelined publisher. See the module docs.
#[derive(Debug)]
pub(crate) struct Slots {
    max: usize,
    free: AtomicUsize,
    /// Flushes waiting for every slot: publishes wait while one does.
    flushing: AtomicUsize,
    /// Publishes and flushes waiting for a change.
    waiting: AtomicUsize,
    closed: AtomicBool,
    changed: Notify,
}

impl Slots {
    /// `max` free slots.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            free: AtomicUsize::new(max),
            flushing: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// `max` slots, none free until they are given back (by whoever
    /// makes ready what a publish needs first).
    pub(crate) fn opening_later(max: usize) -> Self {
        let slots = Self::new(max);
        slots.free.store(0, Ordering::Relaxed);
        slots
    }

    /// How many slots there are.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// Takes a slot, waiting while none is free or a flush waits.
    ///
    /// # Errors
    /// [`Error::Closed`] once the collector has ended.
    pub(crate) async fn take(&self) -> Result<Slot<'_>> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::Closed);
        }
        if !self.try_take() {
            self.wait_until(Self::try_take).await?;
        }
        Ok(Slot { slots: Some(self) })
    }

    /// Waits until every slot is free (every message sent so far has its
    /// outcome counted), holding back publishes meanwhile; at once when
    /// the collector has ended.
    pub(crate) async fn flush(&self) {
        self.flushing.fetch_add(1, Ordering::SeqCst);
        let _flushing = Flushing(self);
        let all_free = |s: &Self| s.free.load(Ordering::SeqCst) == s.max;
        let _ = self.wait_until(all_free).await;
    }

    /// Gives `n` slots back (their messages' outcomes are counted).
    pub(crate) fn give_back(&self, n: usize) {
        if n > 0 {
            self.free.fetch_add(n, Ordering::SeqCst);
            self.wake();
        }
    }

    /// The collector has ended: waiters and later takers get
    /// [`Error::Closed`].
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn try_take(&self) -> bool {
        if self.flushing.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let mut free = self.free.load(Ordering::SeqCst);
        while free > 0 {
            match self.free.compare_exchange_weak(
                free,
                free - 1,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return true,
                Err(now) => free = now,
            }
        }
        false
    }

    /// Wakes every waiter, if there is one. (A waiter counts itself before
    /// it checks, and a change is stored before this reads the count, both
    /// sequentially consistent: either the waiter sees the change or this
    /// sees the waiter.)
    fn wake(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.changed.notify_waiters();
        }
    }

    /// Waits until `ready` (checked after every change) holds.
    async fn wait_until(&self, ready: impl Fn(&Self) -> bool) -> Result<()> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiting);
        loop {
            let mut notified = pin!(self.changed.notified());
            // Registered before the checks, so no change between them is
            // missed.
            notified.as_mut().enable();
            if self.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            if ready(self) {
                return Ok(());
            }
            notified.await;
        }
    }
}

/// A taken slot: given back when dropped, unless [`handed`](Self::handed)
/// to the collector with its message.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    slots: Option<&'a Slots>,
}

impl Slot<'_> {
    /// The message is with the collector, which gives the slot back once
    /// its outcome is counted.
    pub(crate) fn handed(mut self) {
        self.slots = None;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(slots) = self.slots {
            slots.give_back(1);
        }
    }
}

/// One waiter, counted while it waits (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A flush in progress: publishes it held back may go on after it.
struct Flushing<'a>(&'a Slots);

impl Drop for Flushing<'_> {
    fn drop(&mut self) {
        self.0.flushing.fetch_sub(1, Ordering::SeqCst);
        self.0.wake();
    }
}

/// Items on their way from any number of senders to one receiver. See
/// the module docs.
pub(crate) struct Handoff<T> {
    queue: Mutex<Queue<T>>,
    receiver: AtomicWaker,
}

struct Queue<T> {
    items: Vec<T>,
    closed: bool,
}

impl<T> std::fmt::Debug for Handoff<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = lock(&self.queue);
        f.debug_struct("Handoff")
            .field("queued", &queue.items.len())
            .field("closed", &queue.closed)
            .finish()
    }
}

impl<T> Handoff<T> {
    pub(crate) fn new() -> Self {
        Self {
            queue: Mutex::new(Queue {
                items: Vec::new(),
                closed: false,
            }),
            receiver: AtomicWaker::new(),
        }
    }

    /// Hands `item` over; back once closed.
    pub(crate) fn send(&self, item: T) -> std::result::Result<(), T> {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return Err(item);
        }
        let was_empty = queue.items.is_empty();
        queue.items.push(item);
        drop(queue);
        // Woken once per batch: the receiver takes all there is.
        if was_empty {
            self.receiver.wake();
        }
        Ok(())
    }

    /// Nothing more is sent (the receiver still takes what was).
    pub(crate) fn close(&self) {
        lock(&self.queue).closed = true;
        self.receiver.wake();
    }

    /// Moves everything sent so far into `into` (empty: the two vectors
    /// swap): `Ready(true)`; `Ready(false)` once closed and empty.
    pub(crate) fn poll_take(&self, cx: &mut Context<'_>, into: &mut Vec<T>) -> Poll<bool> {
        self.receiver.register(cx.waker());
        let mut queue = lock(&self.queue);
        if !queue.items.is_empty() {
            into.clear();
            std::mem::swap(&mut queue.items, into);
            Poll::Ready(true)
        } else if queue.closed {
            Poll::Ready(false)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    #[tokio::test]
    async fn slots_bound_what_is_taken_and_a_flush_holds_later_takers_back() {
        let slots = Slots::new(2);
        let a = slots.take().await.expect("open");
        let b = slots.take().await.expect("open");
        assert!(slots.take().now_or_never().is_none(), "none free");
        drop(a);
        let c = slots
            .take()
            .now_or_never()
            .expect("one free")
            .expect("open");
        // A flush waits for b and c; a take made meanwhile waits for it.
        let mut flush = Box::pin(slots.flush());
        assert!(flush.as_mut().now_or_never().is_none());
        b.handed();
        slots.give_back(1);
        drop(c);
        let mut later = Box::pin(slots.take());
        assert!(later.as_mut().now_or_never().is_none(), "held back");
        assert!(flush.as_mut().now_or_never().is_some(), "every slot free");
        drop(flush);
        assert!(later.now_or_never().expect("free again").is_ok());
        slots.close();
        assert!(slots.take().await.is_err());
    }

    /// Slots that open later (the publisher's, until its ack inbox is
    /// subscribed): nothing is taken and no flush ends before they are
    /// given back.
    #[test]
    fn slots_opening_later_hold_takers_and_flushes_until_given_back() {
        let slots = Slots::opening_later(2);
        assert_eq!(slots.max(), 2);
        let mut take = Box::pin(slots.take());
        let mut flush = Box::pin(slots.flush());
        assert!(take.as_mut().now_or_never().is_none(), "not open yet");
        assert!(flush.as_mut().now_or_never().is_none(), "not open yet");
        slots.give_back(slots.max());
        assert!(flush.as_mut().now_or_never().is_some(), "every slot free");
        drop(flush);
        let taken = take.now_or_never().expect("open").expect("not closed");
        taken.handed();
        assert!(slots.take().now_or_never().is_some(), "the second slot");
    }

    /// A taker already waiting (counted as such) is woken by a give-back
    /// made on another task; a lost wake-up fails on the time limit
    /// instead of hanging.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_waiting_taker_is_woken_by_a_give_back_from_another_task() {
        let slots = std::sync::Arc::new(Slots::new(1));
        let held = slots.take().await.expect("open");
        held.handed();
        let waiter = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.take().await.map(Slot::handed) })
        };
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while slots.waiting.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the taker never waited"
            );
            tokio::task::yield_now().await;
        }
        let giver = slots.clone();
        tokio::spawn(async move { giver.give_back(1) });
        let taken = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(taken, Ok(Ok(Ok(())))), "{taken:?}");
    }

    #[test]
    fn a_handoff_gives_everything_sent_in_order_then_ends_once_closed() {
        let handoff = Handoff::new();
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let mut got = Vec::new();
        assert!(handoff.poll_take(&mut cx, &mut got).is_pending());
        for i in 0..3 {
            assert!(handoff.send(i).is_ok());
        }
        assert_eq!(handoff.poll_take(&mut cx, &mut got), Poll::Ready(true));
        assert_eq!(got, [0, 1, 2]);
        assert!(handoff.send(3).is_ok());
        handoff.close();
        assert_eq!(handoff.send(4), Err(4), "refused once closed");
        assert_eq!(handoff.poll_take(&mut cx, &mut got), Poll::Ready(true));
        assert_eq!(got, [3]);
        assert_eq!(handoff.poll_take(&mut cx, &mut got), Poll::Ready(false));
    }
}
