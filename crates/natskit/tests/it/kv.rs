//! KV buckets, KvStore and the temporal resolver against real servers.

use crate::common::{TestResult, WAIT};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use async_nats::jetstream::stream::StorageType;
use futures_util::StreamExt;
use natskit::{Error, KvOperation, KvOptions, KvStore, TemporalResolver, WatchEvent};
use natskit_testing::{TestEnv, eventually};

async fn store_with(env: &TestEnv, bucket: &str, options: KvOptions) -> natskit::Result<KvStore> {
    let client = env.client();
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: env.prefixed_bucket_name(bucket),
            history: 64,
            storage: StorageType::Memory,
            ..Default::default()
        })
        .await?;
    Ok(client.kv_store(bucket, options))
}

async fn store(env: &TestEnv, bucket: &str) -> natskit::Result<KvStore> {
    store_with(env, bucket, KvOptions::default()).await
}

/// Runs an async write from inside a synchronous update closure.
fn interfere(store: &KvStore, key: &str, value: &str) {
    let (store, key, value) = (store.clone(), key.to_owned(), value.to_owned());
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(async move { store.put(&key, value).await })
            .expect("interfering write");
    });
}

#[tokio::test]
async fn basic_operations_and_error_kinds() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store(&env, "basic").await?;

    let r1 = kv.put("user.1", "alice").await?;
    let entry = kv.get("user.1").await?;
    assert_eq!((&entry.value[..], entry.revision), (&b"alice"[..], r1));

    let err = kv.create("user.1", "again").await.unwrap_err();
    assert!(
        matches!(err, Error::KeyExists { .. }) && err.is_conflict(),
        "{err}"
    );

    let r2 = kv.update("user.1", "alice2", r1).await?;
    assert!(r2 > r1);
    let err = kv.update("user.1", "stale", r1).await.unwrap_err();
    assert!(
        matches!(err, Error::RevisionMismatch { expected, .. } if expected == r1),
        "{err}"
    );
    assert!(err.is_conflict() && !err.is_not_found());

    kv.delete("user.1").await?;
    let err = kv.get("user.1").await.unwrap_err();
    assert!(
        matches!(err, Error::KeyNotFound { .. }) && err.is_not_found(),
        "{err}"
    );
    kv.create("user.1", "reborn").await?; // create works over a delete marker
    assert_eq!(&kv.get("user.1").await?.value[..], b"reborn");
    kv.purge("user.1").await?;
    assert!(kv.get("user.1").await.unwrap_err().is_not_found());
    assert!(kv.get("never.written").await.unwrap_err().is_not_found());

    for bad in ["", "a b", ".a", "a.", "a..b", "a*", "_kv.x"] {
        assert!(
            matches!(kv.put(bad, "x").await, Err(Error::InvalidKey { .. })),
            "{bad:?}"
        );
    }
    assert_eq!(
        env.client().status_info().total_failures,
        0,
        "answers are not failures"
    );
    Ok(())
}

#[tokio::test]
async fn buckets_are_managed_and_names_checked() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    let client = env.client();
    let config = |history| kv::Config {
        bucket: "settings".into(),
        history,
        storage: StorageType::Memory,
        ..Default::default()
    };
    client.ensure_key_value_bucket(config(5)).await?;
    let bucket = client.ensure_key_value_bucket(config(5)).await?;
    assert_eq!(bucket.status().await?.history(), 5);
    let bucket = client.ensure_key_value_bucket(config(10)).await?;
    assert_eq!(
        bucket.status().await?.history(),
        10,
        "a differing history is applied"
    );
    let mut on_disk = config(10);
    on_disk.storage = StorageType::File;
    assert!(matches!(
        client.ensure_key_value_bucket(on_disk).await,
        Err(Error::BucketConfigConflict { .. })
    ));
    assert_eq!(client.list_key_value_buckets().await?, vec!["settings"]);
    assert!(matches!(
        client.get_key_value_bucket("nope").await,
        Err(Error::BucketNotFound { .. })
    ));
    for bad in ["", "has.dot", "sp ace", "star*"] {
        assert!(matches!(
            client.get_key_value_bucket(bad).await,
            Err(Error::InvalidName { .. })
        ));
    }
    assert!(client.delete_key_value_bucket("settings").await?);
    assert!(!client.delete_key_value_bucket("settings").await?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_retries_conflicts_and_gives_up_after_max_retries() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store(&env, "cas").await?;
    kv.put("counter", "1").await?;

    // One interfering write: the second attempt succeeds.
    let calls = AtomicUsize::new(0);
    let other = kv.clone();
    let revision = kv
        .update_with_retry("counter", |current| {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                interfere(&other, "counter", "100");
            }
            let n: u64 = std::str::from_utf8(current.unwrap_or(b"0"))?.parse()?;
            Ok::<_, natskit::BoxError>((n + 1).to_string().into_bytes())
        })
        .await?;
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    let entry = kv.get("counter").await?;
    assert_eq!((&entry.value[..], entry.revision), (&b"101"[..], revision));

    // Interference on every attempt with max_retries 1: exactly 2 attempts.
    let strict = store_with(
        &env,
        "cas",
        KvOptions {
            max_retries: 1,
            ..Default::default()
        },
    )
    .await?;
    let calls = AtomicUsize::new(0);
    let err = strict
        .update_with_retry("counter", |_current| {
            calls.fetch_add(1, Ordering::SeqCst);
            interfere(&other, "counter", "0");
            Ok::<_, natskit::BoxError>(b"lost".to_vec())
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::MaxRetriesExceeded { attempts: 2, .. }),
        "{err}"
    );
    assert!(err.is_conflict());
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(
        &kv.get("counter").await?.value[..],
        b"0",
        "the lost update wrote nothing"
    );

    // A failing closure is not retried and keeps its error as the source.
    let calls = AtomicUsize::new(0);
    let err = kv
        .update_with_retry("counter", |_| {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<Vec<u8>, _>(std::io::Error::other("no"))
        })
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::UpdateAborted { .. }));
    assert!(std::error::Error::source(&err).is_some_and(|s| s.to_string() == "no"));
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Delete, then update_with_retry recreates.
    kv.delete("counter").await?;
    kv.update_with_retry("counter", |current| {
        assert!(current.is_none());
        Ok::<_, natskit::BoxError>(b"fresh".to_vec())
    })
    .await?;
    assert_eq!(&kv.get("counter").await?.value[..], b"fresh");
    Ok(())
}

#[tokio::test]
async fn value_size_limit() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store_with(
        &env,
        "sizes",
        KvOptions {
            max_value_size: 1024,
            ..Default::default()
        },
    )
    .await?;
    kv.put("fits", vec![b'x'; 1024]).await?;
    let err = kv.put("too.big", vec![b'x'; 1025]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::ValueTooLarge {
                size: 1025,
                max: 1024
            }
        ),
        "{err}"
    );
    let err = kv
        .update_with_retry("fits", |_| Ok::<_, natskit::BoxError>(vec![b'y'; 2000]))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ValueTooLarge { .. }), "{err}");
    assert_eq!(
        kv.get("fits").await?.value.len(),
        1024,
        "nothing stored was lost"
    );
    assert!(kv.get("too.big").await.unwrap_err().is_not_found());
    Ok(())
}

#[tokio::test]
async fn json_helpers() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store(&env, "json").await?;

    // Missing key: the closure gets an empty map.
    kv.update_json("service.config", |config| {
        assert!(config.is_empty());
        config.insert("enabled".into(), true.into());
        config.insert("workers".into(), 10.into());
        Ok::<_, std::convert::Infallible>(())
    })
    .await?;
    // Existing key: edited in place, integers stay integers.
    kv.update_json("service.config", |config| {
        let workers = config["workers"].as_i64().unwrap_or(0);
        config.insert("workers".into(), (workers + 1).into());
        Ok::<_, std::convert::Infallible>(())
    })
    .await?;
    let stored = kv.get("service.config").await?;
    assert_eq!(
        std::str::from_utf8(&stored.value)?,
        r#"{"enabled":true,"workers":11}"#
    );

    #[derive(serde::Deserialize, serde::Serialize, Default, Debug, PartialEq)]
    struct Config {
        enabled: bool,
        workers: u32,
    }
    let typed: Config = kv.get_json("service.config").await?;
    assert_eq!(
        typed,
        Config {
            enabled: true,
            workers: 11
        }
    );
    kv.update_typed("service.config", |c: &mut Config| {
        c.workers *= 2;
        Ok::<_, std::convert::Infallible>(())
    })
    .await?;
    assert_eq!(kv.get_json::<Config>("service.config").await?.workers, 22);

    // Invalid JSON, null and type mismatches: typed errors, closure never called.
    kv.put("broken", "{not json").await?;
    kv.put("nothing", "null").await?;
    kv.put("list", "[1,2]").await?;
    for (key, null) in [("broken", false), ("nothing", true), ("list", false)] {
        let called = AtomicUsize::new(0);
        let err = kv
            .update_json(key, |_| {
                called.fetch_add(1, Ordering::SeqCst);
                Ok::<_, std::convert::Infallible>(())
            })
            .await
            .unwrap_err();
        if null {
            assert!(matches!(err, Error::JsonNull { .. }), "{key}: {err}");
        } else {
            assert!(matches!(err, Error::Json { .. }), "{key}: {err}");
        }
        assert_eq!(called.load(Ordering::SeqCst), 0, "{key}");
    }
    assert!(matches!(
        kv.get_json::<Config>("broken").await,
        Err(Error::Json { .. })
    ));
    assert!(matches!(
        kv.get_json::<Config>("list").await,
        Err(Error::Json { .. })
    ));
    assert_eq!(
        &kv.get("broken").await?.value[..],
        b"{not json",
        "nothing stored was touched"
    );
    Ok(())
}

#[tokio::test]
async fn keys_by_prefix_and_filters() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store(&env, "keys").await?;
    for key in [
        "entity.sensor.1",
        "entity.sensor.2",
        "entity.sensor.3",
        "entity.device.1",
        "entity.device.2",
    ] {
        kv.put(key, "v").await?;
    }
    kv.put("entity.sensor.gone", "v").await?;
    kv.delete("entity.sensor.gone").await?;
    assert_eq!(kv.keys_by_prefix("entity.sensor.").await?.len(), 3);
    assert_eq!(kv.keys_by_prefix("entity.device.").await?.len(), 2);
    assert_eq!(kv.keys_by_prefix("entity.").await?.len(), 5);
    assert_eq!(kv.keys_by_prefix("nonexistent.").await?.len(), 0);
    assert_eq!(kv.keys_by_prefix("").await?.len(), 5);
    // Not on a token boundary: still correct.
    assert_eq!(
        kv.keys_by_prefix("entity.sens").await?,
        vec!["entity.sensor.1", "entity.sensor.2", "entity.sensor.3"]
    );
    assert!(matches!(
        kv.keys_by_prefix("bad prefix").await,
        Err(Error::InvalidKey { .. })
    ));
    assert_eq!(
        kv.filtered_keys("entity.*.1").await?,
        vec!["entity.device.1", "entity.sensor.1"]
    );
    assert_eq!(kv.keys().await?.len(), 5);
    Ok(())
}

#[tokio::test]
async fn watch_replays_marks_and_follows() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let empty = store(&env, "watch_empty").await?;
    let mut watch = empty.watch(">").await?;
    let first = tokio::time::timeout(WAIT, watch.next()).await?;
    assert_eq!(
        first,
        Some(WatchEvent::InitialDone),
        "an empty bucket still gets the marker"
    );
    empty.put("a", "1").await?;
    match tokio::time::timeout(WAIT, watch.next()).await? {
        Some(WatchEvent::Entry(e)) => assert_eq!((e.key.as_str(), &e.value[..]), ("a", &b"1"[..])),
        other => panic!("expected the live put, got {other:?}"),
    }

    let kv = store(&env, "watch_full").await?;
    kv.put("x.1", "old").await?;
    kv.put("x.1", "new").await?;
    kv.put("x.2", "v").await?;
    kv.put("y.1", "other pattern").await?;
    let mut watch = kv.watch("x.>").await?;
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, watch.next()).await? {
            Some(WatchEvent::Entry(e)) => {
                initial.push((e.key, String::from_utf8_lossy(&e.value).into_owned()))
            }
            Some(WatchEvent::InitialDone) => break,
            Some(other) => panic!("unexpected {other:?}"),
            None => panic!("watch ended"),
        }
    }
    initial.sort();
    assert_eq!(
        initial,
        vec![("x.1".into(), "new".into()), ("x.2".into(), "v".into())]
    );
    kv.delete("x.2").await?;
    match tokio::time::timeout(WAIT, watch.next()).await? {
        Some(WatchEvent::Entry(e)) => {
            assert_eq!((e.key.as_str(), e.operation), ("x.2", KvOperation::Delete))
        }
        other => panic!("expected the delete, got {other:?}"),
    }
    Ok(())
}

#[tokio::test]
async fn watch_survives_server_restart() -> TestResult {
    let mut env = TestEnv::builder().file_storage().start().await?;
    let client = env.client().clone();
    let bucket = client
        .ensure_key_value_bucket(kv::Config {
            bucket: "durable_watch".into(),
            history: 5,
            storage: StorageType::File,
            ..Default::default()
        })
        .await?;
    let kv = client.kv_store(bucket, KvOptions::default());
    kv.put("k", "before").await?;
    let mut watch = kv.watch(">").await?;
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = watch.next().await {
            if let WatchEvent::Entry(e) = event {
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&e.value).into_owned());
            }
        }
    });
    eventually(WAIT, "the initial value", || async {
        (!seen.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    env.server_mut().expect("owned").kill()?;
    env.server_mut().expect("owned").restart()?;
    eventually(WAIT, "a put after the restart", || async {
        kv.put("k", "after").await.ok()
    })
    .await;
    eventually(WAIT, "the watch to see it", || async {
        seen.lock()
            .unwrap()
            .iter()
            .any(|v| v == "after")
            .then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_json_counter_is_exact() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let options = KvOptions {
        max_retries: 500,
        max_retry_delay: Duration::from_millis(20),
        ..Default::default()
    };
    let kv = store_with(&env, "contention", options).await?;
    let attempts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (kv, attempts) = (kv.clone(), attempts.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                kv.update_json("counter", |doc| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let n = doc
                        .get("n")
                        .and_then(serde_json::Value::as_u64)
                        .unwrap_or(0);
                    doc.insert("n".into(), (n + 1).into());
                    Ok::<_, std::convert::Infallible>(())
                })
                .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let value: serde_json::Value = kv.get_json("counter").await?;
    assert_eq!(value["n"], 4000);
    let attempts = attempts.load(Ordering::Relaxed);
    println!(
        "8 x 500 increments: {attempts} attempts, {:.2} conflicts per success",
        (attempts - 4000) as f64 / 4000.0
    );
    Ok(())
}

#[tokio::test]
async fn temporal_resolver_binary_search_and_cache() -> TestResult {
    let env = TestEnv::builder().shared().start().await?;
    let kv = store(&env, "temporal").await?;
    for i in 1..=50 {
        kv.put("entity.sensor.1", format!("{i}")).await?;
    }
    kv.put("entity.sensor.2", "only").await?;
    let history = kv.history("entity.sensor.1").await?;
    assert_eq!(history.len(), 50);
    let resolver = TemporalResolver::new(&kv);

    let first = history[0].created;
    let before_first = first - Duration::from_millis(1);
    assert!(
        resolver
            .get_at_timestamp("entity.sensor.1", before_first)
            .await
            .unwrap_err()
            .is_not_found()
    );
    let latest = resolver
        .get_at_timestamp(
            "entity.sensor.1",
            SystemTime::now() + Duration::from_secs(60),
        )
        .await?;
    assert_eq!(&latest.value[..], b"50");
    let exact = resolver
        .get_at_timestamp("entity.sensor.1", history[24].created)
        .await?;
    // Several revisions may share a timestamp; the last of them wins.
    assert_eq!(exact.created, history[24].created);
    assert!(exact.revision >= history[24].revision);
    // Two neighbouring revisions with distinct timestamps (50 writes cannot
    // all share one nanosecond): a time between them resolves to the first.
    let (a, b) = history
        .windows(2)
        .map(|w| (&w[0], &w[1]))
        .find(|(a, b)| a.created < b.created)
        .expect("revisions at distinct times");
    let between = a.created + (b.created.duration_since(a.created)? / 2);
    let resolved = resolver
        .get_at_timestamp("entity.sensor.1", between)
        .await?;
    assert_eq!(
        resolved.revision, a.revision,
        "between {} and {}",
        a.revision, b.revision
    );

    let range = resolver
        .get_in_time_range("entity.sensor.1", history[9].created, history[19].created)
        .await?;
    assert!(
        range.windows(2).all(|w| w[0].revision < w[1].revision),
        "ordered"
    );
    assert!(
        range
            .iter()
            .all(|e| e.created > history[9].created && e.created <= history[19].created)
    );
    assert_eq!(
        range.len(),
        history
            .iter()
            .filter(|e| e.created > history[9].created && e.created <= history[19].created)
            .count()
    );

    let keys = vec![
        "entity.sensor.1".to_owned(),
        "entity.sensor.2".to_owned(),
        "entity.none".to_owned(),
    ];
    let at_now = resolver
        .get_range_at_timestamp(&keys, SystemTime::now() + Duration::from_secs(60))
        .await?;
    assert_eq!(at_now.len(), 2, "a key that never existed is skipped");
    let early = resolver
        .get_range_at_timestamp(&keys, history[0].created)
        .await?;
    // sensor.2 was written after all 50 revisions of sensor.1.
    assert!(!early.contains_key("entity.sensor.2"), "{early:?}");
    assert_eq!(early["entity.sensor.1"].created, history[0].created);
    let ranges = resolver
        .get_range_in_time_range(
            &keys,
            before_first,
            SystemTime::now() + Duration::from_secs(60),
        )
        .await?;
    assert_eq!(ranges["entity.sensor.1"].len(), 50);

    // Deleted at a time: the key did not exist then.
    kv.delete("entity.sensor.2").await?;
    let after_delete = resolver
        .get_at_timestamp(
            "entity.sensor.2",
            SystemTime::now() + Duration::from_secs(60),
        )
        .await;
    assert!(
        after_delete.unwrap_err().is_not_found(),
        "the write invalidated the cached history"
    );

    let stats = resolver.stats();
    assert!(stats.hits > 0 && stats.misses > 0, "{stats:?}");
    assert!(stats.entries >= 1);
    Ok(())
}

/// An update that must await something: contended async CAS updates all
/// land, and an error from the update aborts without writing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_updates_retry_like_sync_ones() -> TestResult {
    let env = TestEnv::builder().jetstream().start().await?;
    let kv = store(&env, "async_cas").await?;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let kv = kv.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..20 {
                kv.update_with_retry_async("n", |current| async move {
                    // Something to wait for between the read and the write.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    let n: u64 = match current {
                        Some(v) => std::str::from_utf8(&v)?.parse()?,
                        None => 0,
                    };
                    Ok::<_, natskit::BoxError>((n + 1).to_string().into_bytes())
                })
                .await?;
            }
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    assert_eq!(&kv.get("n").await?.value[..], b"80");
    let err = kv
        .update_with_retry_async("n", |_current| async { Err::<Vec<u8>, _>("no") })
        .await
        .expect_err("aborted");
    assert!(matches!(err, Error::UpdateAborted { .. }), "{err}");
    assert_eq!(&kv.get("n").await?.value[..], b"80", "nothing written");
    Ok(())
}
