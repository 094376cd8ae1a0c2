//! Bad input: garbage on the data port and bad control requests each get a precise error,
//! and the daemon keeps serving.

use ferry_engine::proto;
use ferry_tests::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use tonic::Code;

/// Sends `bytes` (then optionally half-closes) and waits for the server to close the
/// connection (EOF, or a reset when it closed with our bytes unread). Returns what the server
/// sent before closing; panics if it kept the connection open for 10 s.
fn send_and_wait_for_close(addr: &str, bytes: &[u8], half_close: bool) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    if half_close {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut received = Vec::new();
    match stream.read_to_end(&mut received) {
        Ok(_) => received,
        Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => received,
        Err(err) => panic!("server did not close the connection: {err}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_on_the_data_port_closes_only_that_connection() {
    let root = scratch("garbage");
    let source = root.path().join("file.bin");
    random_file(&source, 20 * MIB, 3);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;
    let task = seed.import(&source).await;
    let addr = seed.data_address.clone();

    // Random garbage: closed by the server (it never waits for 60 s of idle time).
    let garbage: Vec<u8> = (0..1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 0x10)
        .collect();
    assert!(send_and_wait_for_close(&addr, &garbage, false).is_empty());
    // An oversized length: refused from the header alone.
    let mut oversized = vec![1u8, 0];
    oversized.extend_from_slice(&u32::MAX.to_be_bytes());
    assert!(send_and_wait_for_close(&addr, &oversized, false).is_empty());
    // A truncated frame: a DownloadPiece header promising 68 bytes, then 10 and EOF.
    let mut truncated = vec![9u8, 0, 0, 0, 0, 68];
    truncated.extend_from_slice(&[b'a'; 10]);
    assert!(send_and_wait_for_close(&addr, &truncated, true).is_empty());

    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = seed.log_text();
    assert!(
        log.contains("unexpected frame tag") || log.contains("declares a"),
        "garbage not logged:\n{log}"
    );
    assert!(
        log.contains("more than the 4096 allowed"),
        "oversized frame not logged:\n{log}"
    );
    assert!(
        log.contains("frame truncated"),
        "truncated frame not logged:\n{log}"
    );

    // The daemon still serves a real transfer.
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let result = pull(&receiver, &task.task_id, &[&addr], &output).await;
    assert_eq!(result.summary.unwrap().pieces_fetched, 5);
    assert!(same_contents(&source, &output));
}

async fn expect_code<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, tonic::Status>,
    code: Code,
    mentions: &str,
) {
    let status = result.expect_err(what);
    assert_eq!(status.code(), code, "{what}: {status:?}");
    assert!(
        status.message().contains(mentions),
        "{what}: message {:?} should mention {mentions:?}",
        status.message()
    );
}

async fn start_transfer(
    client: &mut ControlClient,
    request: proto::TransferPiecesRequest,
) -> Result<Transfer, tonic::Status> {
    transfer(client, request, |_| {}).await
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_control_requests_get_precise_status_codes() {
    let root = scratch("bad-grpc");
    let allowed = root.path().join("allowed");
    std::fs::create_dir_all(&allowed).unwrap();
    let source = root.path().join("file.bin");
    random_file(&source, 9 * MIB, 5);
    let daemon = Daemon::start(
        root.path(),
        "daemon",
        DaemonOptions {
            output_dirs: Some(vec![allowed.clone()]),
            ..Default::default()
        },
    )
    .await;
    let task = daemon.import(&source).await;
    let mut client = daemon.client().await;
    let unknown = "0".repeat(64);
    let addr = daemon.data_address.clone();

    expect_code(
        "stat unknown",
        client
            .stat_task(proto::StatTaskRequest {
                task_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "not in this daemon's store",
    )
    .await;
    expect_code(
        "stat malformed",
        client
            .stat_task(proto::StatTaskRequest {
                task_id: "xyz".into(),
            })
            .await,
        Code::InvalidArgument,
        "64 lowercase hex",
    )
    .await;
    expect_code(
        "delete unknown",
        client
            .delete_task(proto::DeleteTaskRequest {
                task_id: unknown.clone(),
            })
            .await,
        Code::NotFound,
        "not in this daemon's store",
    )
    .await;
    expect_code(
        "cancel idle",
        client
            .cancel_transfer(proto::CancelTransferRequest {
                task_id: task.task_id.clone(),
            })
            .await,
        Code::NotFound,
        "no transfer",
    )
    .await;

    let import = |path: &str, piece_length: u64| proto::ImportTaskRequest {
        path: path.into(),
        piece_length,
        ..Default::default()
    };
    expect_code(
        "import relative",
        client.import_task(import("file.bin", 0)).await,
        Code::InvalidArgument,
        "relative",
    )
    .await;
    expect_code(
        "import missing",
        client
            .import_task(import(root.path().join("missing.bin").to_str().unwrap(), 0))
            .await,
        Code::NotFound,
        "missing.bin",
    )
    .await;
    expect_code(
        "import dir",
        client
            .import_task(import(root.path().to_str().unwrap(), 0))
            .await,
        Code::InvalidArgument,
        "not a regular file",
    )
    .await;
    expect_code(
        "import piece length",
        client
            .import_task(import(source.to_str().unwrap(), 1 << 20))
            .await,
        Code::InvalidArgument,
        "outside",
    )
    .await;

    let base = || proto::TransferPiecesRequest {
        task_id: unknown.clone(),
        content_length: 100 * MIB,
        piece_length: 4 * MIB,
        sources: vec![addr.clone()],
        ..Default::default()
    };
    expect_code(
        "piece out of range",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                pieces: vec![3, 25],
                ..base()
            },
        )
        .await,
        Code::OutOfRange,
        "piece 25 is out of range",
    )
    .await;
    expect_code(
        "piece length",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                piece_length: 1 << 20,
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "outside",
    )
    .await;
    expect_code(
        "relative output",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                output_path: "out.bin".into(),
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "relative",
    )
    .await;
    expect_code(
        "dotdot output",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                output_path: format!("{}/../x.bin", allowed.display()),
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "..",
    )
    .await;
    let outside = root.path().join("outside.bin").display().to_string();
    expect_code(
        "output outside allowed",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                output_path: outside,
                ..base()
            },
        )
        .await,
        Code::PermissionDenied,
        "outside the allowed",
    )
    .await;
    expect_code(
        "no sources",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                sources: vec![],
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "no source",
    )
    .await;
    expect_code(
        "bad source",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                sources: vec!["not an address".into()],
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "not a reachable",
    )
    .await;
    expect_code(
        "bad task id",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                task_id: "ABC".into(),
                ..base()
            },
        )
        .await,
        Code::InvalidArgument,
        "64 lowercase hex",
    )
    .await;
    expect_code(
        "geometry conflict",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                task_id: task.task_id.clone(),
                ..base()
            },
        )
        .await,
        Code::FailedPrecondition,
        "stored with content length",
    )
    .await;
    expect_code(
        "unknown task at the source",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                content_length: 0,
                piece_length: 0,
                ..base()
            },
        )
        .await,
        Code::Unavailable,
        "not held here",
    )
    .await;
    expect_code(
        "rdma asked for",
        start_transfer(
            &mut client,
            proto::TransferPiecesRequest {
                transport: proto::TransportPreference::Rdma as i32,
                ..base()
            },
        )
        .await,
        Code::FailedPrecondition,
        "RDMA",
    )
    .await;

    // After all that, the daemon still answers (the standard health service too) and holds
    // its task.
    let channel = ferry_engine::cli::channel(daemon.control.to_str().unwrap())
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ferry.v1.Ferry".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let listed = client
        .list_tasks(proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert!(listed
        .iter()
        .any(|t| t.task_id == task.task_id && t.complete));
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_commands_drive_a_daemon() {
    let root = scratch("cli");
    let source = root.path().join("weights.bin");
    random_file(&source, 10 * MIB + 12345, 11);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let ferry = |daemon: &Daemon, args: &[&str]| {
        let out = std::process::Command::new(ferry_bin())
            .arg("--control")
            .arg(&daemon.control)
            .arg("--json")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let imported = ferry(&seed, &["import", source.to_str().unwrap()]);
    let task_id = imported["task_id"].as_str().unwrap().to_owned();
    assert_eq!(imported["piece_count"], 3);
    let output = root.path().join("copy.bin");
    let pulled = ferry(
        &receiver,
        &[
            "pull",
            "--task",
            &task_id,
            "--from",
            &seed.data_address,
            "--output",
            output.to_str().unwrap(),
        ],
    );
    assert_eq!(pulled["pieces"].as_array().unwrap().len(), 3);
    assert!(pulled["pieces"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["transport"] == "tcp"));
    assert_eq!(
        pulled["summary"]["transports"][0]["bytes"],
        10 * MIB + 12345
    );
    assert!(same_contents(&source, &output));
    let stat = ferry(&receiver, &["stat", &task_id]);
    assert_eq!(stat["complete"], true);
    assert_eq!(stat["pieces"][2]["length"], 2 * MIB + 12345);
    let devices = ferry(&receiver, &["devices"]);
    assert_eq!(devices["transports"][0]["name"], "tcp");
    assert_eq!(
        devices["data_address"].as_str().unwrap(),
        receiver.data_address
    );
    let tasks = ferry(&receiver, &["tasks"]);
    assert_eq!(tasks.as_array().unwrap().len(), 1);
    ferry(&receiver, &["delete", &task_id]);
    assert!(ferry(&receiver, &["tasks"]).as_array().unwrap().is_empty());
    assert!(
        same_contents(&source, &output),
        "deleting the task leaves the placed output alone"
    );
    // A failing command exits non-zero with the status on stderr.
    let out = std::process::Command::new(ferry_bin())
        .arg("--control")
        .arg(&receiver.control)
        .args(["stat", &task_id])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("NotFound"));
}

#[tokio::test(flavor = "multi_thread")]
async fn without_output_dirs_no_output_is_placed_but_the_store_still_fills() {
    let root = scratch("no-output-dirs");
    let source = root.path().join("file.bin");
    random_file(&source, 9 * MIB, 6);
    let seed = Daemon::start(root.path(), "seed", DaemonOptions::default()).await;
    let task = seed.import(&source).await;
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        DaemonOptions {
            output_dirs: Some(Vec::new()),
            ..Default::default()
        },
    )
    .await;
    let mut client = receiver.client().await;
    let output = root.path().join("copy.bin");
    expect_code(
        "output without output dirs",
        start_transfer(
            &mut client,
            pull_request(&task.task_id, &[&seed.data_address], &output),
        )
        .await,
        Code::PermissionDenied,
        "no output directories",
    )
    .await;
    assert!(!output.exists(), "nothing placed");
    let mut into_store = pull_request(&task.task_id, &[&seed.data_address], &output);
    into_store.output_path.clear();
    let done = start_transfer(&mut client, into_store)
        .await
        .expect("a transfer into the store alone needs no output directory");
    assert_eq!(done.pieces.len(), 3);
    assert!(!output.exists(), "still nothing placed");
}

/// Writes a complete one-piece task straight in the store's on-disk layout (faster than
/// creating 20 000 tasks through a daemon): task.json, its content, one journal record.
fn write_stored_task(tasks: &std::path::Path, task_id: &str, content: &[u8]) {
    let dir = tasks.join(task_id);
    std::fs::create_dir(&dir).unwrap();
    let meta = serde_json::json!({
        "format": 1,
        "task_id": task_id,
        "content_length": content.len(),
        "piece_length": 4 * MIB,
    });
    std::fs::write(dir.join("task.json"), meta.to_string()).unwrap();
    std::fs::write(dir.join("content"), content).unwrap();
    let mut record = Vec::with_capacity(12);
    record.extend_from_slice(&0u32.to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(content).to_le_bytes());
    let check = crc32fast::hash(&record) ^ 0x4645_5259;
    record.extend_from_slice(&check.to_le_bytes());
    std::fs::write(dir.join("pieces.log"), record).unwrap();
}

fn small_content(i: u32) -> Vec<u8> {
    let mut content = format!("task {i} ").into_bytes();
    content.resize(4096 + (i as usize % 7), (i % 251) as u8);
    content
}

/// Was: every task kept four descriptors open from start-up on, so under `ulimit -n 1024` a
/// store of 20 000 tasks hit EMFILE while recovering (and removed the task dirs it failed
/// to open). Now descriptors open on use, at most `store.max_open_tasks` tasks at once.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_of_20000_tasks_starts_and_serves_under_ulimit_n_1024() {
    const TASKS: u32 = 20_000;
    let root = scratch("many-tasks");
    let data = root.path().join("seed-data");
    let tasks = data.join("tasks");
    std::fs::create_dir_all(&tasks).unwrap();
    let id = |i: u32| format!("{:064x}", u64::from(i) * 0x9E37_79B9 + 1);
    for i in 0..TASKS {
        write_stored_task(&tasks, &id(i), &small_content(i));
    }
    // A small LRU as well, so serving many tasks closes and reopens their descriptors.
    let config = root.path().join("seed.toml");
    std::fs::write(&config, "[store]\nmax_open_tasks = 16\n").unwrap();
    let started = std::time::Instant::now();
    let seed = Daemon::start(
        root.path(),
        "seed",
        DaemonOptions {
            data_dir: Some(data.clone()),
            max_open_files: Some(1024),
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await;
    let log = seed.log_text();
    assert!(
        log.contains(&format!("tasks={TASKS}")) && log.contains("quarantined=0"),
        "not every task recovered (started in {:?}):\n{}",
        started.elapsed(),
        &log[log.len().saturating_sub(3000)..]
    );
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", seed.pid())).unwrap();
    assert!(
        limits
            .lines()
            .any(|l| l.starts_with("Max open files") && l.contains(" 1024 ")),
        "{limits}"
    );
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let mut client = receiver.client().await;
    // 40 tasks spread over the store: more than the 16 whose descriptors may stay open.
    for i in (0..TASKS).step_by((TASKS / 40) as usize) {
        let stat = seed.stat(&id(i)).await;
        assert!(stat.complete && stat.pieces_held == 1, "{stat:?}");
        let output = root.path().join(format!("out-{i}.bin"));
        let pulled = transfer(
            &mut client,
            pull_request(&id(i), &[&seed.data_address], &output),
            |_| {},
        )
        .await
        .unwrap_or_else(|e| panic!("pulling task {i}: {e}"));
        assert_eq!(pulled.pieces.len(), 1);
        assert!(
            std::fs::read(&output).unwrap() == small_content(i),
            "task {i}"
        );
    }
    let open_fds = std::fs::read_dir(format!("/proc/{}/fd", seed.pid()))
        .unwrap()
        .count();
    assert!(open_fds < 1024, "{open_fds} descriptors open");
    assert_eq!(seed.stat(&id(0)).await.pieces_served, 1);
}
