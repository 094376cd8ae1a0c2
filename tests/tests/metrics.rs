//! The metrics endpoint of real daemons, scraped over HTTP: exact counters after a TCP pull and
//! after a corrupted seed, what the endpoint refuses, and JSON logs.

use ferry_engine::proto;
use ferry_tests::*;
use std::time::{Duration, Instant};
use tonic::Code;

/// 10 pieces of 4 MiB and a short 11th.
const SIZE: u64 = 40 * MIB + 12_345;
const PIECES: u32 = 11;
const PIECE: u64 = 4 * MIB;

fn with_metrics(extra: &[&str]) -> DaemonOptions {
    let mut args = vec!["--metrics".to_owned(), "127.0.0.1:0".to_owned()];
    args.extend(extra.iter().map(|a| a.to_string()));
    DaemonOptions {
        extra_args: args,
        ..DaemonOptions::default()
    }
}

fn value(exposition: &str, series: &str) -> f64 {
    metric(exposition, series).unwrap_or_else(|| panic!("no {series} in\n{exposition}"))
}

const TCP_IN: &str = r#"ferry_transport_bytes_total{transport="tcp",direction="in"}"#;
const TCP_OUT: &str = r#"ferry_transport_bytes_total{transport="tcp",direction="out"}"#;
const RDMA_IN: &str = r#"ferry_transport_bytes_total{transport="rdma",direction="in"}"#;
const RDMA_OUT: &str = r#"ferry_transport_bytes_total{transport="rdma",direction="out"}"#;
const DIGEST_FAILURES: &str = r#"ferry_piece_failures_total{reason="digest"}"#;

/// Scrapes until `ok` holds for what a scrape shows (at most 20 s), returning that scrape.
async fn scrape_until(daemon: &Daemon, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = daemon.scrape().await;
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: never true in\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_pull_is_counted_exactly_on_both_sides() {
    let root = scratch("metrics-pull");
    let source = root.path().join("model.bin");
    random_file(&source, SIZE, 11);
    let seed = Daemon::start(root.path(), "seed", with_metrics(&[])).await;
    let task = seed.import(&source).await;
    assert_eq!(task.pieces.len() as u32, PIECES);
    let mut receiver = Daemon::start(root.path(), "receiver", with_metrics(&[])).await;

    let before = receiver.scrape().await;
    assert_eq!(value(&before, TCP_IN), 0.0);
    assert_eq!(value(&before, r#"ferry_build_info{version="0.1.0"}"#), 1.0);
    assert_eq!(
        value(&before, "ferry_buffer_pool_bytes"),
        (128 * MIB) as f64
    );
    assert_eq!(
        value(&before, "ferry_buffer_pool_free_bytes"),
        (128 * MIB) as f64
    );

    let output = root.path().join("out.bin");
    let mut request = pull_request(&task.task_id, &[&seed.data_address], &output);
    request.transport = proto::TransportPreference::Tcp as i32;
    let result = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap();
    assert_eq!(result.summary.unwrap().bytes_fetched, SIZE);
    assert!(same_contents(&source, &output));

    let fetched = receiver.scrape().await;
    assert_eq!(value(&fetched, TCP_IN), SIZE as f64);
    assert_eq!(value(&fetched, RDMA_IN), 0.0);
    assert_eq!(value(&fetched, TCP_OUT), 0.0, "the receiver served nothing");
    assert_eq!(
        value(&fetched, r#"ferry_pieces_fetched_total{transport="tcp"}"#),
        f64::from(PIECES)
    );
    assert_eq!(
        value(
            &fetched,
            r#"ferry_piece_fetch_seconds_count{transport="tcp"}"#
        ),
        f64::from(PIECES)
    );
    assert_eq!(
        value(
            &fetched,
            r#"ferry_piece_write_seconds_count{transport="tcp"}"#
        ),
        f64::from(PIECES)
    );
    for reason in ["transport", "digest", "store"] {
        let series = format!(r#"ferry_piece_failures_total{{reason="{reason}"}}"#);
        assert_eq!(value(&fetched, &series), 0.0, "{series}");
    }
    assert_eq!(value(&fetched, "ferry_piece_retries_total"), 0.0);
    assert_eq!(value(&fetched, "ferry_rdma_fallbacks_total"), 0.0);
    assert_eq!(
        value(&fetched, r#"ferry_transfers_total{result="completed"}"#),
        1.0
    );
    assert_eq!(
        value(&fetched, r#"ferry_transfers_total{result="failed"}"#),
        0.0
    );
    assert_eq!(value(&fetched, "ferry_transfers_active"), 0.0);
    assert_eq!(
        value(&fetched, "ferry_buffer_pool_free_bytes"),
        (128 * MIB) as f64,
        "every buffer went back to the pool"
    );

    let served = seed.scrape().await;
    assert_eq!(value(&served, TCP_OUT), SIZE as f64);
    assert_eq!(value(&served, RDMA_OUT), 0.0);
    assert_eq!(
        value(&served, r#"ferry_pieces_served_total{transport="tcp"}"#),
        f64::from(PIECES)
    );
    assert_eq!(value(&served, TCP_IN), 0.0, "the seed fetched nothing");
    assert_eq!(value(&served, "ferry_data_bad_frames_total"), 0.0);
    assert_eq!(value(&served, "ferry_data_connections_rejected_total"), 0.0);
    let accepted = value(&served, "ferry_data_connections_accepted_total");
    assert!(accepted >= 1.0, "{served}");
    assert_eq!(
        value(&served, r#"ferry_rdma_sessions{side="serving"}"#),
        0.0
    );

    // The receiver keeps idle connections for reuse; once it is gone, none stays open.
    receiver.kill();
    let after = scrape_until(&seed, "seed's connections closed", |text| {
        metric(text, "ferry_data_connections_open") == Some(0.0)
    })
    .await;
    assert_eq!(
        value(&after, "ferry_data_connections_accepted_total"),
        accepted
    );
    assert_eq!(value(&after, TCP_OUT), SIZE as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_seed_shows_as_digest_failures() {
    use std::os::unix::fs::FileExt;
    let root = scratch("metrics-corrupt");
    let source = root.path().join("model.bin");
    random_file(&source, SIZE, 12);
    let seed = Daemon::start(root.path(), "seed", with_metrics(&[])).await;
    let task = seed.import(&source).await;
    // Flip bytes inside piece 0 of the seed's stored content.
    let content = seed
        .data_dir
        .join("tasks")
        .join(&task.task_id)
        .join("content");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&content)
        .unwrap()
        .write_all_at(b"not the bytes you are looking for", 1000)
        .unwrap();
    let receiver = Daemon::start(root.path(), "receiver", with_metrics(&[])).await;

    // Only piece 0, no output: every attempt (4 by default) gets the corrupted bytes.
    let request = proto::TransferPiecesRequest {
        task_id: task.task_id.clone(),
        sources: vec![seed.data_address.clone()],
        pieces: vec![0],
        transport: proto::TransportPreference::Tcp as i32,
        ..Default::default()
    };
    let err = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");

    let text = receiver.scrape().await;
    assert_eq!(value(&text, DIGEST_FAILURES), 4.0);
    assert_eq!(value(&text, "ferry_piece_retries_total"), 3.0);
    assert_eq!(
        value(&text, r#"ferry_piece_failures_total{reason="transport"}"#),
        0.0
    );
    assert_eq!(
        value(&text, r#"ferry_pieces_fetched_total{transport="tcp"}"#),
        0.0
    );
    // The bytes did arrive, four times, before the digest check refused them.
    assert_eq!(value(&text, TCP_IN), (4 * PIECE) as f64);
    assert_eq!(
        value(&text, r#"ferry_transfers_total{result="failed"}"#),
        1.0
    );
    assert_eq!(value(&text, "ferry_transfers_active"), 0.0);
    let served = seed.scrape().await;
    assert_eq!(value(&served, TCP_OUT), (4 * PIECE) as f64);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_endpoint_answers_only_metrics_and_survives_abuse() {
    let root = scratch("metrics-abuse");
    let daemon = Daemon::start(root.path(), "d", with_metrics(&[])).await;
    let addr = daemon.metrics_address();

    let (status, _) = http_get(&addr, "/").await;
    assert_eq!(status, 404);
    let (status, _) = http_get(&addr, "/metrics/more").await;
    assert_eq!(status, 404);
    let post = http_exchange(
        &addr,
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        String::from_utf8_lossy(&post).starts_with("HTTP/1.1 405"),
        "{}",
        String::from_utf8_lossy(&post)
    );
    let (status, body) = http_get(&addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.ends_with("# EOF\n"));

    // A 64 KiB request head is refused (431, or the connection is cut) without harm.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let huge = format!(
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        let _ = stream.write_all(huge.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("an oversized head is not waited on");
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        );
    }

    // Clients that connect and say nothing are closed after the head timeout (5 s); they do
    // not stop others from scraping meanwhile.
    let silent: Vec<tokio::net::TcpStream> = {
        let mut streams = Vec::new();
        for _ in 0..4 {
            streams.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
        }
        streams
    };
    assert!(daemon.scrape().await.contains("ferry_build_info"));
    let started = Instant::now();
    for mut stream in silent {
        use tokio::io::AsyncReadExt;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(15), stream.read(&mut byte))
            .await
            .expect("a silent client is closed by the daemon");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
    assert!(started.elapsed() < Duration::from_secs(15));
    assert!(daemon.scrape().await.contains("ferry_build_info"));
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_are_one_object_per_line() {
    let root = scratch("metrics-json");
    let mut daemon = Daemon::start(root.path(), "d", with_metrics(&["--log-format", "json"])).await;
    // The metrics address is found in the JSON log too.
    assert!(daemon.scrape().await.contains("ferry_build_info"));
    daemon.kill();
    let log = daemon.log_text();
    let mut messages = Vec::new();
    for line in log.lines() {
        let object: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line:?}"));
        assert!(object["level"].is_string(), "{line}");
        assert!(object["timestamp"].is_string(), "{line}");
        messages.push(
            object["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
        );
    }
    assert!(
        messages.iter().any(|m| m == "ferry daemon ready"),
        "{messages:?}"
    );
}

#[test]
fn a_bad_metrics_address_is_refused_naming_the_key() {
    let root = scratch("metrics-bad");
    let output = std::process::Command::new(ferry_bin())
        .arg("--control")
        .arg(root.path().join("control.sock"))
        .arg("serve")
        .arg("--data-dir")
        .arg(root.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--pool-mib",
            "128",
            "--metrics",
            "not-an-address",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("metrics.listen") && stderr.contains("not-an-address"),
        "{stderr}"
    );
}
