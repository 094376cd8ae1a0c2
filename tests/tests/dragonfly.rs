//! Ferry as a Dragonfly peer: real daemons over loopback against the scheduler test double
//! (tests/src/dragonfly.rs, written with dragonfly-api's generated server trait) and real
//! tonic clients built from dragonfly-api. The stock Go scheduler and a stock dfdaemon are
//! not part of these tests.

use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::{DownloadTaskRequest, SyncHostRequest, SyncPiecesRequest};
use ferry_engine::proto;
use ferry_tests::dragonfly::{ferry_peer, PeerState, SchedulerDouble};
use ferry_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};
use tonic::Code;

async fn peer(root: &Path, name: &str, scheduler: &str) -> Daemon {
    ferry_peer(root, name, scheduler, "").await
}

/// The "dragonfly" entry `ferry devices` shows, as properties.
async fn dragonfly_info(daemon: &Daemon) -> std::collections::HashMap<String, String> {
    let caps = daemon
        .client()
        .await
        .get_capabilities(proto::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    caps.transports
        .into_iter()
        .find(|t| t.name == "dragonfly")
        .expect("a dragonfly entry in the capabilities")
        .properties
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn pull_cli(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    daemon.pull_json(args, String::new)
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_service_syncs_held_pieces_with_the_vortex_address_and_announces_the_host() {
    let root = scratch("df-upload");
    let double = SchedulerDouble::start().await;
    let daemon = peer(root.path(), "parent", &double.addr.to_string()).await;
    let info = dragonfly_info(&daemon).await;
    let upload = info["upload"].clone();
    let data_port: u16 = daemon
        .data_address
        .rsplit_once(':')
        .unwrap()
        .1
        .parse()
        .unwrap();
    assert!(
        info["max_tx_bandwidth_bps"].parse::<u64>().unwrap() > 0,
        "{info:?}"
    );
    assert_eq!(info["idc"], "idc-test");

    // AnnounceHost: the upload port, the Vortex port, real figures.
    wait_for("AnnounceHost", || {
        double.state.lock().unwrap().host_announces >= 1
    })
    .await;
    let host = double
        .state
        .lock()
        .unwrap()
        .hosts
        .values()
        .next()
        .cloned()
        .unwrap();
    assert_eq!(host.id, info["host_id"]);
    assert_eq!(host.id, "127.0.0.1-parent");
    assert_eq!(host.ip, "127.0.0.1");
    assert_eq!(format!("127.0.0.1:{}", host.port), upload);
    assert_eq!(host.download_port, i32::from(data_port));
    let network = host.network.unwrap();
    assert!(network.max_tx_bandwidth > 0);
    assert_eq!(network.idc.as_deref(), Some("idc-test"));
    // Periodic: announce_interval_secs = 1.
    wait_for("a second AnnounceHost", || {
        double.state.lock().unwrap().host_announces >= 2
    })
    .await;

    // An imported task with a URL is announced metadata-only, with its actual lengths.
    let size = 18 * MIB + 12_345; // 5 pieces of 4 MiB
    let file = root.path().join("model.bin");
    random_file(&file, size, 7);
    let url = "http://origin.test/model.bin";
    let task = daemon.import_as(&file, url).await;
    assert_eq!(task.piece_count, 5);
    wait_for("the metadata-only announcement", || {
        let state = double.state.lock().unwrap();
        state.tasks.get(&task.task_id).is_some_and(|t| {
            t.peers.iter().any(|p| p.state == PeerState::MetadataOnly)
                && t.content_length == size
                && t.piece_count == 5
        })
    })
    .await;

    // SyncPieces: every requested piece, with the Vortex address, then the stream ends.
    let mut client = DfdaemonUploadClient::connect(format!("http://{upload}"))
        .await
        .unwrap();
    let mut stream = client
        .sync_pieces(SyncPiecesRequest {
            host_id: "child-host".into(),
            task_id: task.task_id.clone(),
            interested_piece_numbers: vec![4, 0, 2],
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("SyncPieces ends once every requested piece was sent")
        .unwrap()
    {
        assert_eq!(piece.ip, "127.0.0.1");
        assert_eq!(piece.tcp_port, Some(i32::from(data_port)));
        assert_eq!(piece.offset, u64::from(piece.number) * 4 * MIB);
        let expected = if piece.number == 4 {
            size - 16 * MIB
        } else {
            4 * MIB
        };
        assert_eq!(piece.length, expected);
        seen.push(piece.number);
    }
    seen.sort_unstable();
    assert_eq!(seen, [0, 2, 4]);
    let err = client
        .sync_pieces(SyncPiecesRequest {
            host_id: "child-host".into(),
            task_id: task.task_id.clone(),
            interested_piece_numbers: vec![9],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // SyncHost: the bandwidth figures, streamed.
    let mut hosts = client
        .sync_host(SyncHostRequest {
            host_id: "child-host".into(),
            peer_id: "child-peer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    for _ in 0..2 {
        let host = hosts.message().await.unwrap().unwrap();
        assert!(host.network.unwrap().max_tx_bandwidth > 0);
    }
    drop(hosts);

    // Everything else: UNIMPLEMENTED, saying what Ferry serves.
    let err = client
        .download_task(DownloadTaskRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("SyncPieces"), "{}", err.message());

    // grpc.health.v1 on the same port.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{upload}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "dfdaemon.v2.DfdaemonUpload".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let exposition = daemon.scrape().await;
    assert!(
        metric(
            &exposition,
            "ferry_dragonfly_announces_total{kind=\"host\",result=\"ok\"}"
        )
        .unwrap()
            >= 2.0,
        "{exposition}"
    );
    assert_eq!(
        metric(
            &exposition,
            "ferry_dragonfly_announces_total{kind=\"peer\",result=\"ok\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_scheduled_child_fetches_from_a_seed_that_the_scheduler_sent_back_to_source() {
    let root = scratch("df-scheduled");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 18 * MIB + 12_345;
    random_file(&files.join("model.bin"), size, 3);
    let origin = OriginServer::start(&files);
    let double = SchedulerDouble::start().await;
    let scheduler = double.addr.to_string();
    let seed = peer(root.path(), "seed", &scheduler).await;
    let child = peer(root.path(), "child", &scheduler).await;
    wait_for("both hosts announced", || {
        double.state.lock().unwrap().hosts.len() >= 2
    })
    .await;
    let url = origin.url("model.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();

    // The first peer of the task: told NeedBackToSource, downloads from the origin.
    let printed = pull_cli(&seed, &["--url", &url]);
    assert_eq!(printed["task_id"], task_id.as_str());
    let pieces = printed["pieces"].as_array().unwrap();
    assert_eq!(pieces.len(), 5);
    assert!(
        pieces.iter().all(|p| p["transport"] == "origin"),
        "{pieces:?}"
    );
    let seed_peer = {
        let state = double.state.lock().unwrap();
        let task = &state.tasks[&task_id];
        assert_eq!(task.peers.len(), 1, "{task:?}");
        let peer = task.peers[0].clone();
        assert_eq!(peer.answers, ["need_back_to_source"]);
        assert_eq!(peer.state, PeerState::BackToSourceFinished, "{peer:?}");
        assert_eq!(peer.back_to_source_pieces, 5);
        assert_eq!((task.content_length, task.piece_count), (size, 5));
        peer
    };
    let origin_requests = origin.stats().await["/model.bin"]["requests"]
        .as_u64()
        .unwrap();

    // The second: the double hands out the seed; the child syncs its pieces and fetches
    // them over Vortex TCP, reporting each with the seed as parent.
    let output = root.path().join("out.bin");
    let printed = pull_cli(
        &child,
        &["--url", &url, "--output", output.to_str().unwrap()],
    );
    assert!(same_contents(&files.join("model.bin"), &output));
    let pieces = printed["pieces"].as_array().unwrap();
    assert_eq!(pieces.len(), 5);
    assert!(
        pieces
            .iter()
            .all(|p| p["source"] == seed.data_address.as_str() && p["transport"] != "origin"),
        "{pieces:?}"
    );
    assert_eq!(printed["summary"]["back_to_source_bytes"], 0);
    assert_eq!(
        origin.stats().await["/model.bin"]["requests"]
            .as_u64()
            .unwrap(),
        origin_requests,
        "the child never went to the origin"
    );
    wait_for("the child's peer finished", || {
        let state = double.state.lock().unwrap();
        state.tasks[&task_id]
            .peers
            .iter()
            .any(|p| p.id != seed_peer.id && p.state == PeerState::Finished)
    })
    .await;
    let child_peer = double.state.lock().unwrap().tasks[&task_id]
        .peers
        .iter()
        .find(|p| p.id != seed_peer.id)
        .unwrap()
        .clone();
    assert_eq!(child_peer.answers, ["normal(1)"]);
    assert_eq!(
        child_peer.pieces_from.get(&seed_peer.id),
        Some(&5),
        "{child_peer:?}"
    );
    assert_eq!(child_peer.back_to_source_pieces, 0);
    assert_eq!(
        child_peer.digests, seed_peer.digests,
        "crc32:N digests agree"
    );
    assert!(child_peer.digests.values().all(|d| d.starts_with("crc32:")));

    let exposition = child.scrape().await;
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_pieces_reported_total"),
        Some(5.0)
    );
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_back_to_source_total"),
        Some(0.0)
    );
    let exposition = seed.scrape().await;
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_back_to_source_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_pieces_reported_total"),
        Some(5.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_whose_only_parent_is_gone_reschedules_then_goes_back_to_source() {
    let root = scratch("df-reschedule");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 9 * MIB;
    random_file(&files.join("w.bin"), size, 5);
    let origin = OriginServer::start(&files);
    let double = SchedulerDouble::start().await;
    let scheduler = double.addr.to_string();
    let mut seed = peer(root.path(), "seed", &scheduler).await;
    let child = peer(root.path(), "child", &scheduler).await;
    let url = origin.url("w.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    pull_cli(&seed, &["--url", &url]);
    // The scheduler still lists the seed as a parent, but it is gone.
    seed.kill();

    let output = root.path().join("w.out");
    let printed = pull_cli(
        &child,
        &["--url", &url, "--output", output.to_str().unwrap()],
    );
    assert!(same_contents(&files.join("w.bin"), &output));
    let pieces = printed["pieces"].as_array().unwrap();
    assert!(
        pieces.iter().all(|p| p["transport"] == "origin"),
        "{pieces:?}"
    );
    assert_eq!(printed["summary"]["back_to_source_bytes"], size);
    wait_for("the child's peer finished back to source", || {
        let state = double.state.lock().unwrap();
        state.tasks[&task_id]
            .peers
            .iter()
            .filter(|p| p.state == PeerState::BackToSourceFinished)
            .count()
            == 2
    })
    .await;
    let child_peer = double.state.lock().unwrap().tasks[&task_id].peers[1].clone();
    assert_eq!(child_peer.answers, ["normal(1)", "need_back_to_source"]);
    assert_eq!(child_peer.reschedules, 1);
    assert_eq!(child_peer.back_to_source_pieces, 3);
    let exposition = child.scrape().await;
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_reschedules_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_back_to_source_total"),
        Some(1.0)
    );
}

/// The peer record of the one peer of `task_id` that is none of `others`.
fn peer_record(
    double: &ferry_tests::dragonfly::RunningDouble,
    task_id: &str,
    others: &[&str],
) -> ferry_tests::dragonfly::PeerRecord {
    let state = double.state.lock().unwrap();
    let mut found = state.tasks[task_id]
        .peers
        .iter()
        .filter(|p| !others.contains(&p.id.as_str()))
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(found.len(), 1, "{found:?}");
    found.pop().unwrap()
}

/// Pieces of a `--json` pull by source.
fn pieces_by_source(printed: &serde_json::Value) -> std::collections::BTreeMap<String, u32> {
    let mut by = std::collections::BTreeMap::new();
    for piece in printed["pieces"].as_array().unwrap() {
        *by.entry(piece["source"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    by
}

#[tokio::test(flavor = "multi_thread")]
async fn a_child_spreads_its_pieces_over_parents_by_their_spare_bandwidth() {
    let root = scratch("df-weighted");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    // 48 pieces of 4 MiB (the smallest piece length).
    let size = 192 * MIB;
    random_file(&files.join("big.bin"), size, 11);
    let origin = OriginServer::start(&files);
    let double = SchedulerDouble::start().await;
    let scheduler = double.addr.to_string();
    // Announced upload bandwidth 9 Gbit/s and 1 Gbit/s: SyncHost weights about 9:1.
    let fast = ferry_peer(
        root.path(),
        "fast",
        &scheduler,
        "max_bandwidth_bps = 9000000000",
    )
    .await;
    let slow = ferry_peer(
        root.path(),
        "slow",
        &scheduler,
        "max_bandwidth_bps = 1000000000",
    )
    .await;
    let child = peer(root.path(), "child", &scheduler).await;
    let url = origin.url("big.bin");
    let piece = (4 * MIB).to_string();
    let task_id = ferry_engine::origin::task_id(&url, None, None, Some(4 * MIB)).unwrap();
    pull_cli(&fast, &["--url", &url, "--piece-length", &piece]);
    let fast_peer = peer_record(&double, &task_id, &[]).id;
    pull_cli(&slow, &["--url", &url, "--piece-length", &piece]);
    let slow_peer = peer_record(&double, &task_id, &[&fast_peer]).id;

    let output = root.path().join("big.out");
    let printed = pull_cli(
        &child,
        &[
            "--url",
            &url,
            "--piece-length",
            &piece,
            // Two pieces in flight per parent: the endgame, when the light parent may help
            // the heavy one, is then at most two pieces.
            "--streams",
            "2",
            "--output",
            output.to_str().unwrap(),
        ],
    );
    assert!(same_contents(&files.join("big.bin"), &output));
    let by = pieces_by_source(&printed);
    let from_fast = by.get(&fast.data_address).copied().unwrap_or(0);
    let from_slow = by.get(&slow.data_address).copied().unwrap_or(0);
    eprintln!("pieces from the 9 Gbit/s parent: {from_fast}, from the 1 Gbit/s one: {from_slow}");
    assert_eq!(from_fast + from_slow, 48, "{by:?}");
    assert!(
        from_fast > 2 * from_slow,
        "the parent with 9x the spare bandwidth takes most pieces: {by:?}"
    );
    wait_for("the child's peer finished", || {
        let state = double.state.lock().unwrap();
        state.tasks[&task_id]
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Finished)
            .count()
            == 2
    })
    .await;
    let record = peer_record(&double, &task_id, &[&fast_peer, &slow_peer]);
    assert_eq!(record.answers, ["normal(2)"]);
    assert_eq!(record.pieces_from.get(&fast_peer).copied(), Some(from_fast));
    assert_eq!(
        record.pieces_from.get(&slow_peer).copied().unwrap_or(0),
        from_slow
    );
    assert!(record.failed_pieces.is_empty(), "{record:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pull_whose_parents_all_fail_mid_transfer_is_rescheduled_onto_another_parent() {
    let root = scratch("df-midway");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 12 * MIB + 777;
    random_file(&files.join("m.bin"), size, 21);
    let origin = OriginServer::start(&files);
    let double = SchedulerDouble::start().await;
    // One parent per answer: the first answer is the newest holder, the corrupt one.
    double.state.lock().unwrap().candidate_limit = 1;
    let scheduler = double.addr.to_string();
    let good = peer(root.path(), "good", &scheduler).await;
    let bad = peer(root.path(), "bad", &scheduler).await;
    let child = peer(root.path(), "child", &scheduler).await;
    let url = origin.url("m.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    pull_cli(&good, &["--url", &url]);
    let good_peer = peer_record(&double, &task_id, &[]).id;
    pull_cli(&bad, &["--url", &url]);
    let bad_peer = peer_record(&double, &task_id, &[&good_peer]).id;
    // The bad parent's content rots on disk: it still says it holds every piece (with the
    // digests it journaled) but serves other bytes, so every piece from it fails its check.
    let content = bad.data_dir.join("tasks").join(&task_id).join("content");
    let rotten: Vec<u8> = std::fs::read(&content)
        .unwrap()
        .into_iter()
        .map(|b| b ^ 0x5a)
        .collect();
    std::fs::write(&content, rotten).unwrap();
    let requests_before = origin.stats().await["/m.bin"]["requests"].as_u64().unwrap();

    let output = root.path().join("m.out");
    let printed = pull_cli(
        &child,
        &["--url", &url, "--output", output.to_str().unwrap()],
    );
    assert!(same_contents(&files.join("m.bin"), &output));
    let by = pieces_by_source(&printed);
    assert_eq!(
        by.keys().collect::<Vec<_>>(),
        [&good.data_address],
        "every piece came from the good parent: {by:?}"
    );
    let summary = &printed["summary"];
    assert_eq!(summary["back_to_source_bytes"], 0);
    assert_eq!(summary["pieces_fetched"], 4, "{summary}");
    let bad_stats = summary["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["source"] == bad.data_address.as_str())
        .unwrap_or_else(|| panic!("the failed parent is in the summary: {summary}"))
        .clone();
    assert_eq!(bad_stats["pieces"], 0);
    assert!(bad_stats["failures"].as_u64().unwrap() >= 4, "{summary}");
    assert_eq!(
        origin.stats().await["/m.bin"]["requests"].as_u64().unwrap(),
        requests_before,
        "a parent was left: no back to source"
    );
    wait_for("the child's peer finished", || {
        let state = double.state.lock().unwrap();
        state.tasks[&task_id]
            .peers
            .iter()
            .filter(|p| p.state == PeerState::Finished)
            .count()
            == 2
    })
    .await;
    let record = peer_record(&double, &task_id, &[&good_peer, &bad_peer]);
    assert_eq!(record.answers, ["normal(1)", "normal(1)"], "{record:?}");
    assert_eq!(record.reschedules, 1);
    assert_eq!(record.pieces_from.get(&good_peer).copied(), Some(4));
    assert!(!record.pieces_from.contains_key(&bad_peer));
    assert!(
        record.failed_pieces.len() as u64 >= bad_stats["failures"].as_u64().unwrap(),
        "one report per failed attempt: {record:?}"
    );
    assert!(
        record
            .failed_pieces
            .iter()
            .all(|(number, parent)| *parent == bad_peer && number.is_some_and(|n| n < 4)),
        "each names the piece and the failed parent: {record:?}"
    );
    let exposition = child.scrape().await;
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_reschedules_total"),
        Some(1.0)
    );
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_piece_failures_reported_total"),
        Some(record.failed_pieces.len() as f64)
    );
    assert_eq!(
        metric(&exposition, "ferry_dragonfly_back_to_source_total"),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stopped_peer_leaves_the_scheduler_and_a_restarted_one_announces_what_it_holds() {
    let root = scratch("df-restart");
    let files = root.path().join("www");
    std::fs::create_dir_all(&files).unwrap();
    let size = 9 * MIB + 5;
    random_file(&files.join("r.bin"), size, 31);
    let origin = OriginServer::start(&files);
    let first = SchedulerDouble::start().await;
    let mut seed = peer(root.path(), "seed", &first.addr.to_string()).await;
    let url = origin.url("r.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    pull_cli(&seed, &["--url", &url]);
    let seed_host = peer_record(&first, &task_id, &[]).host_id;

    // A graceful stop deletes the host: the scheduler hands it out no more.
    seed.signal("TERM");
    seed.wait_exit(Duration::from_secs(20))
        .await
        .expect("the seed stops on SIGTERM");
    {
        let state = first.state.lock().unwrap();
        assert_eq!(state.deleted_hosts, std::slice::from_ref(&seed_host));
        assert_eq!(state.tasks[&task_id].peers[0].state, PeerState::Left);
    }

    // Restarted on its data dir against a scheduler that never heard of it: the held task
    // is announced again (metadata only) once the host is, and a child is given the seed.
    let second = SchedulerDouble::start().await;
    let scheduler = second.addr.to_string();
    let config = root.path().join("seed.toml");
    let seed = Daemon::start(
        root.path(),
        "seed-again",
        DaemonOptions {
            data_dir: Some(seed.data_dir.clone()),
            extra_args: vec![
                "--config".into(),
                config.display().to_string(),
                "--dragonfly-scheduler".into(),
                scheduler.clone(),
                "--dragonfly-upload".into(),
                "127.0.0.1:0".into(),
            ],
            ..Default::default()
        },
    )
    .await;
    wait_for("the held task re-announced", || {
        let state = second.state.lock().unwrap();
        state.tasks.get(&task_id).is_some_and(|t| {
            t.content_length == size && t.peers.iter().any(|p| p.state == PeerState::MetadataOnly)
        })
    })
    .await;
    let child = peer(root.path(), "child", &scheduler).await;
    let output = root.path().join("r.out");
    let printed = pull_cli(
        &child,
        &["--url", &url, "--output", output.to_str().unwrap()],
    );
    assert!(same_contents(&files.join("r.bin"), &output));
    assert_eq!(
        pieces_by_source(&printed).keys().collect::<Vec<_>>(),
        [&seed.data_address]
    );

    // Deleting the task here tells the scheduler (DeleteTask): the seed is no parent of it.
    seed.client()
        .await
        .delete_task(proto::DeleteTaskRequest {
            task_id: task_id.clone(),
        })
        .await
        .unwrap();
    wait_for("the seed's peers of the task left", || {
        let state = second.state.lock().unwrap();
        let peers = &state.tasks[&task_id].peers;
        let seeds: Vec<_> = peers.iter().filter(|p| p.host_id == seed_host).collect();
        !seeds.is_empty() && seeds.iter().all(|p| p.state == PeerState::Left)
    })
    .await;
}
