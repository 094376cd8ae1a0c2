//! Ferry beside Dragonfly's stock dfdaemon (dragonfly-client 1.5.10, built once by
//! scripts/dfdaemon.sh; see tests/src/stock.rs), both scheduled by the scheduler test double
//! (tests/src/dragonfly.rs): the stock Go scheduler is not part of these tests. Everything runs
//! on 127.0.0.1 with a loopback HTTP origin (tests/origin_server.py).
//!
//! Without the stock binaries these tests are skipped (stderr says so), except under CI
//! (`CI=true`), where they fail.

use ferry_tests::dragonfly::{ferry_peer, DoubleState, PeerRecord, PeerState, SchedulerDouble};
use ferry_tests::stock::{bin_dir_or_skip, StockDfdaemon};
use ferry_tests::*;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// dfget's limit (and its --timeout) for one download.
const DFGET_LIMIT: Duration = Duration::from_secs(120);

/// Waits (at most 60 s) for `done` over the double's state; on time-out panics with `what`
/// and `context()` (log tails).
async fn wait_for(
    state: &Arc<Mutex<DoubleState>>,
    what: &str,
    context: impl Fn() -> String,
    mut done: impl FnMut(&DoubleState) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if done(&state.lock().unwrap()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}\ndouble: {:#?}\n{}",
            state.lock().unwrap().tasks,
            context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pull_cli(daemon: &Daemon, args: &[&str], context: impl Fn() -> String) -> serde_json::Value {
    daemon.pull_json(args, context)
}

fn peers_on(state: &DoubleState, task_id: &str, host_id: &str) -> Vec<PeerRecord> {
    state
        .tasks
        .get(task_id)
        .map(|t| {
            t.peers
                .iter()
                .filter(|p| p.host_id == host_id)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn origin_bytes(stats: &serde_json::Value, path: &str) -> u64 {
    stats[path]["bytes"].as_u64().unwrap_or(0)
}

/// One series of the stock dfdaemon's metrics; panics with its traffic series when absent.
async fn stock_metric(stock: &StockDfdaemon, series: &str) -> f64 {
    if let Some(value) = stock.metric(series).await {
        return value;
    }
    let text = stock.scrape().await;
    let traffic: Vec<&str> = text.lines().filter(|l| l.contains("traffic")).collect();
    panic!(
        "{series} is not in the stock dfdaemon's metrics; its traffic series:\n{}",
        traffic.join("\n")
    )
}

/// An origin serving one random file of `size` bytes as `/name`.
fn origin_with(
    root: &Path,
    name: &str,
    size: u64,
    seed: u64,
) -> (OriginServer, std::path::PathBuf) {
    let files = root.join("www");
    std::fs::create_dir_all(&files).unwrap();
    let file = files.join(name);
    random_file(&file, size, seed);
    (OriginServer::start(&files), file)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stock_dfdaemon_downloads_a_task_from_a_ferry_parent_over_vortex() {
    let Some(bin) = bin_dir_or_skip("a_stock_dfdaemon_downloads_a_task_from_a_ferry_parent") else {
        return;
    };
    let started = Instant::now();
    let root = scratch("stock-child");
    let size = 18 * MIB + 12_345; // 5 pieces of 4 MiB for both (the stock rule gives 4 MiB)
    let (origin, file) = origin_with(root.path(), "model.bin", size, 21);
    let url = origin.url("model.bin");
    let double = SchedulerDouble::start().await;
    let ferry = ferry_peer(root.path(), "ferry-parent", &double.addr.to_string(), "").await;
    let ferry_host = "127.0.0.1-ferry-parent";

    // Ferry holds the file, imported under the URL: its task id is Dragonfly's for that URL,
    // and it is announced to the scheduler as a candidate parent (metadata only).
    let task = ferry.import_as(&file, &url).await;
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    assert_eq!(task.task_id, task_id);
    assert_eq!(task.piece_count, 5);
    wait_for(
        &double.state,
        "Ferry's metadata-only announcement",
        || ferry.log_text(),
        |s| {
            peers_on(s, &task_id, ferry_host)
                .iter()
                .any(|p| p.state == PeerState::MetadataOnly)
        },
    )
    .await;
    let ferry_peer_id = peers_on(&double.state.lock().unwrap(), &task_id, ferry_host)[0]
        .id
        .clone();

    let stock = StockDfdaemon::start(&bin, root.path(), "stock-child", double.addr).await;
    wait_for(
        &double.state,
        "the stock dfdaemon's AnnounceHost",
        || stock.log_tail(60),
        |s| s.hosts.contains_key(&stock.host_id),
    )
    .await;
    let up = started.elapsed();

    // Stock dfget: the double hands out Ferry; the stock dfdaemon syncs pieces from Ferry's
    // DfdaemonUpload and downloads them over Vortex TCP from Ferry's data port.
    let output = root.path().join("stock-out.bin");
    let fetch = Instant::now();
    stock.dfget(&url, &output, DFGET_LIMIT).await;
    let fetched_in = fetch.elapsed();
    assert!(same_contents(&file, &output), "bytes differ");

    let context = || format!("{}\n{}", stock.log_tail(80), ferry.log_text());
    wait_for(
        &double.state,
        "the stock peer's DownloadPeerFinishedRequest",
        context,
        |s| {
            peers_on(s, &task_id, &stock.host_id)
                .iter()
                .any(|p| p.state == PeerState::Finished)
        },
    )
    .await;
    let stock_peer = peers_on(&double.state.lock().unwrap(), &task_id, &stock.host_id)[0].clone();
    assert_eq!(stock_peer.answers, ["normal(1)"], "{stock_peer:?}");
    assert_eq!(
        stock_peer.pieces_from.get(&ferry_peer_id),
        Some(&5),
        "the stock peer reported every piece from Ferry: {stock_peer:?}\n{}",
        context()
    );
    assert_eq!(stock_peer.pieces_from.len(), 1, "{stock_peer:?}");
    assert_eq!(stock_peer.back_to_source_pieces, 0);
    assert!(stock_peer.failed_pieces.is_empty(), "{stock_peer:?}");

    // Ferry's side: five pieces sent over TCP (Vortex).
    let exposition = ferry.scrape().await;
    assert_eq!(
        metric(&exposition, r#"ferry_pieces_served_total{transport="tcp"}"#),
        Some(5.0),
        "{exposition}"
    );
    // The stock side: every byte came from a remote peer, none from the origin (the stock
    // dfdaemon only asks the origin for the length: a one-byte ranged GET).
    assert_eq!(
        Some(
            stock_metric(
                &stock,
                r#"dragonfly_client_download_traffic{type="REMOTE_PEER"}"#
            )
            .await
        ),
        Some(size as f64)
    );
    assert!(
        origin_bytes(&origin.stats().await, "/model.bin") <= 1,
        "{}",
        origin.stats().await
    );
    eprintln!(
        "stock child of a Ferry parent: ferry + stock dfdaemon up in {up:?}, dfget of {size} bytes in {fetched_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ferry_child_downloads_from_a_stock_dfdaemon_that_went_back_to_source() {
    let Some(bin) =
        bin_dir_or_skip("a_ferry_child_downloads_from_a_stock_dfdaemon_that_went_back_to_source")
    else {
        return;
    };
    let root = scratch("stock-parent");
    let size = 18 * MIB + 12_345;
    let (origin, file) = origin_with(root.path(), "weights.bin", size, 22);
    let url = origin.url("weights.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    let double = SchedulerDouble::start().await;
    let stock = StockDfdaemon::start(&bin, root.path(), "stock-parent", double.addr).await;
    let ferry = ferry_peer(root.path(), "ferry-child", &double.addr.to_string(), "").await;
    let ferry_host = "127.0.0.1-ferry-child";
    wait_for(
        &double.state,
        "both hosts announced",
        || stock.log_tail(60),
        |s| s.hosts.contains_key(&stock.host_id) && s.hosts.contains_key(ferry_host),
    )
    .await;

    // The stock dfdaemon is the task's first peer: told to go back to source, it fetches the
    // file from the origin itself.
    let stock_out = root.path().join("stock-out.bin");
    let fetch = Instant::now();
    stock.dfget(&url, &stock_out, DFGET_LIMIT).await;
    let stock_in = fetch.elapsed();
    assert!(same_contents(&file, &stock_out), "bytes differ");
    wait_for(
        &double.state,
        "the stock peer's back-to-source finish",
        || stock.log_tail(80),
        |s| {
            peers_on(s, &task_id, &stock.host_id)
                .iter()
                .any(|p| p.state == PeerState::BackToSourceFinished)
        },
    )
    .await;
    let stock_peer = peers_on(&double.state.lock().unwrap(), &task_id, &stock.host_id)[0].clone();
    assert_eq!(stock_peer.answers, ["need_back_to_source"]);
    assert_eq!(stock_peer.back_to_source_pieces, 5, "{stock_peer:?}");
    assert_eq!(
        Some(
            stock_metric(
                &stock,
                r#"dragonfly_client_download_traffic{type="BACK_TO_SOURCE"}"#
            )
            .await
        ),
        Some(size as f64)
    );
    let origin_sent = origin_bytes(&origin.stats().await, "/weights.bin");
    assert!(origin_sent >= size, "{}", origin.stats().await);

    // Ferry pulls the URL: the double hands out the stock dfdaemon; Ferry syncs its pieces from
    // the stock DfdaemonUpload and fetches them over Vortex TCP from the stock storage port.
    let output = root.path().join("ferry-out.bin");
    let fetch = Instant::now();
    let printed = pull_cli(
        &ferry,
        &["--url", &url, "--output", output.to_str().unwrap()],
        || stock.log_tail(80),
    );
    let ferry_in = fetch.elapsed();
    assert!(same_contents(&file, &output), "bytes differ");
    assert_eq!(printed["task_id"], task_id.as_str());
    let pieces = printed["pieces"].as_array().unwrap();
    assert_eq!(pieces.len(), 5, "{printed}");
    let stock_vortex = format!("127.0.0.1:{}", stock.tcp_port);
    assert!(
        pieces
            .iter()
            .all(|p| p["source"] == stock_vortex.as_str() && p["transport"] == "tcp"),
        "every piece from the stock dfdaemon's Vortex port {stock_vortex}: {pieces:?}"
    );
    assert_eq!(printed["summary"]["back_to_source_bytes"], 0);
    assert_eq!(
        origin_bytes(&origin.stats().await, "/weights.bin"),
        origin_sent,
        "Ferry never went to the origin"
    );

    wait_for(
        &double.state,
        "Ferry's DownloadPeerFinishedRequest",
        || ferry.log_text(),
        |s| {
            peers_on(s, &task_id, ferry_host)
                .iter()
                .any(|p| p.state == PeerState::Finished)
        },
    )
    .await;
    let ferry_peer = peers_on(&double.state.lock().unwrap(), &task_id, ferry_host)[0].clone();
    assert_eq!(ferry_peer.answers, ["normal(1)"]);
    assert_eq!(
        ferry_peer.pieces_from.get(&stock_peer.id),
        Some(&5),
        "{ferry_peer:?}"
    );
    assert_eq!(ferry_peer.back_to_source_pieces, 0);
    // Ferry's crc32 digests of the pieces agree with the stock dfdaemon's.
    assert_eq!(ferry_peer.digests, stock_peer.digests);

    let exposition = ferry.scrape().await;
    assert_eq!(
        metric(
            &exposition,
            r#"ferry_pieces_fetched_total{transport="tcp"}"#
        ),
        Some(5.0),
        "{exposition}"
    );
    // The stock side sent every byte.
    assert_eq!(
        Some(stock_metric(&stock, "dragonfly_client_upload_traffic").await),
        Some(size as f64)
    );
    eprintln!(
        "Ferry child of a stock parent: stock back to source {size} bytes in {stock_in:?}, Ferry from the stock dfdaemon in {ferry_in:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mixed_cluster_of_ferry_and_stock_peers_moves_one_file_byte_identically() {
    let Some(bin) = bin_dir_or_skip("a_mixed_cluster_of_ferry_and_stock_peers") else {
        return;
    };
    let root = scratch("stock-mixed");
    let size = 38 * MIB + 777; // 10 pieces
    let pieces = 10;
    let (origin, file) = origin_with(root.path(), "mixed.bin", size, 23);
    let url = origin.url("mixed.bin");
    let task_id = ferry_engine::origin::task_id(&url, None, None, None).unwrap();
    let double = SchedulerDouble::start().await;
    let scheduler = double.addr.to_string();
    let mut seed = ferry_peer(root.path(), "seed", &scheduler, "").await;
    let receiver = ferry_peer(root.path(), "receiver", &scheduler, "").await;
    let second = ferry_peer(root.path(), "second", &scheduler, "").await;
    wait_for(
        &double.state,
        "the Ferry hosts announced",
        String::new,
        |s| s.hosts.len() == 3,
    )
    .await;
    // The stock dfdaemon announces the same max_tx_bandwidth as the Ferry receiver, so the
    // second receiver's per-piece weighted choice splits the pieces between the two.
    let ferry_max_tx = double.state.lock().unwrap().hosts["127.0.0.1-receiver"]
        .network
        .as_ref()
        .unwrap()
        .max_tx_bandwidth;
    let stock = StockDfdaemon::start_with(
        &bin,
        root.path(),
        "stock",
        double.addr,
        Some(ferry_max_tx / 8),
    )
    .await;
    wait_for(
        &double.state,
        "all four hosts announced",
        || stock.log_tail(60),
        |s| s.hosts.len() == 4,
    )
    .await;

    // origin -> Ferry seed, back to source.
    let printed = pull_cli(&seed, &["--url", &url], String::new);
    assert_eq!(printed["pieces"].as_array().unwrap().len(), pieces);
    let origin_sent = origin_bytes(&origin.stats().await, "/mixed.bin");
    let seed_peer = peers_on(&double.state.lock().unwrap(), &task_id, "127.0.0.1-seed")[0].clone();
    assert_eq!(seed_peer.answers, ["need_back_to_source"]);

    // Ferry seed -> a stock dfdaemon and a Ferry receiver at once.
    let stock_out = root.path().join("stock-out.bin");
    let receiver_out = root.path().join("receiver-out.bin");
    let control = receiver.control.clone();
    let receiver_args = [
        "--url".to_owned(),
        url.clone(),
        "--output".to_owned(),
        receiver_out.display().to_string(),
    ];
    let receiver_pull = tokio::task::spawn_blocking(move || {
        std::process::Command::new(ferry_bin())
            .args(["--control", control.to_str().unwrap(), "--json", "pull"])
            .args(&receiver_args)
            .output()
            .unwrap()
    });
    let fetch = Instant::now();
    stock.dfget(&url, &stock_out, DFGET_LIMIT).await;
    let ran = tokio::time::timeout(DFGET_LIMIT, receiver_pull)
        .await
        .expect("the receiver's pull ran over its limit")
        .unwrap();
    let both_in = fetch.elapsed();
    assert!(
        ran.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&ran.stderr),
        receiver.log_text()
    );
    assert!(same_contents(&file, &stock_out), "stock bytes differ");
    assert!(same_contents(&file, &receiver_out), "receiver bytes differ");
    wait_for(
        &double.state,
        "the stock dfdaemon and the receiver finished",
        || stock.log_tail(80),
        |s| {
            [stock.host_id.as_str(), "127.0.0.1-receiver"]
                .iter()
                .all(|host| {
                    peers_on(s, &task_id, host)
                        .iter()
                        .any(|p| p.state == PeerState::Finished)
                })
        },
    )
    .await;
    let stock_peer = peers_on(&double.state.lock().unwrap(), &task_id, &stock.host_id)[0].clone();
    let receiver_peer = peers_on(
        &double.state.lock().unwrap(),
        &task_id,
        "127.0.0.1-receiver",
    )[0]
    .clone();
    for peer in [&stock_peer, &receiver_peer] {
        assert_eq!(
            peer.pieces_from.get(&seed_peer.id),
            Some(&(pieces as u32)),
            "{peer:?}"
        );
    }

    // The seed leaves the cluster (DeleteHost, as a stopping dfdaemon sends it): the second
    // Ferry receiver gets the stock dfdaemon and the first receiver as parents.
    seed.kill();
    let mut scheduler_client =
        dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient::connect(format!(
            "http://{scheduler}"
        ))
        .await
        .unwrap();
    scheduler_client
        .delete_host(dragonfly_api::scheduler::v2::DeleteHostRequest {
            host_id: "127.0.0.1-seed".into(),
        })
        .await
        .unwrap();
    let second_out = root.path().join("second-out.bin");
    let fetch = Instant::now();
    let printed = pull_cli(
        &second,
        &["--url", &url, "--output", second_out.to_str().unwrap()],
        || format!("{}\n{}", stock.log_tail(80), receiver.log_text()),
    );
    let second_in = fetch.elapsed();
    assert!(
        same_contents(&file, &second_out),
        "second receiver's bytes differ"
    );
    let got = printed["pieces"].as_array().unwrap();
    assert_eq!(got.len(), pieces);
    let stock_vortex = format!("127.0.0.1:{}", stock.tcp_port);
    let from_stock = got
        .iter()
        .filter(|p| p["source"] == stock_vortex.as_str())
        .count();
    let from_receiver = got
        .iter()
        .filter(|p| p["source"] == receiver.data_address.as_str())
        .count();
    assert_eq!(from_stock + from_receiver, pieces, "{got:?}");
    assert!(
        from_stock > 0 && from_receiver > 0,
        "pieces from both parents: {got:?}"
    );
    wait_for(
        &double.state,
        "the second receiver finished",
        || second.log_text(),
        |s| {
            peers_on(s, &task_id, "127.0.0.1-second")
                .iter()
                .any(|p| p.state == PeerState::Finished)
        },
    )
    .await;
    let second_peer =
        peers_on(&double.state.lock().unwrap(), &task_id, "127.0.0.1-second")[0].clone();
    assert_eq!(
        second_peer.pieces_from.get(&stock_peer.id).copied(),
        Some(from_stock as u32),
        "{second_peer:?}"
    );
    assert_eq!(
        second_peer.pieces_from.get(&receiver_peer.id).copied(),
        Some(from_receiver as u32),
        "{second_peer:?}"
    );
    assert_eq!(
        Some(stock_metric(&stock, "dragonfly_client_upload_traffic").await),
        Some(
            got.iter()
                .filter(|p| p["source"] == stock_vortex.as_str())
                .map(|p| p["length"].as_u64().unwrap() as f64)
                .sum()
        )
    );
    assert!(
        origin_bytes(&origin.stats().await, "/mixed.bin") <= origin_sent + 1,
        "after the seed, only the stock dfdaemon's one-byte length probe reached the origin: {}",
        origin.stats().await
    );
    eprintln!(
        "mixed cluster: stock dfdaemon + Ferry receiver from the seed at once in {both_in:?}; second receiver ({from_stock} pieces from stock, {from_receiver} from the receiver) in {second_in:?}"
    );
}
