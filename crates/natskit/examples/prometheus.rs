//! natskit metrics served for Prometheus at `/metrics`.
//!
//! `cargo run -p natskit --example prometheus` fetches its own endpoint once
//! and prints it; add `-- --serve` to keep serving on 127.0.0.1:9464.
//! Uses `$NATS_URL`, or starts a local server through the harness.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    // Install the recorder before building clients: handles bind at build.
    let prometheus = PrometheusBuilder::new().install_recorder()?;

    let (_server, url) = natskit_testing::env_or_local_server(false)?;
    let client = natskit::Client::builder(&url)
        .name("prometheus-example")
        .connect()
        .await?;
    let _echo = client
        .serve(
            "example.echo",
            natskit::SubscribeOptions::new(),
            |m: natskit::Message| async move { Ok::<_, natskit::ServiceError>(m.payload) },
        )
        .await?;
    for _ in 0..10 {
        client
            .request_timeout("example.echo", "ping", Duration::from_secs(1))
            .await?;
    }

    let listener = TcpListener::bind("127.0.0.1:9464").await?;
    let address = listener.local_addr()?;
    let handle = prometheus.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = handle.render();
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    println!("serving http://{address}/metrics");

    if std::env::args().any(|a| a == "--serve") {
        tokio::signal::ctrl_c().await?;
    } else {
        let mut socket = TcpStream::connect(address).await?;
        socket
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        let mut response = String::new();
        socket.read_to_string(&mut response).await?;
        for line in response.lines().filter(|l| l.starts_with("natskit_")) {
            println!("{line}");
        }
    }
    client.close().await?;
    Ok(())
}
