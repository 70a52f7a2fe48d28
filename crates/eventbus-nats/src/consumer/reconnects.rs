//! The client's reconnects, as a consume turn waits for the next one: a pull
//! request does not survive a reconnect, so a turn ends on it and the loop
//! re-reads from the ack floor.
//!
//! Invariant: a closed watch (the client gone for good) never wakes a turn.

use tokio::sync::watch;

/// The client's next reconnect. Once the watch is closed (its sender lives in
/// the client's event callback, dropped when the connection handler ends for
/// good: reconnects given up, or the client closed) no reconnect can come any
/// more, and this never completes: a closed watch's `changed()` is ready at
/// once on every poll, which would make the consume loop end its turn, re-take
/// the consumer and come back, over and over.
pub(super) async fn next_reconnect(reconnects: &mut watch::Receiver<u64>) {
    if reconnects.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn a_closed_reconnect_watch_never_fires() {
        let (tx, mut rx) = watch::channel(0u64);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "no reconnect yet"
        );
        tx.send_modify(|n| *n += 1);
        assert!(
            next_reconnect(&mut rx).now_or_never().is_some(),
            "a reconnect"
        );
        assert!(
            next_reconnect(&mut rx).now_or_never().is_none(),
            "already seen"
        );
        drop(tx);
        // What the consume loop used to select on: ready at once, on every poll.
        assert!(matches!(rx.clone().changed().now_or_never(), Some(Err(_))));
        for _ in 0..3 {
            assert!(
                next_reconnect(&mut rx).now_or_never().is_none(),
                "a closed watch must not wake the consume loop"
            );
        }
    }

    /// The consume loop's shape: a biased `select!` with the reconnect watch
    /// beside the work. With the watch closed, the loop turns once per piece of
    /// work and then parks, instead of turning on the watch without end.
    #[tokio::test]
    async fn a_select_loop_parks_on_a_closed_reconnect_watch() {
        let (tx, mut rx) = watch::channel(0u64);
        drop(tx);
        let (work_tx, mut work_rx) = tokio::sync::mpsc::channel::<u32>(4);
        for i in 0..3 {
            work_tx.try_send(i).expect("room");
        }
        drop(work_tx);
        let (mut turns, mut reconnects, mut handled) = (0u32, 0u32, 0u32);
        loop {
            // A spinning loop would never end without this bound.
            assert!(turns < 100, "the loop spins: {reconnects} reconnects seen");
            turns += 1;
            tokio::select! {
                biased;
                () = next_reconnect(&mut rx) => reconnects += 1,
                w = work_rx.recv() => match w {
                    Some(_) => handled += 1,
                    None => break,
                },
            }
        }
        assert_eq!((turns, reconnects, handled), (4, 0, 3));
    }
}
