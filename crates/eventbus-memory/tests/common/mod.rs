//! What the propagation tests share: a topic of envelopes and a topic of raw
//! records, each with a handler that keeps what it is given.

use eventbus_core::{Event, EventBus, EventBusExt, HandlerError, Message, TopicConfig};
use eventbus_memory::MemoryEventBus;
use std::sync::{Arc, Mutex};

/// What the handlers of [`collect`] were given.
pub(crate) struct Seen {
    pub(crate) events: Arc<Mutex<Vec<Event>>>,
    pub(crate) raw: Arc<Mutex<Vec<Message>>>,
}

/// Configure `events` and `raw` on `bus` and subscribe a handler to each that
/// keeps what it is given: envelopes on `events`, raw records on `raw`.
pub(crate) async fn collect(bus: &MemoryEventBus, events: &str, raw: &str) -> Seen {
    for topic in [events, raw] {
        bus.configure_topic(topic, TopicConfig::default())
            .await
            .unwrap();
    }
    let seen = Seen {
        events: Arc::default(),
        raw: Arc::default(),
    };
    let s = seen.events.clone();
    bus.subscribe_envelope(events, move |e: Event| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(e);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
    let s = seen.raw.clone();
    bus.subscribe(raw, move |m: Message| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(m);
            Ok::<(), HandlerError>(())
        }
    })
    .await
    .unwrap();
    seen
}
