//! The temporal resolver: the state of KV keys at a point in time or over a
//! time range, from their revision history, with a TTL cache.
//!
//! History depth is bounded by the bucket's `history` setting (at most 64
//! revisions per key): a time older than the oldest kept revision resolves
//! to that oldest revision's predecessor, which is gone, so it is
//! [`Error::KeyNotFound`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;

use crate::core::error::{Error, Result};
use crate::kv::{Invalidate, KvEntry, KvStore};

/// Shared by the resolver and the stores it listens to.
pub(crate) type HistoryCache = moka::sync::Cache<String, Arc<Vec<KvEntry>>>;

impl Invalidate for HistoryCache {
    fn invalidate(&self, key: &str) {
        moka::sync::Cache::invalidate(self, key);
    }
}

/// Cache TTL of [`TemporalResolver::new`].
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(5);

/// How many keys the range queries resolve at once.
const CONCURRENCY: usize = 16;

/// Cache counters of a [`TemporalResolver`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups served from the cache.
    pub hits: u64,
    /// Lookups that read the history from the server.
    pub misses: u64,
    /// Keys currently cached.
    pub entries: u64,
    /// Keys dropped by TTL, size or invalidation.
    pub evictions: u64,
}

/// Index of the entry current at `at` in `history` (ordered by revision):
/// the last one created at or before `at`.
fn current_at(history: &[KvEntry], at: SystemTime) -> Option<usize> {
    history.partition_point(|e| e.created <= at).checked_sub(1)
}

/// Resolves the state of keys at past times from their KV history.
///
/// ```no_run
/// # async fn demo(store: natskit::KvStore) -> natskit::Result<()> {
/// use std::time::{Duration, SystemTime};
/// let resolver = natskit::TemporalResolver::new(&store);
/// let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
/// let then = resolver.get_at_timestamp("entity.sensor.1", an_hour_ago).await?;
/// println!("revision {} was current an hour ago", then.revision);
/// # Ok(()) }
/// ```
pub struct TemporalResolver {
    store: KvStore,
    cache: Arc<HistoryCache>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: Arc<AtomicU64>,
}

impl std::fmt::Debug for TemporalResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TemporalResolver")
            .field("bucket", &self.store.bucket())
            .field("stats", &self.stats())
            .finish()
    }
}

impl TemporalResolver {
    /// A resolver over `store` with a 5 s history cache. Writes through
    /// `store` (or its clones) invalidate the cached history of their key.
    pub fn new(store: &KvStore) -> Self {
        Self::with_ttl(store, DEFAULT_CACHE_TTL)
    }

    /// A resolver with a cache TTL of `ttl` (zero disables caching).
    pub fn with_ttl(store: &KvStore, ttl: Duration) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let cache: HistoryCache = moka::sync::Cache::builder()
            .max_capacity(10_000)
            .time_to_live(ttl.max(Duration::from_nanos(1)))
            .eviction_listener(move |_key, _value, _cause| {
                counter.fetch_add(1, Ordering::Relaxed);
            })
            .build();
        let cache = Arc::new(cache);
        // The store keeps a weak reference: a dropped resolver is forgotten.
        let listener: Arc<dyn Invalidate> = cache.clone();
        store.subscribe_invalidations(Arc::downgrade(&listener));
        Self {
            store: store.clone(),
            cache,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions,
        }
    }

    /// Cache counters.
    pub fn stats(&self) -> CacheStats {
        self.cache.run_pending_tasks();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: self.cache.entry_count(),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Drops the cached history of `key`.
    pub fn invalidate(&self, key: &str) {
        self.cache.invalidate(key);
    }

    async fn history(&self, key: &str) -> Result<Arc<Vec<KvEntry>>> {
        if let Some(history) = self.cache.get(key) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(history);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let history = Arc::new(self.store.history(key).await?);
        self.cache.insert(key.to_owned(), history.clone());
        Ok(history)
    }

    /// The entry of `key` that was current at `at`: the last revision
    /// written at or before it (binary search over the history).
    ///
    /// # Errors
    /// [`Error::KeyNotFound`] when `at` is before the first revision kept,
    /// or the key was deleted or purged at that time; KV errors otherwise.
    pub async fn get_at_timestamp(&self, key: &str, at: SystemTime) -> Result<KvEntry> {
        let history = self.history(key).await?;
        match current_at(&history, at).map(|i| &history[i]) {
            Some(entry) if entry.is_value() => Ok(entry.clone()),
            _ => Err(Error::KeyNotFound {
                key: key.to_owned(),
            }),
        }
    }

    /// The entries of `key` written in `(start, end]`, ordered by revision
    /// (delete and purge markers included, so the caller sees when the key
    /// stopped existing). Empty when nothing changed in the range.
    ///
    /// # Errors
    /// [`Error::KeyNotFound`] when the key has no history at all; KV errors.
    pub async fn get_in_time_range(
        &self,
        key: &str,
        start: SystemTime,
        end: SystemTime,
    ) -> Result<Vec<KvEntry>> {
        let history = self.history(key).await?;
        let from = history.partition_point(|e| e.created <= start);
        let to = history.partition_point(|e| e.created <= end);
        Ok(history.get(from..to.max(from)).unwrap_or_default().to_vec())
    }

    /// [`get_at_timestamp`](Self::get_at_timestamp) for many keys at once
    /// (resolved concurrently). Keys that did not exist at `at` are left out.
    ///
    /// # Errors
    /// The first error other than not-found.
    pub async fn get_range_at_timestamp(
        &self,
        keys: &[String],
        at: SystemTime,
    ) -> Result<HashMap<String, KvEntry>> {
        let results: Vec<(String, Result<KvEntry>)> = futures_util::stream::iter(
            keys.iter()
                .map(|key| async move { (key.clone(), self.get_at_timestamp(key, at).await) }),
        )
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
        collect_found(results, |_| true)
    }

    /// [`get_in_time_range`](Self::get_in_time_range) for many keys at once
    /// (resolved concurrently). Keys without entries in the range are left out.
    ///
    /// # Errors
    /// The first error other than not-found.
    pub async fn get_range_in_time_range(
        &self,
        keys: &[String],
        start: SystemTime,
        end: SystemTime,
    ) -> Result<HashMap<String, Vec<KvEntry>>> {
        let results: Vec<(String, Result<Vec<KvEntry>>)> =
            futures_util::stream::iter(keys.iter().map(|key| async move {
                (key.clone(), self.get_in_time_range(key, start, end).await)
            }))
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        collect_found(results, |entries: &Vec<KvEntry>| !entries.is_empty())
    }
}

fn collect_found<T>(
    results: Vec<(String, Result<T>)>,
    keep: impl Fn(&T) -> bool,
) -> Result<HashMap<String, T>> {
    let mut found = HashMap::with_capacity(results.len());
    for (key, result) in results {
        match result {
            Ok(value) if keep(&value) => {
                found.insert(key, value);
            }
            Ok(_) | Err(Error::KeyNotFound { .. }) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvOperation;

    fn entry(revision: u64, secs: u64, operation: KvOperation) -> KvEntry {
        KvEntry {
            key: "k".into(),
            value: bytes::Bytes::from(revision.to_string()),
            revision,
            created: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
            operation,
        }
    }

    #[test]
    fn binary_search_picks_the_entry_current_at_a_time() {
        let history: Vec<KvEntry> = (1..=50)
            .map(|r| entry(r, r * 10, KvOperation::Put))
            .collect();
        let at = |secs| {
            current_at(&history, SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
                .map(|i| history[i].revision)
        };
        assert_eq!(at(5), None, "before the first revision");
        assert_eq!(at(10), Some(1), "exactly at a revision");
        assert_eq!(at(255), Some(25), "between two revisions");
        assert_eq!(at(10_000), Some(50), "after the last");
    }

    #[test]
    fn found_keeps_values_and_skips_not_found() {
        let results = vec![
            ("a".to_owned(), Ok(1)),
            ("b".to_owned(), Err(Error::KeyNotFound { key: "b".into() })),
        ];
        let found = collect_found(results, |_| true).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found.get("a"), Some(&1));
        let failing: Vec<(String, Result<i32>)> = vec![("c".into(), Err(Error::NotConnected))];
        assert!(collect_found(failing, |_| true).is_err());
    }

    #[test]
    fn found_drops_what_the_filter_rejects() {
        // A key whose history in a range is empty is left out, as the
        // range query does.
        let results = vec![
            ("gone".to_owned(), Ok(Vec::new())),
            (
                "kept".to_owned(),
                Ok(vec![
                    entry(1, 1, KvOperation::Put),
                    entry(2, 2, KvOperation::Delete),
                ]),
            ),
        ];
        let found = collect_found(results, |entries: &Vec<KvEntry>| !entries.is_empty()).unwrap();
        assert_eq!(found.keys().collect::<Vec<_>>(), vec!["kept"]);
        assert_eq!(found["kept"][1].operation, KvOperation::Delete);
    }
}
