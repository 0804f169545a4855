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
//! - no lost wake-up: each side checks the shared state under the lock
//!   before it waits, and the other side notifies after every change with
//!   `notify_one`, which keeps a permit when nobody waits yet;
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
        state: Mutex::new(State { items: VecDeque::new(), receiver_closed: false, sender_gone: false }),
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
        drop(state);
        self.shared.to_receiver.notify_one();
        Ok(())
    }

    /// Wait until there is room for one item (`true`) or the receiver
    /// closed (`false`). With one sender, the room stays until it sends.
    pub async fn room(&self) -> bool {
        loop {
            {
                let state = self.shared.state.lock();
                if state.receiver_closed {
                    return false;
                }
                if state.items.len() < self.shared.capacity {
                    return true;
                }
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
        while !self.is_closed() {
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
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => self.shared.to_receiver.notified().await,
            }
        }
    }

    /// The next item if one is queued now.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        let mut state = self.shared.state.lock();
        match state.items.pop_front() {
            Some(item) => {
                drop(state);
                self.shared.to_sender.notify_one();
                Ok(item)
            }
            None if state.sender_gone => Err(TryRecvError::Disconnected),
            None => Err(TryRecvError::Empty),
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
    async fn a_cancelled_receive_loses_nothing() {
        let (tx, mut rx) = bounded(4);
        // A receive given up while waiting ...
        assert!(tokio::time::timeout(Duration::from_millis(1), rx.recv()).await.is_err());
        tx.try_send(7).unwrap();
        // ... leaves the next one to get the item.
        assert_eq!(rx.recv().await, Some(7));
    }
}
