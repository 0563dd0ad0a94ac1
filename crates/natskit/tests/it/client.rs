//! The resilient client against real nats-server processes.

use crate::common::{TestResult, WAIT};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use natskit::{
    BreakerState, Client, Error, HeaderMap, Message, RequestOptions, RetryConfig, ServiceError,
    Status, SubscribeOptions,
};
use natskit_testing::{NatsServer, eventually};
use tokio::net::{TcpListener, TcpStream};

/// A TCP gate in front of a server: counts every connection attempt, and
/// either refuses it (accept, then close) or forwards it to `target`.
struct Gate {
    port: u16,
    accepted: Arc<AtomicUsize>,
    target: Arc<AtomicU16>,
}

impl Gate {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let target = Arc::new(AtomicU16::new(0));
        let (count, to) = (accepted.clone(), target.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let target = to.load(Ordering::SeqCst);
                if target == 0 {
                    drop(inbound);
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Self {
            port,
            accepted,
            target,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn attempts(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn forward_to(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

async fn wait_status(client: &Client, status: Status) {
    eventually(WAIT, &format!("status {status}"), || async {
        (client.status() == status).then_some(())
    })
    .await;
}

/// Waits until the open breaker lets a probe through.
async fn wait_probe_allowed(client: &Client) {
    eventually(WAIT, "the breaker's back-off to end", || async {
        client
            .breaker()
            .retry_after()
            .is_none_or(|d| d.is_zero())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn breaker_opens_after_threshold_probes_once_and_closes() -> TestResult {
    let gate = Gate::start().await;
    let client = Client::builder(gate.url())
        .breaker_threshold(5)
        .initial_backoff(Duration::from_millis(200))
        .max_backoff(Duration::from_millis(400))
        .connect_timeout(Duration::from_secs(2))
        .build()?;

    for attempt in 1..=5 {
        let err = client.connect().await.expect_err("the gate refuses");
        assert!(
            !err.is_circuit_open(),
            "attempt {attempt} must report the real cause: {err}"
        );
        assert!(err.is_infrastructure());
    }
    assert_eq!(gate.attempts(), 5);
    assert_eq!(client.breaker().state(), BreakerState::Open);
    assert_eq!(client.status(), Status::CircuitOpen);
    let err = client.connect().await.expect_err("open circuit");
    assert!(err.is_circuit_open(), "{err}");
    assert_eq!(
        gate.attempts(),
        5,
        "an open circuit must not touch the network"
    );
    assert_eq!(client.backoff(), Duration::from_millis(200));

    // After the back-off, two callers race: exactly one probe goes out.
    wait_probe_allowed(&client).await;
    let (a, b) = tokio::join!(client.connect(), client.connect());
    assert_eq!(gate.attempts(), 6, "exactly one probe");
    assert!(a.is_err() && b.is_err());
    assert!(
        a.as_ref().err().is_some_and(Error::is_circuit_open)
            || b.as_ref().err().is_some_and(Error::is_circuit_open)
    );
    assert_eq!(
        client.backoff(),
        Duration::from_millis(400),
        "re-open doubles"
    );

    // Next probe, with a live server behind the gate: the circuit closes.
    let server = NatsServer::start()?;
    gate.forward_to(server.client_port());
    wait_probe_allowed(&client).await;
    client.connect().await?;
    assert_eq!(gate.attempts(), 7);
    assert_eq!(client.breaker().state(), BreakerState::Closed);
    assert_eq!(
        client.backoff(),
        Duration::from_millis(200),
        "close resets the back-off"
    );
    wait_status(&client, Status::Connected).await;
    assert_eq!(client.status_info().consecutive_failures, 0);
    assert_eq!(client.status_info().total_failures, 6);
    Ok(())
}

#[tokio::test]
async fn kill_and_restart_fire_disconnect_then_reconnect() -> TestResult {
    let mut server = NatsServer::start()?;
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let (e1, e2, e3) = (events.clone(), events.clone(), events.clone());
    let client = Client::builder(server.url())
        .reconnect_wait(Duration::from_millis(50))
        .health_interval(Duration::from_millis(200))
        .on_disconnect(move |_| e1.lock().unwrap().push("disconnect".into()))
        .on_reconnect(move || e2.lock().unwrap().push("reconnect".into()))
        .on_health_change(move |h| e3.lock().unwrap().push(format!("healthy={h}")))
        .connect()
        .await?;
    wait_status(&client, Status::Connected).await;
    assert!(client.is_healthy());

    server.kill()?;
    wait_status(&client, Status::Reconnecting).await;
    // Health turns false within two health intervals (here at once, from the event).
    eventually(
        Duration::from_millis(400) + Duration::from_secs(1),
        "unhealthy",
        || async { (!client.is_healthy()).then_some(()) },
    )
    .await;
    assert!(
        client
            .publish("x.y", "while down")
            .await
            .unwrap_err()
            .is_not_connected()
    );

    server.restart()?;
    wait_status(&client, Status::Connected).await;
    eventually(WAIT, "healthy again", || async {
        client.is_healthy().then_some(())
    })
    .await;
    let seen: Vec<String> = events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| !e.starts_with("healthy"))
        .cloned()
        .collect();
    assert_eq!(seen, vec!["disconnect", "reconnect"]);
    assert_eq!(client.status_info().reconnects, 1);
    client.publish("x.y", "after").await?;
    Ok(())
}

#[tokio::test]
async fn paused_server_turns_health_false() -> TestResult {
    let mut server = NatsServer::start()?;
    let client = Client::builder(server.url())
        .health_interval(Duration::from_millis(100))
        .connect()
        .await?;
    eventually(WAIT, "a measured RTT", || async {
        client.status_info().rtt
    })
    .await;
    assert!(client.rtt().await? > Duration::ZERO);
    server.pause()?;
    eventually(WAIT, "unhealthy while frozen", || async {
        (!client.is_healthy()).then_some(())
    })
    .await;
    server.resume()?;
    eventually(WAIT, "healthy after thaw", || async {
        client.is_healthy().then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn connection_lost_fires_once_per_outage() -> TestResult {
    let mut server = NatsServer::start()?;
    let lost = Arc::new(AtomicUsize::new(0));
    let counter = lost.clone();
    let client = Client::builder(server.url())
        .reconnect_wait(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(200))
        .max_backoff(Duration::from_millis(200))
        .connection_lost_after(Duration::from_millis(300))
        .on_connection_lost(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .connect()
        .await?;
    server.kill()?;
    eventually(WAIT, "connection lost", || async {
        (lost.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    // Several more lost-after periods pass while still down: no second call.
    // Failed reconnect attempts count against the breaker, whose open time
    // (200 ms) paces them: ten failures take well over three 300 ms periods.
    eventually(WAIT, "ten failed reconnect attempts", || async {
        (client.status_info().total_failures >= 10).then_some(())
    })
    .await;
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    server.restart()?;
    wait_status(&client, Status::Connected).await;
    assert_eq!(lost.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn wrong_credentials_are_rejected_clearly() -> TestResult {
    let server = NatsServer::builder()
        .user_password("app", "s3cret")
        .start()?;
    let good = Client::builder(server.url())
        .user_password("app", "s3cret")
        .connect()
        .await?;
    good.publish("a.b", "ok").await?;
    let err = Client::builder(server.url())
        .user_password("app", "wrong")
        .connect()
        .await
        .expect_err("wrong password");
    assert!(err.is_auth(), "not an auth error: {err}");
    assert!(err.to_string().to_lowercase().contains("authoriz"), "{err}");

    let server = NatsServer::builder().token("t0ken").start()?;
    Client::builder(server.url())
        .token("t0ken")
        .connect()
        .await?;
    let err = Client::builder(server.url())
        .token("nope")
        .connect()
        .await
        .expect_err("wrong token");
    assert!(err.is_auth(), "not an auth error: {err}");
    Ok(())
}

#[tokio::test]
async fn nkey_auth() -> TestResult {
    let (seed, public) = natskit_testing::new_user_nkey()?;
    let server = NatsServer::builder().nkey_user(public).start()?;
    let client = Client::builder(server.url()).nkey(seed).connect().await?;
    client.publish("nkey.ok", "x").await?;
    let (other_seed, _) = natskit_testing::new_user_nkey()?;
    let err = Client::builder(server.url())
        .nkey(other_seed)
        .connect()
        .await
        .expect_err("an unknown nkey");
    assert!(err.is_auth(), "not an auth error: {err}");
    Ok(())
}

#[tokio::test]
async fn credentials_file_auth() -> TestResult {
    let auth = natskit_testing::OperatorAuth::generate()?;
    let server = NatsServer::builder().operator(&auth).start()?;
    let creds = server.dir().join("app.creds");
    auth.write_user_creds("app", &creds)?;
    let client = Client::builder(server.url())
        .credentials_file(&creds)
        .connect()
        .await?;
    let replies = client
        .serve(
            "creds.echo",
            SubscribeOptions::new(),
            |req: Message| async move { Ok::<_, ServiceError>(req.payload) },
        )
        .await?;
    let reply = client
        .request_timeout("creds.echo", "signed", Duration::from_secs(5))
        .await?;
    assert_eq!(reply.as_ref(), b"signed");
    drop(replies);

    let stranger = natskit_testing::OperatorAuth::generate()?;
    let foreign = server.dir().join("eve.creds");
    stranger.write_user_creds("eve", &foreign)?;
    let err = Client::builder(server.url())
        .credentials_file(&foreign)
        .connect()
        .await
        .expect_err("a user of another operator");
    assert!(err.is_auth(), "not an auth error: {err}");
    let err = Client::builder(server.url())
        .credentials_file(server.dir().join("missing.creds"))
        .connect()
        .await
        .expect_err("a missing credentials file");
    assert!(err.to_string().contains("missing.creds"), "{err}");
    let seed = std::fs::read_to_string(&creds)?
        .lines()
        .nth(5)
        .unwrap_or_default()
        .to_owned();
    assert!(seed.starts_with("SU"), "the creds file layout changed");
    assert!(!format!("{client:?}").contains(&seed));
    Ok(())
}

#[tokio::test]
async fn buffering_while_disconnected_is_opt_in() -> TestResult {
    let mut server = NatsServer::start()?;
    let strict = Client::builder(server.url())
        .reconnect_wait(Duration::from_millis(50))
        .connect()
        .await?;
    let buffering = Client::builder(server.url())
        .reconnect_wait(Duration::from_millis(50))
        .buffer_when_disconnected(true)
        .connect()
        .await?;
    let mut received = buffering.subscribe_stream("down.x").await?;
    buffering.nats()?.flush().await?;
    server.kill()?;
    wait_status(&strict, Status::Reconnecting).await;
    wait_status(&buffering, Status::Reconnecting).await;
    assert!(
        strict
            .publish("down.x", "x")
            .await
            .unwrap_err()
            .is_not_connected()
    );
    buffering.publish("down.x", "queued").await?;
    server.restart()?;
    wait_status(&buffering, Status::Connected).await;
    buffering.publish("down.x", "after").await?;
    // The subscription is sent again before the buffered publish goes out.
    for expected in ["queued", "after"] {
        let msg = tokio::time::timeout(WAIT, received.next())
            .await?
            .expect("a message");
        assert_eq!(&msg.payload[..], expected.as_bytes());
    }
    Ok(())
}

#[tokio::test]
async fn tls_trusted_ca_and_client_certificate() -> TestResult {
    let server = NatsServer::builder().tls_verify_clients().start()?;
    let files = server.tls_files().expect("tls").clone();
    let client = Client::builder(server.url())
        .tls_ca(&files.ca)
        .tls_client_cert(&files.client_cert, &files.client_key)
        .connect()
        .await?;
    client.publish("tls.ok", "x").await?;

    let other = tempfile::tempdir()?;
    let untrusted = natskit_testing::TlsFiles::generate(other.path())?;
    let err = Client::builder(server.url())
        .tls_ca(&untrusted.ca)
        .tls_client_cert(&files.client_cert, &files.client_key)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .expect_err("untrusted server certificate");
    assert!(matches!(err, Error::Connect(_)), "{err}");
    assert!(
        err.to_string().contains("certificate"),
        "unclear TLS error: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn secrets_never_show_in_debug() -> TestResult {
    let client = Client::builder("nats://127.0.0.1:1")
        .user_password("alice", "hunter2")
        .token("tok-123")
        .nkey("SUAMK2FG4MI6UE3ACF3FK3OIQBCEIEZV7NSWFFEW63UXMRLFM2XLAXK4GY")
        .build()?;
    let text = format!("{client:?}");
    assert!(text.contains("alice"), "{text}");
    for secret in ["hunter2", "tok-123", "SUAMK2FG"] {
        assert!(!text.contains(secret), "{secret} leaked: {text}");
    }
    client.close().await?;
    assert!(
        !format!("{client:?}").contains("alice"),
        "credentials kept after close"
    );
    Ok(())
}

#[tokio::test]
async fn close_drains_and_is_idempotent() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let handled = Arc::new(AtomicUsize::new(0));
    let count = handled.clone();
    let sub = client
        .subscribe("drain.me", move |_msg: Message| {
            let count = count.clone();
            async move {
                tokio::task::yield_now().await;
                count.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await?;
    for i in 0..2000 {
        client.publish("drain.me", format!("{i}")).await?;
    }
    client.close().await?;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2000,
        "close must drain: {:?}",
        sub.stats()
    );
    assert!(sub.is_finished());
    assert_eq!(sub.stats().handled, 2000);
    client.close().await?; // no-op
    assert_eq!(client.status(), Status::Closed);
    assert!(client.publish("a", "b").await.unwrap_err().is_closed());
    assert!(client.connect().await.unwrap_err().is_closed());
    Ok(())
}

/// A subscription waits for its first message in the client's parking
/// task: unsubscribing, draining and closing before (or just as) the first
/// message arrives end it as they end a running one, and its first
/// messages are handled in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_waiting_for_their_first_message_stop_drain_and_close() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = |seen: &Arc<Mutex<Vec<String>>>| {
        let seen = seen.clone();
        move |msg: Message| {
            let seen = seen.clone();
            async move {
                if let Ok(mut seen) = seen.lock() {
                    seen.push(String::from_utf8_lossy(&msg.payload).into_owned());
                }
            }
        }
    };
    // Unsubscribed before any message: finished, and gone from the server.
    let idle = client.subscribe("parked.idle", record(&seen)).await?;
    idle.unsubscribe().await;
    assert!(idle.is_finished());
    client.publish("parked.idle", "late").await?;
    // Drained right after its first messages were sent: all handled, in order.
    let drained = client.subscribe("parked.drain", record(&seen)).await?;
    client.nats()?.flush().await?;
    for i in 0..5 {
        client.publish("parked.drain", format!("d{i}")).await?;
    }
    drained.drain().await;
    assert!(drained.is_finished());
    assert_eq!(drained.stats().handled, 5, "{:?}", drained.stats());
    // Many waiting at close: close drains and ends every one.
    let mut waiting = Vec::new();
    for i in 0..200 {
        waiting.push(
            client
                .subscribe(format!("parked.many.{i}"), record(&seen))
                .await?,
        );
    }
    client.nats()?.flush().await?;
    client.publish("parked.many.7", "m7").await?;
    client.close().await?;
    assert!(waiting.iter().all(|s| s.is_finished()));
    assert_eq!(waiting[7].stats().handled, 1);
    let seen = seen.lock().map_err(|_| "poisoned")?.clone();
    assert_eq!(
        seen,
        ["d0", "d1", "d2", "d3", "d4", "m7"],
        "the unsubscribed one saw nothing"
    );
    Ok(())
}

/// Every status watcher and callback sees `Closed` exactly once, last; the
/// race between the shutdown token and the `Closed` signal lost it in most
/// connect-then-close cycles, so the test loops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_watcher_and_callback_sees_closed_once_and_last() -> TestResult {
    let server = NatsServer::start()?;
    for cycle in 0..30 {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let client = Client::builder(server.url())
            .on_status_change(move |status| {
                if let Ok(mut seen) = record.lock() {
                    seen.push(status);
                }
            })
            .connect()
            .await?;
        let mut watch = client.status_watch();
        let waiter = tokio::spawn(async move {
            watch
                .wait_for(|s| *s == Status::Closed)
                .await
                .map(|s| *s)
                .map_err(|e| e.to_string())
        });
        client.close().await?;
        let watched = tokio::time::timeout(WAIT, waiter).await??;
        assert_eq!(watched, Ok(Status::Closed), "cycle {cycle}: the watcher");
        let seen = eventually(WAIT, "the Closed callback", || async {
            let seen = seen.lock().ok()?.clone();
            seen.contains(&Status::Closed).then_some(seen)
        })
        .await;
        let closed = seen.iter().filter(|s| **s == Status::Closed).count();
        assert_eq!(closed, 1, "cycle {cycle}: Closed once: {seen:?}");
        assert_eq!(
            seen.last(),
            Some(&Status::Closed),
            "cycle {cycle}: {seen:?}"
        );
        assert!(
            client
                .wait_for_connection(Duration::from_secs(1))
                .await
                .is_err_and(|e| e.is_closed()),
            "cycle {cycle}: wait_for_connection after close"
        );
    }
    Ok(())
}

#[tokio::test]
async fn handler_panics_and_overruns_do_not_stop_the_subscription() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let ok = Arc::new(AtomicUsize::new(0));
    let count = ok.clone();
    let sub = client
        .subscribe_with(
            "chaos",
            SubscribeOptions::new().deadline(Duration::from_millis(100)),
            move |msg: Message| {
                let count = count.clone();
                async move {
                    match &msg.payload[..] {
                        b"panic" => panic!("handler bug"),
                        b"slow" => tokio::time::sleep(Duration::from_secs(60)).await,
                        b"fail" => return Err("refused"),
                        _ => {
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(())
                }
            },
        )
        .await?;
    for payload in ["panic", "slow", "fail", "ok", "panic", "ok"] {
        client.publish("chaos", payload).await?;
    }
    eventually(WAIT, "both ok messages", || async {
        (ok.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;
    let stats = sub.stats();
    assert_eq!((stats.panics, stats.timeouts, stats.errors), (2, 1, 1));
    assert_eq!(stats.handled, 6);
    sub.unsubscribe().await;
    sub.unsubscribe().await; // idempotent
    Ok(())
}

#[tokio::test]
async fn concurrent_handlers_and_queue_groups() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let total = Arc::new(AtomicUsize::new(0));
    let mut subs = Vec::new();
    for _ in 0..2 {
        let total = total.clone();
        subs.push(
            client
                .subscribe_with(
                    "work.*",
                    SubscribeOptions::new().queue("workers").concurrency(4),
                    move |_msg: Message| {
                        let total = total.clone();
                        async move {
                            total.fetch_add(1, Ordering::SeqCst);
                        }
                    },
                )
                .await?,
        );
    }
    client.nats()?.flush().await?;
    for i in 0..100 {
        client.publish(format!("work.{i}"), "job").await?;
    }
    eventually(WAIT, "100 jobs", || async {
        (total.load(Ordering::SeqCst) == 100).then_some(())
    })
    .await;
    let received: u64 = subs.iter().map(|s| s.stats().received).sum();
    assert_eq!(received, 100, "a queue group delivers each message once");
    Ok(())
}

/// Messages reach a handler through natskit's staging queue (everything
/// that arrives while the handler waits) and straight from the
/// subscription (when it finishes at once): every one is handled once, in
/// order, and counted; no snapshot shows more handled than received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_get_every_message_in_order_whether_staged_or_not() -> TestResult {
    const STAGED: u32 = 5_000;
    const N: u32 = 20_000;
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let seen = Arc::new(Mutex::new(Vec::with_capacity(N as usize)));
    // The first message's handler waits until every message of the first
    // batch was sent: those are staged behind it.
    let release = Arc::new(tokio::sync::Notify::new());
    let (log, gate) = (seen.clone(), release.clone());
    let sub = client
        .subscribe("ordered.in", move |msg: Message| {
            let (log, gate) = (log.clone(), gate.clone());
            async move {
                let i: u32 = std::str::from_utf8(&msg.payload)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(u32::MAX);
                if i == 0 {
                    gate.notified().await;
                } else if i.is_multiple_of(97) {
                    tokio::task::yield_now().await;
                }
                log.lock().unwrap().push(i);
            }
        })
        .await?;
    client.nats()?.flush().await?;
    let check = |stats: natskit::SubscriptionStats| {
        assert!(stats.received >= stats.handled, "{stats:?}");
        stats
    };
    let publish = |range: std::ops::Range<u32>| {
        let client = client.clone();
        async move {
            for i in range {
                client.publish("ordered.in", i.to_string()).await?;
            }
            client.nats()?.flush().await?;
            TestResult::Ok(())
        }
    };
    publish(0..STAGED).await?;
    eventually(
        WAIT,
        "the first batch staged behind the waiting handler",
        || async {
            let stats = check(sub.stats());
            (stats.received == u64::from(STAGED) && stats.handled == 0).then_some(())
        },
    )
    .await;
    release.notify_one();
    eventually(WAIT, "the staged batch handled", || async {
        (check(sub.stats()).handled == u64::from(STAGED)).then_some(())
    })
    .await;
    // The queue is empty now: the rest comes straight to the handler.
    publish(STAGED..N).await?;
    let stats = eventually(WAIT, "every message handled", || async {
        let stats = check(sub.stats());
        (stats.handled + stats.dropped >= u64::from(N)).then_some(stats)
    })
    .await;
    assert_eq!(
        (stats.received, stats.handled, stats.dropped),
        (u64::from(N), u64::from(N), 0),
        "{stats:?}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "handled once each, in order"
    );
    sub.unsubscribe().await;
    Ok(())
}

#[tokio::test]
async fn slow_consumer_drops_are_counted() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url())
        .subscription_capacity(8)
        .connect()
        .await?;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let wait = gate.clone();
    let sub = client
        .subscribe("flood", move |_msg: Message| {
            let wait = wait.clone();
            async move {
                let _ = wait.acquire().await.map(|p| p.forget());
            }
        })
        .await?;
    for _ in 0..500 {
        client.publish("flood", "x").await?;
    }
    client.nats()?.flush().await?;
    eventually(WAIT, "drops to be reported", || async {
        let info = client.status_info();
        (info.dropped_messages > 0 && sub.stats().dropped > 0).then_some(())
    })
    .await;
    gate.add_permits(1000);
    // Every message is either handled or dropped, and both counts of the
    // drops agree once the subscription is idle.
    let stats = eventually(WAIT, "every message handled or dropped", || async {
        let stats = sub.stats();
        (stats.handled + stats.dropped == 500).then_some(stats)
    })
    .await;
    eventually(WAIT, "the client-wide drop count to agree", || async {
        (client.status_info().dropped_messages == stats.dropped).then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn invalid_input_is_typed_and_not_a_failure() -> TestResult {
    let server = NatsServer::builder()
        .extra_config("max_payload: 1024")
        .start()?;
    let client = Client::builder(server.url())
        .trace_mode(natskit::trace::TraceMode::Off)
        .connect()
        .await?;
    for bad in ["", "a b", "a.*", "a.>", "a..b"] {
        let err = client.publish(bad, "x").await.unwrap_err();
        assert!(
            matches!(err, Error::InvalidSubject { .. }),
            "{bad:?}: {err}"
        );
    }
    let err = client.publish("big", vec![0u8; 2048]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                size: 2048,
                max: 1024
            }
        ),
        "{err}"
    );
    client.publish("fits", vec![0u8; 1024]).await?;
    // With trace headers on, they count towards the limit too.
    let traced = Client::builder(server.url()).connect().await?;
    let err = traced.publish("fits", vec![0u8; 1024]).await.unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { size, max: 1024 } if size > 1024),
        "{err}"
    );
    let err = client
        .subscribe("a.>.b", |_m: Message| async {})
        .await
        .unwrap_err();
    assert!(err.is_invalid_input());
    let err = client
        .request_timeout("nobody.home", "x", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.is_no_responders(), "{err}");
    assert_eq!(
        client.status_info().total_failures,
        0,
        "none of these count"
    );
    // Tracing off takes the eager publish path: a closed client still
    // refuses before any I/O.
    client.close().await?;
    let err = client.publish("fits", "x").await.unwrap_err();
    assert!(matches!(err, Error::Closed), "{err}");
    Ok(())
}

#[tokio::test]
async fn not_connected_before_connect() -> TestResult {
    let client = Client::new("nats://127.0.0.1:1")?;
    assert_eq!(client.status(), Status::Disconnected);
    assert!(
        client
            .publish("a", "b")
            .await
            .unwrap_err()
            .is_not_connected()
    );
    assert!(
        client
            .request("a", "b")
            .await
            .unwrap_err()
            .is_not_connected()
    );
    assert!(matches!(
        Client::new("not a url :// at all"),
        Err(Error::InvalidConfig(_))
    ));
    assert!(matches!(Client::new(" , "), Err(Error::InvalidConfig(_))));
    Ok(())
}

#[tokio::test]
async fn serve_replies_and_reports_errors_in_headers() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let service = client
        .serve(
            "math.double",
            SubscribeOptions::new(),
            |msg: Message| async move {
                let text = std::str::from_utf8(&msg.payload)
                    .map_err(|e| ServiceError::new(400, e.to_string()))?;
                let n: i64 = text.parse()?;
                Ok::<_, ServiceError>(Bytes::from((n * 2).to_string()))
            },
        )
        .await?;
    client.nats()?.flush().await?;
    let reply = client.request("math.double", "21").await?;
    assert_eq!(&reply[..], b"42");

    let mut headers = HeaderMap::new();
    headers.insert("X-Caller", "test");
    // natskit's requests turn the service error headers into Error::Service.
    let err = client
        .request_with(
            "math.double",
            "twenty",
            RequestOptions::new()
                .headers(headers)
                .timeout(Duration::from_secs(2)),
        )
        .await
        .expect_err("a service error");
    match &err {
        Error::Service(service_error) => assert_eq!(service_error.code, 500),
        other => panic!("expected a service error, got {other}"),
    }
    assert!(!err.is_infrastructure());
    // On the wire: the NATS micro headers and an `error: ` body.
    let reply = client
        .nats()?
        .request("math.double", "twenty".into())
        .await?;
    let error = reply.headers.as_ref().expect("error headers");
    assert!(error.get(natskit::SERVICE_ERROR_HEADER).is_some());
    assert_eq!(
        error
            .get(natskit::SERVICE_ERROR_CODE_HEADER)
            .map(|v| v.as_str()),
        Some("500")
    );
    assert!(reply.payload.starts_with(b"error: "));
    assert_eq!(service.stats().handled, 3);

    // A reply to a message without a reply subject is a typed error, and
    // sends nothing: the first message a catch-all subscriber sees is the
    // marker published after it.
    let mut everything = client.subscribe_stream(">").await?;
    client.nats()?.flush().await?;
    client.publish("not.a.request", "x").await?;
    let published = tokio::time::timeout(WAIT, everything.next())
        .await?
        .expect("a message");
    let err = client
        .reply(&published, "nobody asked")
        .await
        .expect_err("no reply subject");
    assert!(
        matches!(&err, Error::NoReplySubject { subject } if subject == "not.a.request")
            && err.is_invalid_input(),
        "{err}"
    );
    client.publish("reply.marker", "after").await?;
    let next = tokio::time::timeout(WAIT, everything.next())
        .await?
        .expect("a message");
    assert_eq!(next.subject.as_str(), "reply.marker", "{next:?}");

    // A reply to a request reaches the requester, headers and all.
    let mut requests = client.subscribe_stream("echo.once").await?;
    client.nats()?.flush().await?;
    let requester = client.clone();
    let asked = tokio::spawn(async move { requester.request("echo.once", "q").await });
    let request = tokio::time::timeout(WAIT, requests.next())
        .await?
        .expect("the request");
    client.reply(&request, "answer").await?;
    assert_eq!(&asked.await??[..], b"answer");
    Ok(())
}

#[tokio::test]
async fn request_retry_waits_for_a_late_responder() -> TestResult {
    let server = NatsServer::start()?;
    let client = Client::builder(server.url()).connect().await?;
    let in_msgs = |server: &NatsServer| {
        server
            .monitor("/varz")
            .ok()
            .and_then(|v| v.get("in_msgs").and_then(serde_json::Value::as_u64))
            .unwrap_or(0)
    };
    let before = in_msgs(&server);
    let retry = RetryConfig {
        max_retries: 50,
        backoff: natskit::Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
    };
    let requester = client.clone();
    let request = tokio::spawn(async move {
        let mut headers = HeaderMap::new();
        headers.insert("tenant", "acme");
        requester
            .request_with(
                "late.svc",
                "ping",
                RequestOptions::new()
                    .headers(headers)
                    .timeout(Duration::from_millis(500))
                    .retry(retry),
            )
            .await
    });
    // Start the responder only once a first attempt has reached the server.
    eventually(WAIT, "a first request attempt", || async {
        (in_msgs(&server) > before).then_some(())
    })
    .await;
    let _service = client
        .serve(
            "late.svc",
            SubscribeOptions::new(),
            |msg: Message| async move {
                // The caller's headers ride on every attempt, retries too.
                let tenant = msg
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("tenant"))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                Ok::<_, ServiceError>(Bytes::from(format!(
                    "{}:{tenant}",
                    String::from_utf8_lossy(&msg.payload)
                )))
            },
        )
        .await?;
    assert_eq!(&request.await??.payload[..], b"ping:acme");

    let retry = RetryConfig {
        max_retries: 2,
        backoff: natskit::Backoff::new(Duration::from_millis(10), Duration::from_millis(20)),
    };
    let err = client
        .request_with(
            "never.svc",
            "ping",
            RequestOptions::new()
                .timeout(Duration::from_millis(200))
                .retry(retry),
        )
        .await
        .unwrap_err();
    assert!(
        err.is_no_responders(),
        "gives up with the last error: {err}"
    );
    Ok(())
}

#[tokio::test]
async fn retry_initial_connect_waits_for_a_late_server() -> TestResult {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let client = Client::builder(format!("nats://127.0.0.1:{port}"))
        .retry_initial_connect(true)
        .reconnect_wait(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(100))
        .build()?;
    client.connect().await?;
    assert!(
        client
            .wait_for_connection(Duration::from_millis(100))
            .await
            .unwrap_err()
            .is_timeout()
    );
    let _server = NatsServer::builder().port(port).start()?;
    client.wait_for_connection(WAIT).await?;
    client.publish("late.start", "ok").await?;
    Ok(())
}

#[tokio::test]
async fn a_client_dropped_while_retrying_its_first_connect_is_freed() -> TestResult {
    let server = NatsServer::builder().token("right").start()?;
    // The sentinel lives in a callback, so it is freed with the client's state.
    let sentinel = Arc::new(());
    let held = sentinel.clone();
    let client = Client::builder(server.url())
        .token("wrong")
        .retry_initial_connect(true)
        .reconnect_wait(Duration::from_millis(20))
        .breaker_threshold(1000)
        .on_reconnect(move || {
            let _ = &held;
        })
        .build()?;
    client.connect().await?;
    eventually(WAIT, "refused attempts", || async {
        (client.status_info().total_failures >= 2).then_some(())
    })
    .await;
    drop(client);
    eventually(WAIT, "the retry task to let the client go", || async {
        (Arc::strong_count(&sentinel) == 1).then_some(())
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_client_fails_over() -> TestResult {
    let mut cluster = tokio::task::spawn_blocking(|| natskit_testing::Cluster::start(3)).await??;
    let client = Client::builder(cluster.urls())
        .reconnect_wait(Duration::from_millis(50))
        .connect()
        .await?;
    let connected_port = client.nats()?.server_info().port;
    let index = (0..cluster.len())
        .find(|&i| cluster.node(i).client_port() == connected_port)
        .expect("connected to a node of the cluster");
    tokio::task::block_in_place(|| cluster.node_mut(index).kill())?;
    eventually(WAIT, "a reconnect to another node", || async {
        (client.status_info().reconnects == 1 && client.status() == Status::Connected).then_some(())
    })
    .await;
    assert_ne!(client.nats()?.server_info().port, connected_port);
    client.publish("after.failover", "ok").await?;
    Ok(())
}
