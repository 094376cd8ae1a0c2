//! Transfers between real daemons: one seed, two seeds, a seed dying, the receiver dying, a
//! corrupted seed, a full disk.

use ferry_tests::*;
use std::collections::HashSet;
use tonic::Code;

const SIZE: u64 = 256 * MIB;

/// A source file and `seeds` daemons that imported it (same path, so the same task id).
async fn seeded(root: &std::path::Path, seeds: usize) -> (std::path::PathBuf, String, Vec<Daemon>) {
    let source = root.join("model.safetensors");
    random_file(&source, SIZE, 7);
    let mut daemons = Vec::new();
    let mut task_id = String::new();
    for index in 0..seeds {
        let daemon = Daemon::start(root, &format!("seed{index}"), DaemonOptions::default()).await;
        let task = daemon.import(&source).await;
        assert!(task.complete);
        assert_eq!(task.content_length, SIZE);
        assert_eq!(
            task.piece_length,
            4 * MIB,
            "Dragonfly's default for 256 MiB"
        );
        assert_eq!(task.pieces.len(), 64);
        assert!(task.pieces.iter().all(|p| p.digest.starts_with("crc32:")));
        if !task_id.is_empty() {
            assert_eq!(
                task.task_id, task_id,
                "the same file imports as the same task everywhere"
            );
        }
        task_id = task.task_id;
        daemons.push(daemon);
    }
    (source, task_id, daemons)
}

#[tokio::test(flavor = "multi_thread")]
async fn one_seed_transfers_256_mib() {
    let root = scratch("one-seed");
    let (source, task_id, seeds) = seeded(root.path(), 1).await;
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let result = pull(&receiver, &task_id, &[&seeds[0].data_address], &output).await;
    let summary = result.summary.unwrap();
    assert_eq!(summary.pieces_fetched, 64);
    assert_eq!(summary.bytes_fetched, SIZE);
    assert_eq!(result.pieces.len(), 64);
    assert!(result
        .pieces
        .iter()
        .all(|p| p.transport == "tcp" && p.source == seeds[0].data_address));
    let numbers: HashSet<u32> = result.pieces.iter().map(|p| p.number).collect();
    assert_eq!(numbers.len(), 64);
    assert!(same_contents(&source, &output));
    let held = receiver.stat(&task_id).await;
    assert!(held.complete);
    assert_eq!(seeds[0].stat(&task_id).await.pieces_served, 64);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_seeds_share_the_pieces() {
    let root = scratch("two-seeds");
    let (source, task_id, seeds) = seeded(root.path(), 2).await;
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let request = pull_request(
        &task_id,
        &[&seeds[0].data_address, &seeds[1].data_address],
        &output,
    );
    let result = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap();
    let summary = result.summary.unwrap();
    assert_eq!(summary.pieces_fetched, 64);
    assert_eq!(summary.sources.len(), 2);
    for stats in &summary.sources {
        assert!(
            stats.pieces > 0,
            "source {} served nothing: {summary:?}",
            stats.source
        );
    }
    let served: u64 = [
        seeds[0].stat(&task_id).await.pieces_served,
        seeds[1].stat(&task_id).await.pieces_served,
    ]
    .iter()
    .sum();
    assert_eq!(served, 64);
    assert!(same_contents(&source, &output));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_source_killed_mid_transfer_is_replaced_by_the_other() {
    let root = scratch("source-killed");
    let (source, task_id, mut seeds) = seeded(root.path(), 2).await;
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let mut request = pull_request(
        &task_id,
        &[&seeds[0].data_address, &seeds[1].data_address],
        &output,
    );
    request.streams_per_source = 1;
    let victim = seeds[0].pid();
    let mut killed = false;
    let result = transfer(&mut receiver.client().await, request, |_| {
        if !killed {
            // SIGKILL seed 0 as soon as the first piece lands.
            unsafe_free_kill(victim);
            killed = true;
        }
    })
    .await
    .unwrap();
    assert!(killed);
    assert!(!seeds[0].is_running());
    let summary = result.summary.unwrap();
    assert_eq!(summary.pieces_fetched, 64);
    let survivor = &summary.sources[1];
    assert!(
        survivor.pieces >= 60,
        "the survivor carried the rest: {summary:?}"
    );
    assert!(same_contents(&source, &output));
    seeds[0].kill();
}

/// SIGKILL by pid through the `kill` command (keeps the tests free of unsafe code).
fn unsafe_free_kill(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_receiver_resumes_without_refetching() {
    let root = scratch("receiver-restart");
    let (source, task_id, seeds) = seeded(root.path(), 1).await;
    let mut receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let mut request = pull_request(&task_id, &[&seeds[0].data_address], &output);
    request.streams_per_source = 1;
    let pid = receiver.pid();
    let mut seen = 0;
    let first = transfer(&mut receiver.client().await, request.clone(), |_| {
        seen += 1;
        if seen == 10 {
            unsafe_free_kill(pid);
        }
    })
    .await;
    assert!(first.is_err(), "the receiver died, so the stream must fail");
    receiver.kill();
    assert!(
        !output.exists(),
        "a partial transfer never leaves a file at the output"
    );

    let data_dir = receiver.data_dir.clone();
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        DaemonOptions {
            data_dir: Some(data_dir),
            ..Default::default()
        },
    )
    .await;
    let before = receiver.stat(&task_id).await;
    let held: HashSet<u32> = before
        .pieces
        .iter()
        .filter(|p| p.held)
        .map(|p| p.number)
        .collect();
    assert!(
        held.len() >= 10,
        "every piece reported before the kill was durable: {} held",
        held.len()
    );
    assert!(held.len() < 64);
    let second = pull(&receiver, &task_id, &[&seeds[0].data_address], &output).await;
    let summary = second.summary.unwrap();
    assert_eq!(summary.pieces_reused as usize, held.len());
    assert_eq!(summary.pieces_fetched as usize, 64 - held.len());
    assert_eq!(second.started.unwrap().pieces_reused as usize, held.len());
    for piece in &second.pieces {
        assert!(
            !held.contains(&piece.number),
            "piece {} was held yet fetched again",
            piece.number
        );
    }
    assert!(same_contents(&source, &output));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_source_piece_is_detected_and_fetched_elsewhere() {
    use std::os::unix::fs::FileExt;
    let root = scratch("corrupt");
    let (source, task_id, seeds) = seeded(root.path(), 2).await;
    // Flip bytes inside the first 16 pieces of seed 0's stored content.
    let content = seeds[0]
        .data_dir
        .join("tasks")
        .join(&task_id)
        .join("content");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&content)
        .unwrap();
    for piece in 0..16u64 {
        file.write_all_at(b"not the bytes you are looking for", piece * 4 * MIB + 1000)
            .unwrap();
    }
    drop(file);

    // With only the corrupted seed, the transfer fails loudly and places nothing.
    let receiver = Daemon::start(root.path(), "receiver", DaemonOptions::default()).await;
    let output = root.path().join("out.bin");
    let mut only_bad = pull_request(&task_id, &[&seeds[0].data_address], &output);
    only_bad.pieces = (0..64).collect();
    let err = transfer(&mut receiver.client().await, only_bad, |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("digest mismatch"),
        "{}",
        err.message()
    );
    assert!(!output.exists());

    // With both seeds, the bad pieces come from the good one.
    let request = pull_request(
        &task_id,
        &[&seeds[0].data_address, &seeds[1].data_address],
        &output,
    );
    let result = transfer(&mut receiver.client().await, request, |_| {})
        .await
        .unwrap();
    let summary = result.summary.unwrap();
    assert!(summary.retries >= 1, "{summary:?}");
    assert!(summary.sources[0].failures >= 1, "{summary:?}");
    assert!(same_contents(&source, &output));
    assert!(receiver.log_text().contains("digest mismatch"));
}

/// Mounts a small tmpfs and unmounts it when dropped.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: std::path::PathBuf, size: &str) -> SmallDisk {
        std::fs::create_dir_all(&path).unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mounting a tmpfs needs root (CAP_SYS_ADMIN)"
        );
        SmallDisk(path)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_fails_clearly_and_places_nothing() {
    let root = scratch("full-disk");
    let (_source, task_id, seeds) = seeded(root.path(), 1).await;
    let disk = SmallDisk::mount(root.path().join("small"), "64m");
    let receiver = Daemon::start(
        root.path(),
        "receiver",
        DaemonOptions {
            data_dir: Some(disk.0.join("data")),
            ..Default::default()
        },
    )
    .await;
    let output = root.path().join("out.bin");
    let err = transfer(
        &mut receiver.client().await,
        pull_request(&task_id, &[&seeds[0].data_address], &output),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("no space left"), "{}", err.message());
    assert!(!output.exists());
    // The daemon is still up and answers.
    let tasks = receiver
        .client()
        .await
        .list_tasks(ferry_engine::proto::ListTasksRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(tasks.tasks.iter().all(|t| !t.complete));
    drop(receiver);
}
