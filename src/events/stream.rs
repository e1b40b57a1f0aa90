//! `GET /v1/events`'s body: newline-delimited JSON, the buffered events first, then the
//! live ones, until `until`, the reader hanging up, or the daemon stopping.
//!
//! A quiet stream sends a blank line every [`HEARTBEAT`]: a reader that hung up is only
//! noticed when something is written to it, and a filter that never matches would
//! otherwise keep its task and broadcast receiver for the daemon's life.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use hyper::body::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use super::{unix_nanos, Event, EventFilter, StreamLine, Subscription};

/// The longest a stream stays silent.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

struct State {
    heartbeat: Duration,
    replay: VecDeque<Arc<Event>>,
    live: broadcast::Receiver<Arc<Event>>,
    closed: watch::Receiver<bool>,
    filter: EventFilter,
}

/// The stream of lines for one reader.
pub fn ndjson(
    sub: Subscription,
    filter: EventFilter,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    ndjson_with(sub, filter, HEARTBEAT)
}

fn ndjson_with(
    sub: Subscription,
    filter: EventFilter,
    heartbeat: Duration,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    let Subscription {
        replay,
        live,
        closed,
    } = sub;
    let state = State {
        heartbeat,
        replay: replay.into(),
        live,
        closed,
        filter,
    };
    futures::stream::unfold(state, |mut st| async move {
        let line = st.next_line().await?;
        Some((Ok(line), st))
    })
}

impl State {
    async fn next_line(&mut self) -> Option<Bytes> {
        while let Some(e) = self.replay.pop_front() {
            if self.after_until(&e) {
                return None;
            }
            if self.filter.matches(&e) {
                return Some(line(&*e));
            }
        }
        loop {
            let until_left = match self.filter.until {
                Some(until) => {
                    let left = until.saturating_sub(unix_nanos(SystemTime::now()));
                    if left <= 0 {
                        return None;
                    }
                    Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))
                }
                None => Duration::MAX,
            };
            let wait = until_left.min(self.heartbeat);
            let received = tokio::select! {
                r = tokio::time::timeout(wait, self.live.recv()) => match r {
                    Ok(r) => r,
                    // `until` came: the loop's check ends the stream.
                    Err(_) if until_left <= self.heartbeat => continue,
                    Err(_) => return Some(Bytes::from_static(b"\n")),
                },
                _ = self.closed.wait_for(|closed| *closed) => return None,
            };
            match received {
                Ok(e) => {
                    if self.after_until(&e) {
                        return None;
                    }
                    if self.filter.matches(&e) {
                        return Some(line(&*e));
                    }
                }
                Err(RecvError::Lagged(n)) => return Some(line(&StreamLine::missed(n))),
                Err(RecvError::Closed) => return None,
            }
        }
    }

    fn after_until(&self, e: &Event) -> bool {
        self.filter.until.is_some_and(|u| e.time_nano > u)
    }
}

fn line(l: &impl serde::Serialize) -> Bytes {
    // Serializing these plain types cannot fail; an empty object keeps the stream's shape
    // if it ever did.
    let mut out = serde_json::to_vec(l).unwrap_or_else(|_| b"{}".to_vec());
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use futures::StreamExt;

    use super::*;
    use crate::events::{Action, Actor, Attributes, Change, EventHub, EventType, LIVE_BACKLOG};

    fn change(kind: EventType, action: Action) -> Change {
        Change {
            kind,
            action,
            actor: Actor {
                id: "x".into(),
                attributes: Attributes::default(),
            },
            revision: 1,
        }
    }

    async fn next_json(s: &mut (impl Stream<Item = Result<Bytes, Infallible>> + Unpin)) -> String {
        match s.next().await {
            Some(Ok(b)) => String::from_utf8(b.to_vec()).unwrap(),
            None => "END".into(),
        }
    }

    #[tokio::test]
    async fn a_reader_that_fell_behind_is_told_how_many_it_missed_then_goes_on() {
        let hub = EventHub::new();
        let mut s = Box::pin(ndjson(hub.subscribe(None), EventFilter::default()));
        hub.publish((0..LIVE_BACKLOG + 2).map(|_| change(EventType::Node, Action::Join)));
        let first = next_json(&mut s).await;
        assert!(first.contains(r#""missed":2"#), "{first}");
        assert!(first.ends_with('\n'));
        assert!(next_json(&mut s).await.contains(r#""action":"join""#));
    }

    #[tokio::test]
    async fn filters_apply_to_replay_and_live_and_the_stream_ends_when_the_hub_closes() {
        let hub = EventHub::new();
        hub.publish([
            change(EventType::Node, Action::Join),
            change(EventType::Network, Action::Create),
        ]);
        let mut f = EventFilter::default();
        f.add("type", "network").unwrap();
        let mut s = Box::pin(ndjson(hub.subscribe(Some(0)), f));
        assert!(next_json(&mut s).await.contains(r#""action":"create""#));
        hub.publish([
            change(EventType::Node, Action::Leave),
            change(EventType::Network, Action::Rm),
        ]);
        assert!(next_json(&mut s).await.contains(r#""action":"rm""#));
        hub.close();
        assert_eq!(next_json(&mut s).await, "END");
    }

    #[tokio::test]
    async fn until_ends_the_stream_once_its_time_has_passed() {
        let hub = EventHub::new();
        hub.publish([change(EventType::Node, Action::Join)]);
        let f = EventFilter {
            since: Some(0),
            until: Some(unix_nanos(SystemTime::now()) + 50_000_000),
            ..Default::default()
        };
        let mut s = Box::pin(ndjson(hub.subscribe(f.since), f));
        assert!(next_json(&mut s).await.contains(r#""action":"join""#));
        // Nothing more is published: the stream ends at `until`, not never.
        assert_eq!(next_json(&mut s).await, "END");
    }

    #[tokio::test]
    async fn a_quiet_stream_sends_blank_lines() {
        let hub = EventHub::new();
        let heartbeat = Duration::from_millis(20);
        let mut s = Box::pin(ndjson_with(
            hub.subscribe(None),
            EventFilter::default(),
            heartbeat,
        ));
        assert_eq!(next_json(&mut s).await, "\n");
        hub.publish([change(EventType::Node, Action::Join)]);
        assert!(next_json(&mut s).await.contains(r#""action":"join""#));
    }
}
