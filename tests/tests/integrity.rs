//! A file is one version, proven: sources that hold another version of a task are refused,
//! the whole content is checked against its SHA-256 before it counts, and no source can make
//! a receiver allocate for a task it cannot hold.

use bytes::BytesMut;
use ferry_engine::proto;
use ferry_fallback_tcp::codec::{split_frame, MAX_REQUEST_VALUE_LEN};
use ferry_fallback_tcp::{Request, Response, TaskInfo};
use ferry_tests::*;
use sha2::{Digest, Sha256};
use std::path::Path;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn sha256_of(path: &Path) -> String {
    format!(
        "sha256:{}",
        hex_string(&Sha256::digest(std::fs::read(path).unwrap()))
    )
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Two seeds hold two checkpoints of one model file: same url (so the same task id), same
/// size, other bytes. Before manifests, a receiver pulling from both placed a file equal to
/// neither, every piece "verified" against its own source's CRC.
#[tokio::test(flavor = "multi_thread")]
async fn two_versions_of_one_task_are_never_mixed() {
    let root = scratch("two-versions");
    let (old, new) = (root.path().join("old.bin"), root.path().join("new.bin"));
    random_file(&old, 64 * MIB, 11);
    random_file(&new, 64 * MIB, 12);
    let url = "https://models.example/llm/model-00001-of-00002.safetensors";
    let seed_old = Daemon::start(root.path(), "seed-old", DaemonOptions::default()).await;
    let seed_new = Daemon::start(root.path(), "seed-new", DaemonOptions::default()).await;
    let task_old = seed_old.import_as(&old, url).await;
    let task_new = seed_new.import_as(&new, url).await;
    assert_eq!(task_old.task_id, task_new.task_id, "one url, one task id");
    assert_eq!(
        task_old.content_digest,
        sha256_of(&old),
        "import fixes the manifest"
    );
    assert_eq!(task_old.content_digest_state, "verified");
    assert_eq!(task_new.content_digest, sha256_of(&new));
    let task_id = task_old.task_id.clone();
    let sources = [
        seed_old.data_address.as_str(),
        seed_new.data_address.as_str(),
    ];

    // No digest given: the first source's manifest pins the version, the other is refused.
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out-first.bin");
    let pulled = transfer(
        &mut receiver.client().await,
        pull_request(&task_id, &sources, &output),
        |_| {},
    )
    .await
    .expect("pull from both");
    let summary = pulled.summary.unwrap();
    assert!(
        same_contents(&old, &output),
        "the file is the old version whole"
    );
    assert_eq!(summary.content_digest, sha256_of(&old));
    assert_eq!(summary.refused_sources.len(), 1, "{summary:?}");
    assert!(
        summary.refused_sources[0].contains(&seed_new.data_address)
            && summary.refused_sources[0].contains("another version"),
        "{:?}",
        summary.refused_sources
    );
    assert!(pulled
        .pieces
        .iter()
        .all(|p| p.source == seed_old.data_address));
    let held = receiver.stat(&task_id).await;
    assert_eq!(held.content_digest, sha256_of(&old));
    assert_eq!(held.content_digest_state, "verified");

    // The user pins the new version: only the new seed serves, listed second or not.
    let receiver2 = Daemon::start(root.path(), "receiver2", DaemonOptions::default()).await;
    let output2 = root.path().join("out-pinned.bin");
    let mut request = pull_request(&task_id, &sources, &output2);
    request.digest = sha256_of(&new);
    let pulled = transfer(&mut receiver2.client().await, request, |_| {})
        .await
        .expect("pull pinned to the new version");
    assert!(same_contents(&new, &output2));
    assert!(pulled
        .pieces
        .iter()
        .all(|p| p.source == seed_new.data_address));

    // A digest no source holds: refused before any byte moves, naming every source.
    let receiver3 = Daemon::start(root.path(), "receiver3", DaemonOptions::default()).await;
    let output3 = root.path().join("out-wrong.bin");
    let mut request = pull_request(&task_id, &sources, &output3);
    request.digest = format!("sha256:{}", "0".repeat(64));
    let err = transfer(&mut receiver3.client().await, request, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains(&seed_old.data_address)
            && err.message().contains(&seed_new.data_address),
        "{}",
        err.message()
    );
    assert!(!output3.exists());

    // A held task is held to its version: asking receiver (old) for the new one is refused.
    let mut request = pull_request(&task_id, &sources, &root.path().join("out-again.bin"));
    request.digest = sha256_of(&new);
    let err = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("delete the task"),
        "{}",
        err.message()
    );

    // A malformed digest is the caller's mistake.
    let mut request = pull_request(&task_id, &sources, &root.path().join("out-bad.bin"));
    request.digest = "md5:abc".into();
    let err = transfer(&mut receiver3.client().await, request, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

/// A source whose manifest states a digest its content does not have (here: edited on disk)
/// passes every per-piece CRC check; the whole-content check refuses the result, places
/// nothing, and drops the task so no piece of it is served on.
#[tokio::test(flavor = "multi_thread")]
async fn content_that_does_not_hash_to_its_pin_is_dropped_and_never_placed() {
    let root = scratch("lying-manifest");
    let source = root.path().join("file.bin");
    random_file(&source, 20 * MIB, 21);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;
    let task = seed.import(&source).await;
    let manifest = seed
        .data_dir
        .join("tasks")
        .join(&task.task_id)
        .join("manifest.json");
    let lie = format!("sha256:{}", "ab".repeat(32));
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace(&task.content_digest, &lie)).unwrap();
    // The daemon keeps a task's manifest once read: restart it to make it read the edit.
    drop(seed);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;

    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let err = transfer(
        &mut receiver.client().await,
        pull_request(&task.task_id, &[&seed.data_address], &output),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(
        err.message().contains(&lie) && err.message().contains(&task.content_digest),
        "{}",
        err.message()
    );
    assert!(!output.exists(), "nothing placed");
    let status = receiver
        .client()
        .await
        .stat_task(proto::StatTaskRequest {
            task_id: task.task_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "the mixed task was dropped");
}

/// A fake source: answers every `StatTask` with `info` and every piece request with an error.
async fn fake_source(info: TaskInfo) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                loop {
                    while let Ok(Some((header, value))) =
                        split_frame(&mut buf, MAX_REQUEST_VALUE_LEN)
                    {
                        let response = match Request::decode(header, &value) {
                            Ok(Request::StatTask { .. }) => Response::TaskInfo(info),
                            _ => Response::Error {
                                code: ferry_fallback_tcp::codec::ErrorCode::NotFound,
                                message: "not here".into(),
                            },
                        };
                        let mut out = BytesMut::new();
                        response.encode(&mut out);
                        if stream.write_all(&out).await.is_err() {
                            return;
                        }
                    }
                    let mut chunk = [0u8; 4096];
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    addr
}

/// Before the caps, a source announcing a 2^53-byte task of 4 MiB pieces made a receiver
/// build a piece list and a digest table for 2^31 pieces before `fallocate` could fail.
#[tokio::test(flavor = "multi_thread")]
async fn a_source_announcing_a_huge_task_is_refused_before_anything_is_allocated() {
    let root = scratch("huge-task");
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let before = rss_kib(receiver.pid());
    let task_id = "f".repeat(64);
    for (length, code, mentions) in [
        // Over store.max_task_bytes (16 TiB by default).
        (1u64 << 50, Code::ResourceExhausted, "store.max_task_bytes"),
        (1u64 << 53, Code::ResourceExhausted, "store.max_task_bytes"),
        // Under the cap, over the data dir's free space.
        (15u64 << 40, Code::ResourceExhausted, "no space left"),
    ] {
        let fake = fake_source(TaskInfo {
            content_length: length,
            piece_length: 4 * MIB,
            pieces_held: 0,
            complete: false,
            content_sha256: None,
        })
        .await;
        let output = root.path().join("out.bin");
        let err = transfer(
            &mut receiver.client().await,
            pull_request(&task_id, &[&fake], &output),
            |_| {},
        )
        .await
        .unwrap_err();
        assert_eq!(err.code(), code, "{length}: {err:?}");
        assert!(err.message().contains(mentions), "{}", err.message());
        assert!(!output.exists());
    }
    let after = rss_kib(receiver.pid());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    // Nothing was created for the task, and the daemon still answers.
    let tasks = receiver
        .client()
        .await
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(tasks.tasks.is_empty(), "{:?}", tasks.tasks);
}
