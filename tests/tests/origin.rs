//! Back to source: real daemons downloading from a real HTTP origin on loopback
//! (`tests/origin_server.py`, Range, ETag and fault modes), alone and as the fallback of peers.

use ferry_engine::proto;
use ferry_tests::*;
use sha2::{Digest, Sha256};
use std::path::Path;
use tonic::Code;

/// A daemon whose origin settings make failures quick: 1 s stalls, 2 retries from 50 ms.
async fn daemon(root: &Path, name: &str, extra: &[&str]) -> Daemon {
    let config = root.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        "[origin]\nconnections = 4\nretries = 3\nretry_base_ms = 50\nretry_max_ms = 200\nio_timeout_secs = 1\nconnect_timeout_secs = 2\n",
    )
    .unwrap();
    let mut args = vec!["--config".to_owned(), config.display().to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start(
        root,
        name,
        DaemonOptions {
            extra_args: args,
            ..Default::default()
        },
    )
    .await
}

fn sha256_of(path: &Path) -> String {
    let digest = Sha256::digest(std::fs::read(path).unwrap());
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn pull_from_the_origin_alone_is_byte_identical_and_counted_as_back_to_source() {
    let root = scratch("origin-alone");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 18 * MIB + 12_345; // 5 pieces of 4 MiB, the last one short
    random_file(&files.join("model.bin"), size, 1);
    let origin = OriginServer::start(&files);
    let receiver = daemon(root.path(), "receiver", &["--metrics", "127.0.0.1:0"]).await;

    // Through the CLI, as a user would: `ferry pull --url ... --output ... --json`, with a
    // signed-URL parameter that Dragonfly leaves out of the task id.
    let url = origin.url("model.bin?X-Amz-Signature=abc");
    let output = root.path().join("model.bin");
    let ran = std::process::Command::new(ferry_bin())
        .args(["--control", receiver.control.to_str().unwrap(), "--json"])
        .args(["pull", "--url", &url, "--output", output.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        ran.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ran.stderr),
        receiver.log_text()
    );
    let printed: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert!(same_contents(&files.join("model.bin"), &output));
    let expected_id =
        ferry_engine::origin::task_id(&origin.url("model.bin"), None, None, None).unwrap();
    assert_eq!(
        printed["task_id"],
        expected_id.as_str(),
        "Dragonfly's task id"
    );
    let pieces = printed["pieces"].as_array().unwrap();
    assert_eq!(pieces.len(), 5);
    assert!(
        pieces.iter().all(|p| p["transport"] == "origin"),
        "{pieces:?}"
    );
    let summary = &printed["summary"];
    assert_eq!(summary["back_to_source_bytes"], size);
    assert_eq!(summary["bytes_fetched"], size);
    assert_eq!(summary["piece_length"], 4 * MIB, "Dragonfly's default");
    assert_eq!(summary["content_digest"], sha256_of(&output).as_str());
    assert_eq!(summary["origin_retries"], 0);
    let stats = origin.stats().await;
    let entry = &stats["/model.bin?X-Amz-Signature=abc"];
    assert_eq!(
        entry["ranged"], 6,
        "one probe and one Range request per piece: {stats}"
    );
    assert_eq!(entry["status"]["206"], 6, "{stats}");

    let metrics = receiver.scrape().await;
    assert_eq!(
        metric(&metrics, "ferry_back_to_source_bytes_total"),
        Some(size as f64)
    );
    assert_eq!(
        metric(&metrics, "ferry_back_to_source_pieces_total"),
        Some(5.0)
    );
    assert_eq!(
        metric(
            &metrics,
            r#"ferry_transport_bytes_total{transport="origin",direction="in"}"#
        ),
        Some(size as f64)
    );

    // A redirect and an auth header: followed, and sent.
    let protected = origin.url("model.bin?auth=s3cret&redirect=1");
    let mut request = url_request(&protected, None);
    let err = transfer(&mut receiver.client().await, request.clone(), |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("401"), "{}", err.message());
    request.headers = vec!["Authorization: Bearer s3cret".into()];
    let pulled = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .expect("pull with the header");
    assert_eq!(pulled.summary.unwrap().back_to_source_bytes, size);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_origin_answering_503_at_first_succeeds_with_the_retries_counted() {
    let root = scratch("origin-503");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    random_file(&files.join("f.bin"), 9 * MIB, 2);
    let origin = OriginServer::start(&files);
    let receiver = daemon(root.path(), "receiver", &["--metrics", "127.0.0.1:0"]).await;
    let output = root.path().join("f.bin");
    let pulled = transfer(
        &mut receiver.client().await,
        url_request(&origin.url("f.bin?fail=3"), Some(&output)),
        |_| {},
    )
    .await
    .expect("pull through three 503s");
    assert!(same_contents(&files.join("f.bin"), &output));
    let summary = pulled.summary.unwrap();
    assert_eq!(
        summary.origin_retries, 3,
        "the probe got 503 three times: {summary:?}"
    );
    assert_eq!(summary.back_to_source_bytes, 9 * MIB);
    let stats = origin.stats().await;
    assert_eq!(stats["/f.bin?fail=3"]["status"]["503"], 3, "{stats}");
    let metrics = receiver.scrape().await;
    assert_eq!(metric(&metrics, "ferry_origin_retries_total"), Some(3.0));
}

/// Each lie or failure of the origin: its status code, a message naming it, no output, and
/// (for a changed content) no pieces kept.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalling_truncating_changing_or_rangeless_origin_fails_clearly_with_no_output() {
    let root = scratch("origin-faults");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    random_file(&files.join("f.bin"), 12 * MIB, 3);
    let origin = OriginServer::start(&files);
    let receiver = daemon(root.path(), "receiver", &[]).await;
    let cases = [
        ("f.bin?stall=1000", Code::Unavailable, "stalled"),
        ("f.bin?truncate=1000", Code::DataLoss, "ended after 1000 of"),
        (
            "f.bin?change_after=2",
            Code::Aborted,
            "changed during the download",
        ),
        (
            "f.bin?norange=1",
            Code::FailedPrecondition,
            "does not serve byte ranges",
        ),
        ("missing.bin", Code::NotFound, "404"),
        ("f.bin?fail=100", Code::Unavailable, "503"),
    ];
    for (index, (path, code, words)) in cases.into_iter().enumerate() {
        let output = root.path().join(format!("out-{index}.bin"));
        let started = std::time::Instant::now();
        let err = transfer(
            &mut receiver.client().await,
            url_request(&origin.url(path), Some(&output)),
            |_| {},
        )
        .await
        .expect_err(path);
        assert_eq!(err.code(), code, "{path}: {err:?}");
        assert!(
            err.message().contains(words) && err.message().contains("origin"),
            "{path}: {}",
            err.message()
        );
        assert!(
            !err.message().contains('?'),
            "{path}: the query stays out of messages: {}",
            err.message()
        );
        assert!(!output.exists(), "{path}: nothing placed");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{path}: failed within bounded retries"
        );
        eprintln!("{path}: {code:?} {}", err.message());
    }
    // The changed content's pieces were dropped: a later pull cannot mix them in.
    let changed_id =
        ferry_engine::origin::task_id(&origin.url("f.bin?change_after=2"), None, None, None)
            .unwrap();
    let stat = receiver
        .client()
        .await
        .stat_task(proto::StatTaskRequest {
            task_id: changed_id,
        })
        .await;
    assert_eq!(stat.unwrap_err().code(), Code::NotFound);
    // Retried before failing: a stall and a truncation took 1 + 3 tries per request.
    let stats = origin.stats().await;
    assert!(
        stats["/f.bin?truncate=1000"]["requests"].as_u64().unwrap() >= 5,
        "{stats}"
    );
    assert_eq!(stats["/f.bin?fail=100"]["requests"], 4, "{stats}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_digest_places_nothing() {
    let root = scratch("origin-digest");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    random_file(&files.join("f.bin"), 6 * MIB, 4);
    let origin = OriginServer::start(&files);
    let receiver = daemon(root.path(), "receiver", &[]).await;
    let output = root.path().join("f.bin");
    let mut request = url_request(&origin.url("f.bin"), Some(&output));
    request.digest = format!("sha256:{}", "ab".repeat(32));
    let err = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains("not the pinned"),
        "{}",
        err.message()
    );
    assert!(!output.exists());
    // The right digest: placed.
    let mut request = url_request(&origin.url("f.bin"), Some(&output));
    request.digest = sha256_of(&files.join("f.bin"));
    transfer(&mut receiver.client().await, request, |_| {})
        .await
        .expect("the right digest");
    assert!(same_contents(&files.join("f.bin"), &output));
}

/// A seed downloads from a slow origin; a second daemon pulls from the seed (`--from`) with
/// the origin as its fallback while the seed is still downloading, and a third after it
/// finished, from the seed alone.
#[tokio::test(flavor = "multi_thread")]
async fn peers_serve_pieces_while_and_after_the_seed_downloads_them_from_the_origin() {
    let root = scratch("origin-peers");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 64 * MIB; // 16 pieces
    random_file(&files.join("f.bin"), size, 5);
    let origin = OriginServer::start(&files);
    let url = origin.url("f.bin?delay_ms=400");
    let seed = daemon(root.path(), "seed", &[]).await;
    let second = daemon(root.path(), "second", &[]).await;
    let third = daemon(root.path(), "third", &[]).await;

    let (first_piece_tx, first_piece_rx) = tokio::sync::oneshot::channel();
    let mut first_piece_tx = Some(first_piece_tx);
    let mut seed_client = seed.client().await;
    let mut seed_request = url_request(&url, None);
    seed_request.origin_connections = 2;
    let seeding = tokio::spawn(async move {
        transfer(&mut seed_client, seed_request, move |_| {
            if let Some(tx) = first_piece_tx.take() {
                let _ = tx.send(());
            }
        })
        .await
    });
    first_piece_rx.await.expect("the seed got a piece");

    let output2 = root.path().join("second.bin");
    let mut request = url_request(&url, Some(&output2));
    request.sources = vec![seed.data_address.clone()];
    let pulled = transfer(&mut second.client().await, request, |_| {})
        .await
        .expect("second pull");
    let seeded = seeding.await.unwrap().expect("seed pull");
    assert!(same_contents(&files.join("f.bin"), &output2));
    let summary = pulled.summary.unwrap();
    let from_seed: u64 = pulled
        .pieces
        .iter()
        .filter(|p| p.transport == "tcp" && p.source == seed.data_address)
        .map(|p| p.bytes)
        .sum();
    assert!(
        from_seed > 0,
        "pieces the seed held came from it: {:?}",
        pulled.pieces
    );
    assert_eq!(
        from_seed + summary.back_to_source_bytes,
        size,
        "the rest came from the origin: {summary:?}"
    );
    assert_eq!(seeded.summary.unwrap().back_to_source_bytes, size);

    let output3 = root.path().join("third.bin");
    let mut request = url_request(&url, Some(&output3));
    request.sources = vec![seed.data_address.clone()];
    let pulled = transfer(&mut third.client().await, request, |_| {})
        .await
        .expect("third pull");
    assert!(same_contents(&files.join("f.bin"), &output3));
    let summary = pulled.summary.unwrap();
    assert_eq!(summary.back_to_source_bytes, 0, "the seed had it all");
    assert!(pulled.pieces.iter().all(|p| p.source == seed.data_address));
}
