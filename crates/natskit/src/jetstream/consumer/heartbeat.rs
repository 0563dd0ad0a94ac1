//! Long work on one message: in-progress acks while it runs, and how its
//! outcome settles the message.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};

use crate::core::error::{BoxError, Error, Result, check_nonzero};

/// Marks a work error as permanent: [`consume_with_heartbeat`] terminates
/// the message instead of naking it, so it is never redelivered.
#[derive(Debug)]
pub struct Permanent(pub BoxError);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "permanent failure: {}", self.0)
    }
}

impl std::error::Error for Permanent {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// How [`consume_with_heartbeat`] settled the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// The work succeeded; the message was acknowledged.
    Acked,
    /// The work failed; the message was naked with a 30 s delay.
    Naked,
    /// The work failed permanently; the message was terminated.
    Terminated,
}

/// Runs `work` for `message` while telling the server every `interval`
/// that the work is in progress, so a short ack wait detects dead workers
/// while long work still completes.
///
/// Owns the acknowledgement: success acks; an error naks with a 30 s delay;
/// an error wrapped in [`Permanent`] terminates the message; dropping the
/// returned future (cancellation) naks with a 5 s delay. If an in-progress
/// signal cannot be sent, the work is cancelled (not left running) and the
/// error returned; the server will redeliver.
///
/// ```no_run
/// # async fn demo(msg: async_nats::jetstream::Message) -> natskit::Result<()> {
/// use std::time::Duration;
/// let settled = natskit::consume_with_heartbeat(&msg, Duration::from_secs(5), async {
///     // long work
///     Ok::<_, std::io::Error>(())
/// })
/// .await?;
/// # let _ = settled; Ok(()) }
/// ```
///
/// # Errors
/// [`Error::ZeroDuration`] for a zero interval (the message is not
/// touched); [`Error::JetStream`] when an in-progress or the final
/// acknowledgement could not be sent.
pub async fn consume_with_heartbeat<W, E>(
    message: &jetstream::Message,
    interval: Duration,
    work: W,
) -> Result<Settled>
where
    W: Future<Output = std::result::Result<(), E>>,
    E: Into<BoxError>,
{
    check_nonzero("heartbeat interval", interval)?;
    let ack_error = |op: &'static str, e: async_nats::Error| Error::JetStream { op, source: e };
    let mut guard = NakOnDrop {
        message: Some(message.clone()),
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    let mut work = std::pin::pin!(work);
    let outcome = loop {
        tokio::select! {
            result = &mut work => break result.map_err(Into::into),
            _ = ticker.tick() => {
                if let Err(err) = message.ack_with(AckKind::Progress).await {
                    guard.message = None; // the server redelivers; do not nak
                    return Err(ack_error("in-progress", err));
                }
            }
        }
    };
    guard.message = None;
    match outcome {
        Ok(()) => {
            message.ack().await.map_err(|e| ack_error("ack", e))?;
            Ok(Settled::Acked)
        }
        Err(err) if err.downcast_ref::<Permanent>().is_some() => {
            tracing::warn!(%err, "permanent failure; terminating message");
            message
                .ack_with(AckKind::Term)
                .await
                .map_err(|e| ack_error("term", e))?;
            Ok(Settled::Terminated)
        }
        Err(err) => {
            tracing::warn!(%err, "work failed; naking message for 30 s");
            message
                .ack_with(AckKind::Nak(Some(Duration::from_secs(30))))
                .await
                .map_err(|e| ack_error("nak", e))?;
            Ok(Settled::Naked)
        }
    }
}

/// Naks with a 5 s delay when `consume_with_heartbeat` is cancelled.
struct NakOnDrop {
    message: Option<jetstream::Message>,
}

impl Drop for NakOnDrop {
    fn drop(&mut self) {
        if let Some(message) = self.message.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                let _ = message
                    .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                    .await;
            });
        }
    }
}
