//! `GET /v1/events`'s body: newline-delimited JSON, the buffered events first, then the
//! live ones, until `until`, the reader hanging up, or the daemon stopping.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use hyper::body::Bytes;
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use super::{unix_nanos, Event, EventFilter, StreamLine, Subscription};

struct State {
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
    let Subscription {
        replay,
        live,
        closed,
    } = sub;
    let state = State {
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
            let wait = match self.filter.until {
                Some(until) => {
                    let left = until.saturating_sub(unix_nanos(SystemTime::now()));
                    if left <= 0 {
                        return None;
                    }
                    Duration::from_nanos(u64::try_from(left).unwrap_or(u64::MAX))
                }
                None => Duration::MAX,
            };
            let received = tokio::select! {
                r = tokio::time::timeout(wait, self.live.recv()) => match r {
                    Ok(r) => r,
                    Err(_) => return None,
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
