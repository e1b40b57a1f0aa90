//! The daemon's event fan-out: a ring of recent events for `--since`, and a broadcast for
//! the live streams.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use tokio::sync::{broadcast, watch};

use super::{unix_nanos, Change, Event};

/// Recent events kept for `--since` (older ones are gone; a 10k-endpoint burst rolls them).
/// About 400 bytes each: held for the daemon's life, so kept small beside the view itself.
pub const BUFFERED_EVENTS: usize = 1024;
/// How far one live reader may fall behind before it is told it missed events.
pub const LIVE_BACKLOG: usize = 4096;

/// Stamps the view's changes and hands them out. One per daemon; the watcher publishes.
pub struct EventHub {
    /// Held while publishing and while subscribing, so a new subscriber's replay and its
    /// live receiver meet without a gap or a duplicate.
    recent: Mutex<VecDeque<Arc<Event>>>,
    live: broadcast::Sender<Arc<Event>>,
    /// Set when the daemon stops: every stream ends, so the API's graceful shutdown does
    /// not wait on readers that would never hang up.
    closed: watch::Sender<bool>,
}

/// A new reader's start: the buffered events it asked for, then the live ones.
pub struct Subscription {
    pub replay: Vec<Arc<Event>>,
    pub live: broadcast::Receiver<Arc<Event>>,
    pub closed: watch::Receiver<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        EventHub::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        EventHub {
            recent: Mutex::new(VecDeque::with_capacity(BUFFERED_EVENTS)),
            live: broadcast::channel(LIVE_BACKLOG).0,
            closed: watch::channel(false).0,
        }
    }

    /// Ends every stream (the daemon is stopping).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Publishes one batch's changes, all stamped with the time of this call.
    pub fn publish(&self, changes: impl IntoIterator<Item = Change>) {
        let now = SystemTime::now();
        let time = humantime::format_rfc3339_micros(now).to_string();
        let time_nano = unix_nanos(now);
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        for c in changes {
            let event = Arc::new(Event {
                kind: c.kind,
                action: c.action,
                actor: c.actor,
                time: time.clone(),
                time_nano,
                revision: c.revision,
            });
            if recent.len() == BUFFERED_EVENTS {
                recent.pop_front();
            }
            recent.push_back(event.clone());
            // No receiver is no error: the ring still keeps it for a later `--since`.
            let _ = self.live.send(event);
        }
    }

    /// Subscribes to the live events; with `since` (Unix nanoseconds), the buffered events
    /// at or after it come first.
    pub fn subscribe(&self, since: Option<i64>) -> Subscription {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let replay = match since {
            Some(since) => recent
                .iter()
                .filter(|e| e.time_nano >= since)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        Subscription {
            replay,
            live: self.live.subscribe(),
            closed: self.closed.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{Action, Actor, Attributes, EventType};

    fn change(id: &str) -> Change {
        Change {
            kind: EventType::Node,
            action: Action::Join,
            actor: Actor {
                id: id.into(),
                attributes: Attributes::default(),
            },
            revision: 1,
        }
    }

    #[tokio::test]
    async fn a_subscriber_gets_the_buffered_events_then_the_live_ones_without_a_gap() {
        let hub = EventHub::new();
        hub.publish([change("a"), change("b")]);
        let mut sub = hub.subscribe(Some(0));
        hub.publish([change("c")]);
        let replayed: Vec<&str> = sub.replay.iter().map(|e| e.actor.id.as_str()).collect();
        assert_eq!(replayed, ["a", "b"]);
        assert_eq!(sub.live.recv().await.unwrap().actor.id, "c");
        // Without `since`: live only.
        assert!(hub.subscribe(None).replay.is_empty());
        // A `since` after everything buffered replays nothing.
        assert!(hub.subscribe(Some(i64::MAX)).replay.is_empty());
    }

    #[test]
    fn the_ring_keeps_only_the_most_recent_events() {
        let hub = EventHub::new();
        hub.publish((0..BUFFERED_EVENTS + 10).map(|i| change(&i.to_string())));
        let sub = hub.subscribe(Some(0));
        assert_eq!(sub.replay.len(), BUFFERED_EVENTS);
        assert_eq!(sub.replay[0].actor.id, "10");
    }

    #[tokio::test]
    async fn a_lagging_reader_learns_how_many_it_missed() {
        let hub = EventHub::new();
        let mut sub = hub.subscribe(None);
        hub.publish((0..LIVE_BACKLOG + 5).map(|i| change(&i.to_string())));
        match sub.live.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 5),
            other => panic!("expected a lag, got {other:?}"),
        }
    }
}
