//! Stream and consumer gauges polled from the server
//! ([`Client::monitor_stream`]).

use std::time::Duration;

use metrics::gauge;

use crate::client::Client;
use crate::core::error::Result;

/// A running poll of stream and consumer gauges. Like every handle to work
/// natskit runs for you, dropping it does **not** stop it:
/// [`stop`](Self::stop) does, and so does closing (or dropping) the client.
#[derive(Debug, Clone)]
pub struct StreamMonitor {
    task: tokio::task::AbortHandle,
}

impl StreamMonitor {
    /// Stops polling.
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Whether polling has stopped (stopped, or the client closed).
    pub fn is_stopped(&self) -> bool {
        self.task.is_finished()
    }
}

impl Client {
    /// Polls `stream` every `interval` and sets `natskit_stream_messages`,
    /// `natskit_stream_bytes` and, for the consumers this client runs on it,
    /// `natskit_consumer_pending`, from the server's values.
    ///
    /// # Errors
    /// [`Error::ZeroDuration`](crate::Error::ZeroDuration) for a zero
    /// interval, [`Error::InvalidName`](crate::Error::InvalidName).
    pub fn monitor_stream(&self, stream: &str, interval: Duration) -> Result<StreamMonitor> {
        crate::core::subject::validate_name("stream", stream)?;
        crate::core::error::check_nonzero("monitor interval", interval)?;
        let weak = self.downgrade();
        let shutdown = self.shutdown().clone();
        let name = stream.to_owned();
        let metrics = self.metrics().clone();
        let labels = [
            ("client", metrics.client.to_string()),
            ("stream", name.clone()),
        ];
        let messages = gauge!("natskit_stream_messages", &labels);
        let bytes = gauge!("natskit_stream_bytes", &labels);
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                // Weak: the monitor must not keep a dropped client alive.
                let Some(client) = weak.upgrade() else { break };
                let Ok(mut stream) = client.get_stream(&name).await else {
                    continue;
                };
                if let Ok(info) = stream.info().await {
                    #[allow(clippy::cast_precision_loss)]
                    {
                        messages.set(info.state.messages as f64);
                        bytes.set(info.state.bytes as f64);
                    }
                }
                for consumer in client.consumer_names_on(&name) {
                    if let Ok(info) = stream.consumer_info(&consumer).await {
                        #[allow(clippy::cast_precision_loss)]
                        gauge!(
                            "natskit_consumer_pending",
                            "client" => metrics.client.to_string(),
                            "stream" => name.clone(),
                            "consumer" => consumer
                        )
                        .set(info.num_pending as f64);
                    }
                }
            }
        });
        Ok(StreamMonitor {
            task: task.abort_handle(),
        })
    }
}
