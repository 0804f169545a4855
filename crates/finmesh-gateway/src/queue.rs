//! A bounded single-producer, single-consumer queue that allocates nothing
//! until its first item: one subscriber's frames (see [`crate::subscribe`]).
//!
//! Why not `tokio::sync::mpsc`: a bounded tokio channel allocates its first
//! block of 32 slots (~1.6 KiB of 48-byte frames) and cache-padded shared
//! state when it is made, and keeps them while the subscriber idles; tens of
//! thousands of idle subscribers pay that for nothing. Here the items sit
//! in a `VecDeque` (no allocation while empty) behind a short lock, and the
//! two sides wake each other with a [`Notify`] each.
//!
//! Invariants:
//! - at most `capacity` items are queued; [`Sender::try_send`] never waits
//!   and gives the item back when the queue is full or the receiver closed;
//! - once the receiver closed (or dropped) nothing more is accepted; once
//!   the sender dropped, the receiver gets what is queued, then the end;
//! - no lost wake-up: a side that is about to wait says so in the shared
//!   state under the same lock in which it found nothing to do, and the
//!   other side, after a change, notifies it with `notify_one` (which keeps
//!   a permit when the waiter has not started waiting yet). A side that
//!   is not waiting is not notified: a busy subscriber draining its queue
//!   costs no wake-up per item (the hub pushes every frame to every
//!   subscriber, so this is per delivery);
//! - every wait is cancel-safe: an item is taken or given in one step
//!   under the lock, never across an `.await`.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

struct State<T> {
    items: VecDeque<T>,
    /// The receiver closed or went away: nothing more is accepted.
    receiver_closed: bool,
    /// The sender went away: the receiver ends once the queue is empty.
    sender_gone: bool,
    /// The receiver found the queue empty and waits (or is about to).
    receiver_waits: bool,
    /// The sender found no room, or waits for the receiver to close.
    sender_waits: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Wakes the receiver: an item came, or the sender went away.
    to_receiver: Notify,
    /// Wakes the sender: room was made, or the receiver closed.
    to_sender: Notify,
}

/// A queue of at most `capacity` (at least 1) items.
pub fn bounded<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::new(),
            receiver_closed: false,
            sender_gone: false,
            receiver_waits: false,
            sender_waits: false,
        }),
        capacity: capacity.max(1),
        to_receiver: Notify::new(),
        to_sender: Notify::new(),
    });
    (Sender { shared: shared.clone() }, Receiver { shared })
}

/// The writing end (one per queue).
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Sender<T> {
    /// Queue `item` now, or give it back: the queue is full or closed.
    #[cfg(test)]
    pub fn try_send(&self, item: T) -> Result<(), T> {
        self.try_send_counted(item, |_| {})
    }

    /// [`try_send`](Self::try_send), calling `on_queued` with the item
    /// once it is certain to be queued and before the receiver can take it
    /// (under the queue's lock: keep it short), so that accounting done
    /// there always precedes the receiver's.
    pub fn try_send_counted(&self, item: T, on_queued: impl FnOnce(&T)) -> Result<(), T> {
        let mut state = self.shared.state.lock();
        if state.receiver_closed || state.items.len() >= self.shared.capacity {
            return Err(item);
        }
        on_queued(&item);
        state.items.push_back(item);
        let wake = std::mem::take(&mut state.receiver_waits);
        drop(state);
        if wake {
            self.shared.to_receiver.notify_one();
        }
        Ok(())
    }

    /// Wait until there is room for one item (`true`) or the receiver
    /// closed (`false`). With one sender, the room stays until it sends.
    pub async fn room(&self) -> bool {
        loop {
            {
                let mut state = self.shared.state.lock();
                if state.receiver_closed {
                    return false;
                }
                if state.items.len() < self.shared.capacity {
                    return true;
                }
                state.sender_waits = true;
            }
            self.shared.to_sender.notified().await;
        }
    }

    /// Whether the receiver closed or went away.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().receiver_closed
    }

    /// Resolves once the receiver closed or went away.
    pub async fn closed(&self) {
        loop {
            {
                let mut state = self.shared.state.lock();
                if state.receiver_closed {
                    return;
                }
                state.sender_waits = true;
            }
            self.shared.to_sender.notified().await;
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        self.shared.state.lock().sender_gone = true;
        self.shared.to_receiver.notify_one();
    }
}

/// Why [`Receiver::try_recv`] returned nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing queued; the sender may send more.
    Empty,
    /// Nothing queued and the sender went away.
    Disconnected,
}

/// The reading end (one per queue).
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Receiver<T> {
    /// The next item, or `None` once the sender went away and the queue is empty.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            match self.take(true) {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.shared.to_receiver.notified().await,
            }
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.take(false)
    }

    /// Take the next item; on an empty queue, say that the receiver waits
    /// when `will_wait`.
    fn take(&mut self, will_wait: bool) -> Result<T, TryRecvError> {
        let mut state = self.shared.state.lock();
        match state.items.pop_front() {
            Some(item) => {
                let wake = std::mem::take(&mut state.sender_waits);
                drop(state);
                if wake {
                    self.shared.to_sender.notify_one();
                }
                Ok(item)
            }
            None if state.sender_gone => Err(TryRecvError::Disconnected),
            None => {
                state.receiver_waits |= will_wait;
                Err(TryRecvError::Empty)
            }
        }
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.shared.state.lock().items.is_empty()
    }

    /// Accept nothing more; what is queued can still be received.
    pub fn close(&mut self) {
        self.shared.state.lock().receiver_closed = true;
        self.shared.to_sender.notify_one();
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::FutureExt;

    use super::*;

    #[test]
    fn nothing_is_allocated_until_the_first_item() {
        let (tx, rx) = bounded::<u64>(1024);
        assert_eq!(rx.shared.state.lock().items.capacity(), 0);
        tx.try_send(1).unwrap();
        assert!(rx.shared.state.lock().items.capacity() > 0);
    }

    #[tokio::test]
    async fn bounded_in_items_and_closed_by_the_receiver() {
        let (tx, mut rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert_eq!(tx.try_send(3), Err(3), "full");
        assert_eq!(rx.recv().await, Some(1));
        tx.try_send(3).unwrap();
        rx.close();
        assert!(tx.is_closed());
        assert_eq!(tx.try_send(4), Err(4), "closed");
        assert!(!tx.room().await);
        tx.closed().await;
        assert_eq!(rx.try_recv(), Ok(2), "what was queued is still received");
        assert_eq!(rx.try_recv(), Ok(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
        drop(tx);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn each_side_wakes_the_other() {
        let (tx, mut rx) = bounded(1);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(i) = rx.recv().await {
                got.push(i);
            }
            got
        });
        for i in 0..1000 {
            assert!(tx.room().await, "the receiver is there");
            tx.try_send(i).unwrap();
        }
        drop(tx);
        assert_eq!(reader.await.unwrap(), (0..1000).collect::<Vec<_>>());

        let (tx, rx) = bounded::<u8>(1);
        let waiter = tokio::spawn(async move { tx.closed().await });
        tokio::task::yield_now().await;
        drop(rx);
        tokio::time::timeout(Duration::from_secs(10), waiter).await.expect("woken by the drop").unwrap();
    }

    #[tokio::test]
    async fn a_side_that_does_not_wait_is_not_notified() {
        let (tx, mut rx) = bounded(8);
        tx.try_send(1).unwrap();
        tx.try_send(2).unwrap();
        assert!(rx.shared.to_receiver.notified().now_or_never().is_none(), "nobody waited: no permit kept");
        assert_eq!(rx.try_recv(), Ok(1));
        assert!(rx.shared.to_sender.notified().now_or_never().is_none(), "the sender did not wait");
        assert_eq!(rx.recv().await, Some(2));
        // Now the receiver waits: the next item wakes it.
        let reader = tokio::spawn(async move { rx.recv().await });
        while !tx.shared.state.lock().receiver_waits {
            tokio::task::yield_now().await;
        }
        tx.try_send(3).unwrap();
        assert_eq!(reader.await.unwrap(), Some(3));
    }

    /// Both sides waiting on each other across threads, a small queue:
    /// nothing is lost or reordered and nobody sleeps forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_across_threads() {
        let (tx, mut rx) = bounded(3);
        let reader = tokio::spawn(async move {
            let mut next = 0u32;
            while let Some(i) = rx.recv().await {
                assert_eq!(i, next);
                next += 1;
                if next.is_multiple_of(1000) {
                    tokio::task::yield_now().await;
                }
            }
            next
        });
        for i in 0..200_000u32 {
            while tx.try_send(i).is_err() {
                assert!(tx.room().await, "the receiver is there");
            }
        }
        drop(tx);
        let got = tokio::time::timeout(Duration::from_secs(60), reader).await.expect("no lost wake-up").unwrap();
        assert_eq!(got, 200_000);
    }

    #[tokio::test]
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = bounded(4);
        // A receive given up while waiting ...
        assert!(tokio::time::timeout(Duration::from_millis(1), rx.recv()).await.is_err());
        tx.try_send(7).unwrap();
        // ... leaves the next one to get the item.
        assert_eq!(rx.recv().await, Some(7));
    }
}
