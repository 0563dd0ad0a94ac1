//! Watches of keys that survive reconnects and lost consumers.

use std::pin::Pin;
use std::task::{Context, Poll};

use async_nats::jetstream::kv;
use futures_util::{Stream, StreamExt};

use crate::client::jetstream_errors::unavailable;
use crate::client::retry::{self, Retry};
use crate::core::error::Result;
use crate::core::subject;

use super::{KvEntry, KvStore};

impl KvStore {
    /// Watches keys matching `pattern` (`>` for all): first the current value
    /// of every matching key, then [`WatchEvent::InitialDone`] (also for an
    /// empty bucket), then live changes. Survives reconnects and server
    /// restarts: when the underlying watcher fails it is re-created from the
    /// last revision seen.
    ///
    /// # Errors
    /// [`Error::InvalidSubject`](crate::Error::InvalidSubject) for a bad pattern; [`Error::JetStreamUnavailable`](crate::Error::JetStreamUnavailable).
    pub async fn watch(&self, pattern: &str) -> Result<KvWatch> {
        self.client.ensure_open()?;
        subject::validate_subscribe(pattern)?;
        let initial = self.filtered_subject_count(pattern).await?;
        let watcher = self
            .op("kv watch", async {
                self.bucket
                    .watch_with_history(pattern)
                    .await
                    .map_err(|e| unavailable("kv watch", e))
            })
            .await?;
        Ok(KvWatch::new(
            self.clone(),
            pattern.to_owned(),
            watcher,
            initial == 0,
        ))
    }

    /// How many keys (with markers) match `pattern`, from stream state.
    async fn filtered_subject_count(&self, pattern: &str) -> Result<usize> {
        let stream = self.bucket.stream.clone();
        let filter = format!("{}{pattern}", self.bucket.prefix);
        self.op("kv watch", async move {
            let mut subjects = stream
                .info_with_subjects(filter)
                .await
                .map_err(|e| unavailable("kv watch", e))?;
            let mut count = 0usize;
            while let Some(subject) = subjects.next().await {
                subject.map_err(|e| unavailable("kv watch", e))?;
                count += 1;
            }
            Ok(count)
        })
        .await
    }
}

/// An event of a [`KvWatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WatchEvent {
    /// A key's value, deletion or purge.
    Entry(KvEntry),
    /// Every key's value at the time the watch started has been delivered.
    InitialDone,
}

type WatchFuture = Pin<Box<dyn Future<Output = Result<kv::Watch>> + Send>>;

/// A resilient watch from [`KvStore::watch`]; a `Stream` of [`WatchEvent`].
/// Dropping it ends the watch (its consumer on the server is ephemeral and
/// goes with it).
pub struct KvWatch {
    store: KvStore,
    pattern: String,
    watcher: Option<kv::Watch>,
    reopening: Option<WatchFuture>,
    initial_done_pending: bool,
    initial_done_sent: bool,
    last_revision: u64,
    /// The re-creation waits (reset once events flow again).
    waits: Retry,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl std::fmt::Debug for KvWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWatch")
            .field("bucket", &self.store.bucket())
            .field("pattern", &self.pattern)
            .field("last_revision", &self.last_revision)
            .finish_non_exhaustive()
    }
}

impl KvWatch {
    fn new(store: KvStore, pattern: String, watcher: kv::Watch, empty: bool) -> Self {
        Self {
            store,
            pattern,
            watcher: Some(watcher),
            reopening: None,
            initial_done_pending: empty,
            initial_done_sent: false,
            last_revision: 0,
            waits: Retry::new(retry::RECREATE),
            sleep: None,
        }
    }

    fn reopen(&mut self) {
        self.watcher = None;
        let bucket = self.store.bucket.clone();
        let pattern = self.pattern.clone();
        let from = self.last_revision + 1;
        let delay = self.waits.next_delay();
        tracing::warn!(bucket = %bucket.name, %pattern, from, ?delay, "kv watch lost; re-creating");
        self.sleep = Some(Box::pin(tokio::time::sleep(delay)));
        self.reopening = Some(Box::pin(async move {
            bucket
                .watch_from_revision(pattern, from)
                .await
                .map_err(|e| unavailable("kv watch", e))
        }));
    }
}

impl Stream for KvWatch {
    type Item = WatchEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WatchEvent>> {
        let this = &mut *self;
        loop {
            if this.initial_done_pending {
                this.initial_done_pending = false;
                this.initial_done_sent = true;
                return Poll::Ready(Some(WatchEvent::InitialDone));
            }
            if let Some(sleep) = this.sleep.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.sleep = None;
            }
            if let Some(reopening) = this.reopening.as_mut() {
                match reopening.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(watcher)) => {
                        this.reopening = None;
                        this.watcher = Some(watcher);
                    }
                    Poll::Ready(Err(err)) => {
                        tracing::debug!(%err, "kv watch re-create failed");
                        this.reopen();
                        continue;
                    }
                }
            }
            let Some(watcher) = this.watcher.as_mut() else {
                this.reopen();
                continue;
            };
            match watcher.poll_next_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(entry))) => {
                    this.waits.reset();
                    if entry.revision <= this.last_revision {
                        continue; // replayed after a re-create
                    }
                    this.last_revision = entry.revision;
                    if !this.initial_done_sent && entry.delta == 0 {
                        this.initial_done_pending = true;
                    }
                    return Poll::Ready(Some(WatchEvent::Entry(entry.into())));
                }
                Poll::Ready(Some(Err(err))) => {
                    tracing::debug!(%err, "kv watch error");
                    this.reopen();
                }
                Poll::Ready(None) => this.reopen(),
            }
        }
    }
}
