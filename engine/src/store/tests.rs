//! The store's tests: durability, recovery, faults, descriptors, clones.

use super::*;
use crate::io::reflink_unsupported;
use crate::io::IoChoice;

/// Every directory `sync_dir` synced, by any test.
pub(super) static SYNCED_DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn open(dir: &Path) -> Store {
    let pool = BufferPool::new(4 << 20, 16).unwrap();
    let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
    Store::open(dir, pool, io, true).unwrap()
}

fn open_timed(dir: &Path, io_timeout: Duration) -> Store {
    open_with(
        dir,
        StoreOptions {
            io_timeout,
            ..StoreOptions::default()
        },
    )
}

fn open_with(dir: &Path, options: StoreOptions) -> Store {
    let pool = BufferPool::new(4 << 20, 16).unwrap();
    let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
    Store::open_with(dir, pool, io, options).unwrap()
}

async fn try_write(
    store: &Store,
    task: &Arc<StoredTask>,
    number: u32,
    fill: u8,
) -> (Option<PieceBuffer>, Result<(), StoreError>) {
    let piece = task.geometry().piece(number).unwrap();
    let mut buf = store.pool().acquire(piece.length).await.unwrap();
    buf.chunks_mut().iter_mut().for_each(|c| c.fill(fill));
    let crc = buf.crc32();
    store.write_piece(task, piece, buf, crc).await
}

async fn write(store: &Store, task: &Arc<StoredTask>, number: u32, fill: u8) -> u32 {
    let piece = task.geometry().piece(number).unwrap();
    let mut buf = store.pool().acquire(piece.length).await.unwrap();
    buf.chunks_mut().iter_mut().for_each(|c| c.fill(fill));
    let crc = buf.crc32();
    let (_, written) = store.write_piece(task, piece, buf, crc).await;
    written.unwrap();
    crc
}

#[tokio::test]
async fn held_pieces_survive_a_restart_and_a_torn_journal_tail_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let id = "a".repeat(64);
    let geometry = Geometry::new(10 << 20, 4 << 20).unwrap();
    let (crc0, crc2) = {
        let store = open(dir.path());
        let task = store.create_or_get(&id, geometry).unwrap();
        let crc0 = write(&store, &task, 0, 1).await;
        let crc2 = write(&store, &task, 2, 3).await;
        assert_eq!(task.held_count(), 2);
        (crc0, crc2)
    };
    // A crash mid-append leaves part of a record behind.
    let journal = dir.path().join("tasks").join(&id).join("pieces.log");
    let mut file = OpenOptions::new().append(true).open(&journal).unwrap();
    file.write_all(&[1, 0, 0, 0, 9]).unwrap();
    drop(file);

    let store = open(dir.path());
    let task = store.get(&id).expect("recovered");
    assert_eq!(task.held(0), Some(crc0));
    assert_eq!(task.held(1), None);
    assert_eq!(task.held(2), Some(crc2));
    assert_eq!(
        fs::metadata(&journal).unwrap().len(),
        2 * RECORD_LEN as u64,
        "torn tail cut"
    );
    // Completing the task trims the direct-I/O padding of the short last piece.
    write(&store, &task, 1, 2).await;
    assert!(task.is_complete());
    assert_eq!(fs::metadata(task.content_path()).unwrap().len(), 10 << 20);
    let bytes = fs::read(task.content_path()).unwrap();
    assert!(bytes[..4 << 20].iter().all(|&b| b == 1));
    assert!(bytes[8 << 20..].iter().all(|&b| b == 3));
}

#[tokio::test]
async fn a_different_geometry_for_a_known_task_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let id = "b".repeat(64);
    store
        .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
        .unwrap();
    let err = store
        .create_or_get(&id, Geometry::new(9 << 20, 4 << 20).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::GeometryConflict { .. }), "{err}");
    store.delete(&id).unwrap();
    assert!(store.get(&id).is_none());
    assert!(!dir.path().join("tasks").join(&id).exists());
}

#[test]
fn journal_records_appended_together_are_all_durable_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let id = "c".repeat(64);
    let pieces = 64u32;
    {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let store = runtime.block_on(async { open(dir.path()) });
        let task = store
            .create_or_get(
                &id,
                Geometry::new(u64::from(pieces) << 22, 4 << 20).unwrap(),
            )
            .unwrap();
        // Many appenders at once: group commit must leave no record unsynced or lost.
        std::thread::scope(|scope| {
            for worker in 0..8u32 {
                let task = &task;
                scope.spawn(move || {
                    for number in (worker..pieces).step_by(8) {
                        task.append_record(number, number * 7 + 1).unwrap();
                    }
                });
            }
        });
        let (appended, synced) = *task.journal_sync.counts.lock().unwrap();
        assert_eq!(appended, u64::from(pieces));
        assert_eq!(synced, u64::from(pieces), "every record covered by a sync");
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(async { open(dir.path()) });
    let task = store.get(&id).expect("recovered");
    for number in 0..pieces {
        assert_eq!(task.held(number), Some(number * 7 + 1), "piece {number}");
    }
}

/// Was: any task dir that failed to load (a garbage or newer task.json, but also EMFILE
/// or EACCES) was `remove_dir_all`ed at start-up, held bytes and all.
#[tokio::test]
async fn an_unloadable_task_dir_is_quarantined_with_its_bytes_and_the_others_load() {
    let dir = tempfile::tempdir().unwrap();
    let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
    let (good, garbage, newer) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    {
        let store = open(dir.path());
        for id in [&good, &garbage, &newer] {
            let task = store.create_or_get(id, geometry).unwrap();
            write(&store, &task, 0, 7).await;
        }
    }
    let tasks = dir.path().join("tasks");
    fs::write(tasks.join(&garbage).join("task.json"), b"{ not json").unwrap();
    let meta = fs::read_to_string(tasks.join(&newer).join("task.json")).unwrap();
    fs::write(
        tasks.join(&newer).join("task.json"),
        meta.replace("\"format\": 1", "\"format\": 99"),
    )
    .unwrap();
    // A creation that never reached task.json holds nothing and may go.
    let unfinished = tasks.join("d".repeat(64));
    fs::create_dir(&unfinished).unwrap();
    fs::write(unfinished.join("content"), b"").unwrap();
    // The quarantine already holds a dir of that name: the new one gets another.
    fs::create_dir_all(dir.path().join("quarantine").join(&garbage)).unwrap();
    let before: Vec<Vec<u8>> = [&garbage, &newer]
        .iter()
        .flat_map(|id| ["content", "pieces.log"].map(|f| fs::read(tasks.join(id).join(f)).unwrap()))
        .collect();

    let store = open(dir.path());
    assert!(store.get(&good).unwrap().held(0).is_some());
    assert!(store.get(&garbage).is_none() && store.get(&newer).is_none());
    assert!(!unfinished.exists());
    let quarantined = store.quarantined();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    let moved = |id: &str| {
        quarantined
            .iter()
            .find(|q| q.name == id)
            .unwrap_or_else(|| panic!("{id} not quarantined: {quarantined:?}"))
            .clone()
    };
    let (g, n) = (moved(&garbage), moved(&newer));
    assert_eq!(
        g.path,
        dir.path().join("quarantine").join(format!("{garbage}.1"))
    );
    assert!(g.reason.contains("parsing"), "{}", g.reason);
    assert!(n.reason.contains("format 99"), "{}", n.reason);
    let after: Vec<Vec<u8>> = [&g.path, &n.path]
        .iter()
        .flat_map(|p| ["content", "pieces.log"].map(|f| fs::read(p.join(f)).unwrap()))
        .collect();
    assert!(before == after, "quarantined bytes changed");
    assert!(!tasks.join(&garbage).exists() && !tasks.join(&newer).exists());
    // The task can be fetched again; its quarantined copy stays.
    store.create_or_get(&garbage, geometry).unwrap();
    assert!(g.path.join("content").exists());
}

/// Was a bare `AtomicBool` that transfers set and cleared by hand (and imports ignored).
#[test]
fn one_writer_at_a_time_and_the_guard_clears_even_on_unwind() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(async { open(dir.path()) });
    let task = store
        .create_or_get(&"e".repeat(64), Geometry::new(4 << 20, 4 << 20).unwrap())
        .unwrap();
    let guard = task.try_begin_writing(WriterKind::Import).unwrap();
    assert_eq!(task.writer(), Some(WriterKind::Import));
    let err = task.try_begin_writing(WriterKind::Transfer).err().unwrap();
    assert!(
        matches!(
            err,
            StoreError::Busy {
                writer: WriterKind::Import,
                ..
            }
        ),
        "{err}"
    );
    drop(guard);
    assert_eq!(task.writer(), None);
    let unwound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _guard = task.try_begin_writing(WriterKind::Transfer).unwrap();
        panic!("writer panics");
    }));
    assert!(unwound.is_err());
    assert_eq!(task.writer(), None, "cleared on unwind");
    let _again = task.try_begin_writing(WriterKind::Transfer).unwrap();
}

/// Was: a failed fdatasync was retried by the next group-commit leader (which Linux may
/// answer with success for the dropped pages), and a journal record whose sync failed
/// was read back as held after a restart.
#[tokio::test]
async fn a_failed_fdatasync_fails_the_task_and_its_piece_is_not_held_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let geometry = Geometry::new(12 << 20, 4 << 20).unwrap();
    let (content, journal, other) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
    {
        let store = open(dir.path());
        let other_task = store.create_or_get(&other, geometry).unwrap();
        for (n, id, target) in [
            (0, &content, SyncTarget::Content),
            (1, &journal, SyncTarget::Journal),
        ] {
            let task = store.create_or_get(id, geometry).unwrap();
            write(&store, &task, 0, 1).await;
            store.faults().arm(id, Fault::FailSync(target));
            let (buf, err) = try_write(&store, &task, 1, 2).await;
            assert!(buf.is_some(), "the device write itself completed");
            let err = err.expect_err("the sync failed");
            assert!(
                matches!(&err, StoreError::SyncFailed { piece: 1, file, source, .. }
                    if *file == target && source.raw_os_error() == Some(libc::EIO)),
                "{err}"
            );
            assert_eq!(task.held(1), None, "{target}: not held");
            assert!(task.failure().is_some());
            // No later write is taken, even though the next fdatasync would succeed.
            let (_, err) = try_write(&store, &task, 2, 3).await;
            let err = err.expect_err("the task has failed");
            assert!(
                matches!(&err, StoreError::TaskFailed { task_id, .. } if task_id == id),
                "{err}"
            );
            assert_eq!(task.held(2), None);
            // Other tasks are not affected.
            write(&store, &other_task, n, 4).await;
        }
        assert_eq!(other_task.held_count(), 2);
    }
    let store = open(dir.path());
    for id in [&content, &journal] {
        let task = store.get(id).expect("recovered");
        assert!(task.held(0).is_some(), "synced before the failure: held");
        assert_eq!(
            task.held(1),
            None,
            "its sync failed: not held after a restart"
        );
        assert_eq!(task.held(2), None);
        assert!(
            task.failure().is_none(),
            "recovered from its durable journal"
        );
    }
    let journal_len = fs::metadata(dir.path().join("tasks").join(&journal).join("pieces.log"))
        .unwrap()
        .len();
    assert_eq!(
        journal_len, RECORD_LEN as u64,
        "cut back to the synced record"
    );
    assert_eq!(store.get(&other).unwrap().held_count(), 2);
    // A recovered task takes writes again.
    let task = store.get(&content).unwrap();
    write(&store, &task, 1, 2).await;
}

/// Was: a follower queued behind a failed leader became leader, synced again, and could
/// be told its write was durable.
#[test]
fn followers_of_a_failed_group_sync_fail_too_and_no_flush_is_retried() {
    let sync = &GroupSync::default();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let flushes = AtomicU64::new(0);
    std::thread::scope(|scope| {
        let leader = scope.spawn(move || {
            sync.sync(|| {
                started_tx.send(()).unwrap();
                release_rx.recv().unwrap();
                Err(io::Error::from_raw_os_error(libc::EIO))
            })
        });
        started_rx.recv().unwrap();
        let flushes = &flushes;
        let follower = scope.spawn(move || {
            sync.sync(|| {
                flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            })
        });
        // Let the follower queue up behind the leader.
        std::thread::sleep(Duration::from_millis(100));
        release_tx.send(()).unwrap();
        let led = leader.join().unwrap();
        assert_eq!(led.unwrap_err().raw_os_error(), Some(libc::EIO));
        let followed = follower.join().unwrap();
        assert_eq!(followed.unwrap_err().raw_os_error(), Some(libc::EIO));
    });
    let later = sync.sync(|| {
        flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    });
    assert_eq!(later.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert_eq!(
        flushes.load(Ordering::Relaxed),
        0,
        "nothing flushed after the failure"
    );
}

/// Was: an fdatasync that never returned hung the piece (and its transfer) for good.
#[tokio::test]
async fn a_stalled_fdatasync_fails_the_piece_with_a_timeout_within_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_millis(300);
    let store = open_timed(dir.path(), bound);
    let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
    let (stalled, other) = ("a".repeat(64), "b".repeat(64));
    let task = store.create_or_get(&stalled, geometry).unwrap();
    let other_task = store.create_or_get(&other, geometry).unwrap();
    store.faults().arm(
        &stalled,
        Fault::StallSync(SyncTarget::Content, Duration::from_secs(2)),
    );
    let started = std::time::Instant::now();
    let (buf, err) = try_write(&store, &task, 0, 1).await;
    let took = started.elapsed();
    let err = err.expect_err("timed out");
    assert!(
        matches!(&err, StoreError::Timeout { piece: 0, step: IoStep::Durability, after, .. } if *after == bound),
        "{err}"
    );
    assert!(err.to_string().contains(&stalled), "{err}");
    assert!(
        took >= bound && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert!(
        buf.is_some(),
        "the device write had completed: its buffer comes back"
    );
    assert_eq!(task.held(0), None);
    let (_, err) = try_write(&store, &task, 1, 2).await;
    assert!(matches!(err, Err(StoreError::TaskFailed { .. })), "{err:?}");
    write(&store, &other_task, 0, 3).await;
    // The stalled sync finishing later does not make the piece held.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(task.held(0), None);
    assert_eq!(
        fs::metadata(dir.path().join("tasks").join(&stalled).join("pieces.log"))
            .unwrap()
            .len(),
        0
    );
}

/// Was: the reply of a hung device write was awaited forever. A timed-out write must not
/// hand its buffer back early either: the device may still read it.
#[tokio::test]
async fn a_stalled_device_write_times_out_and_its_buffer_returns_only_when_the_write_ends() {
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_millis(300);
    let store = open_timed(dir.path(), bound);
    let id = "a".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
        .unwrap();
    let free = store.pool().free_slots();
    store
        .faults()
        .arm(&id, Fault::StallWrite(Duration::from_millis(1500)));
    let started = std::time::Instant::now();
    let (buf, err) = try_write(&store, &task, 0, 1).await;
    let took = started.elapsed();
    assert!(
        matches!(
            &err,
            Err(StoreError::Timeout {
                piece: 0,
                step: IoStep::Write,
                ..
            })
        ),
        "{err:?}"
    );
    assert!(
        took >= bound && took < Duration::from_millis(1200),
        "{took:?}"
    );
    assert!(buf.is_none(), "the buffer stays with the write in flight");
    assert_eq!(
        store.pool().free_slots(),
        free - 1,
        "not back in the pool yet"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.pool().free_slots() != free {
        assert!(
            std::time::Instant::now() < deadline,
            "the buffer never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "back only after the write"
    );
    assert!(matches!(
        try_write(&store, &task, 1, 2).await.1,
        Err(StoreError::TaskFailed { .. })
    ));
}

/// Was: create_or_get held the store-wide write lock across mkdir, fallocate and the
/// fsyncs, so every lookup of every other task (the serve path) waited for a new task.
#[test]
fn creating_a_task_does_not_stall_lookups_of_other_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(async { open(dir.path()) });
    let geometry = Geometry::new(4 << 20, 4 << 20).unwrap();
    let (served, created) = ("a".repeat(64), "b".repeat(64));
    store.create_or_get(&served, geometry).unwrap();
    store
        .faults()
        .arm(&created, Fault::StallCreate(Duration::from_millis(1500)));
    std::thread::scope(|scope| {
        let first = scope.spawn(|| store.create_or_get(&created, geometry).unwrap());
        std::thread::sleep(Duration::from_millis(200));
        let second = scope.spawn(|| store.create_or_get(&created, geometry).unwrap());
        let started = std::time::Instant::now();
        assert!(store.get(&served).is_some());
        assert_eq!(
            store.list().len(),
            1,
            "the task being created is not listed yet"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "lookups waited {:?} for another task's creation",
            started.elapsed()
        );
        let (first, second) = (first.join().unwrap(), second.join().unwrap());
        assert!(Arc::ptr_eq(&first, &second), "created once");
    });
    assert_eq!(store.list().len(), 2);
    assert!(store.creating.lock().unwrap().is_empty());
}

/// Was: every task kept four descriptors open from start-up on, so a store of many tasks
/// ran out of them (EMFILE) before it served anything.
#[tokio::test]
async fn descriptors_are_opened_on_use_and_bounded_by_max_open_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let options = || StoreOptions {
        max_open_tasks: 4,
        ..StoreOptions::default()
    };
    let geometry = Geometry::new(4 << 20, 4 << 20).unwrap();
    let ids: Vec<String> = (0..12u8).map(|i| format!("{:064x}", i + 1)).collect();
    {
        let store = open_with(dir.path(), options());
        for (i, id) in ids.iter().enumerate() {
            let task = store.create_or_get(id, geometry).unwrap();
            write(&store, &task, 0, i as u8 + 1).await;
            assert!(store.open_tasks() <= 4, "{} open", store.open_tasks());
        }
    }
    let store = open_with(dir.path(), options());
    assert_eq!(store.list().len(), 12);
    assert_eq!(store.open_tasks(), 0, "nothing opened at start-up");
    // A file handed out stays usable after its task's descriptors are closed by the LRU.
    let first = store.get(&ids[0]).unwrap().read_file().unwrap();
    for (i, id) in ids.iter().enumerate() {
        let file = store.get(id).unwrap().read_file().unwrap();
        let mut byte = [0u8; 1];
        file.read_exact_at(&mut byte, 4095).unwrap();
        assert_eq!(byte[0], i as u8 + 1);
        assert!(store.open_tasks() <= 5, "{} open", store.open_tasks());
    }
    let mut byte = [0u8; 1];
    first.read_exact_at(&mut byte, 0).unwrap();
    assert_eq!(byte[0], 1);
    drop(first);
    // Reading the next one closes idle ones until the limit holds again.
    let _ = store.get(&ids[1]).unwrap().read_file().unwrap();
    assert!(store.open_tasks() <= 4, "{} open", store.open_tasks());
}

/// The panic fault (for tests of panic handling above the store) fires once.
#[tokio::test]
async fn an_armed_panic_fires_once_and_the_task_is_written_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    let id = "a".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(4 << 20, 4 << 20).unwrap())
        .unwrap();
    store.faults().arm(&id, Fault::PanicWrite);
    let panicked = tokio::spawn({
        let (store, task) = (Arc::clone(&store), Arc::clone(&task));
        async move { try_write(&store, &task, 0, 1).await.1 }
    })
    .await
    .expect_err("the write panicked");
    assert!(panicked.is_panic());
    assert_eq!(task.held(0), None);
    write(&store, &task, 0, 1).await;
    assert!(task.is_complete());
}

/// What a reflink leaves behind, made by hand where the test's filesystem has none (the
/// real FICLONE is tested on XFS in tests/tests/reflink.rs): the content holds the bytes,
/// synced, and the task is marked cloned.
fn pretend_cloned(task: &Arc<StoredTask>, fill: impl Fn(u32) -> u8) -> Vec<u32> {
    let file = OpenOptions::new()
        .write(true)
        .open(task.content_path())
        .unwrap();
    let crcs = task
        .geometry()
        .pieces()
        .map(|p| {
            let bytes = vec![fill(p.number); p.length as usize];
            file.write_all_at(&bytes, p.offset).unwrap();
            crc32fast::hash(&bytes)
        })
        .collect();
    file.sync_all().unwrap();
    task.cloned.store(true, Ordering::Release);
    crcs
}

#[tokio::test]
async fn cloned_pieces_are_held_once_journaled_and_recovered_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let id = "a".repeat(64);
    let geometry = Geometry::new(10 << 20, 4 << 20).unwrap();
    let crcs = {
        let store = open(dir.path());
        let task = store.create_or_get(&id, geometry).unwrap();
        let crcs = pretend_cloned(&task, |n| n as u8 + 1);
        store.record_cloned_piece(&task, 0, crcs[0]).await.unwrap();
        store.record_cloned_piece(&task, 2, crcs[2]).await.unwrap();
        // Recording a held piece again appends nothing.
        store.record_cloned_piece(&task, 2, crcs[2]).await.unwrap();
        assert_eq!(task.held(0), Some(crcs[0]));
        assert_eq!(task.held(1), None);
        assert_eq!(task.held_count(), 2);
        let (appended, synced) = *task.journal_sync.counts.lock().unwrap();
        assert_eq!((appended, synced), (2, 2), "each record covered by a sync");
        let err = store.record_cloned_piece(&task, 3, 0).await.unwrap_err();
        assert!(matches!(err, StoreError::Geometry(_)), "{err}");
        crcs
    };
    let journal = dir.path().join("tasks").join(&id).join("pieces.log");
    assert_eq!(fs::metadata(&journal).unwrap().len(), 2 * RECORD_LEN as u64);

    let store = open(dir.path());
    let task = store.get(&id).expect("recovered");
    assert_eq!(task.held(0), Some(crcs[0]));
    assert_eq!(task.held(1), None);
    assert_eq!(task.held(2), Some(crcs[2]));
    // The restarted daemon did not clone this task: the missing piece is not taken as
    // cloned, it is written.
    let err = store
        .record_cloned_piece(&task, 1, crcs[1])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotClonable { .. }), "{err}");
    assert_eq!(task.held(1), None);
    assert_eq!(write(&store, &task, 1, 2).await, crcs[1]);
    assert!(task.is_complete());
    let bytes = fs::read(task.content_path()).unwrap();
    assert_eq!(bytes.len(), 10 << 20);
    assert!(bytes[8 << 20..].iter().all(|&b| b == 3));
}

#[tokio::test]
async fn cloning_the_last_piece_completes_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let task = store
        .create_or_get(&"a".repeat(64), Geometry::new(8 << 20, 4 << 20).unwrap())
        .unwrap();
    let crcs = pretend_cloned(&task, |n| n as u8 + 5);
    for (number, crc) in crcs.iter().enumerate() {
        store
            .record_cloned_piece(&task, number as u32, *crc)
            .await
            .unwrap();
    }
    assert!(task.is_complete());
    assert!(
        task.handles.lock().unwrap().write.is_none(),
        "write descriptors closed"
    );
}

/// The journal step of a cloned piece follows write_piece's rules: a failed fdatasync
/// fails the task, the record is cut back, and nothing it covered is held after a restart.
#[tokio::test]
async fn a_failed_journal_sync_of_a_cloned_piece_fails_the_task_and_it_is_not_held_after_a_restart()
{
    let dir = tempfile::tempdir().unwrap();
    let id = "a".repeat(64);
    let geometry = Geometry::new(12 << 20, 4 << 20).unwrap();
    {
        let store = open(dir.path());
        let task = store.create_or_get(&id, geometry).unwrap();
        let crcs = pretend_cloned(&task, |n| n as u8 + 1);
        store.record_cloned_piece(&task, 0, crcs[0]).await.unwrap();
        store
            .faults()
            .arm(&id, Fault::FailSync(SyncTarget::Journal));
        let err = store
            .record_cloned_piece(&task, 1, crcs[1])
            .await
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::SyncFailed { piece: 1, file: SyncTarget::Journal, source, .. }
                if source.raw_os_error() == Some(libc::EIO)),
            "{err}"
        );
        assert_eq!(task.held(1), None);
        assert!(task.failure().is_some());
        // No later record is taken, though the next fdatasync would succeed; no write
        // either.
        let err = store
            .record_cloned_piece(&task, 2, crcs[2])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TaskFailed { .. }), "{err}");
        assert!(matches!(
            try_write(&store, &task, 2, 3).await.1,
            Err(StoreError::TaskFailed { .. })
        ));
        assert_eq!(task.held_count(), 1);
    }
    let journal = dir.path().join("tasks").join(&id).join("pieces.log");
    assert_eq!(
        fs::metadata(&journal).unwrap().len(),
        RECORD_LEN as u64,
        "cut back to the synced record"
    );
    let store = open(dir.path());
    let task = store.get(&id).expect("recovered");
    assert!(task.held(0).is_some());
    assert_eq!(
        task.held(1),
        None,
        "its sync failed: not held after a restart"
    );
    assert!(task.failure().is_none());
}

/// A stalled journal fdatasync fails the cloned piece within the I/O bound, as for a
/// written piece.
#[tokio::test]
async fn a_stalled_journal_sync_of_a_cloned_piece_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let bound = Duration::from_millis(300);
    let store = open_timed(dir.path(), bound);
    let id = "a".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(8 << 20, 4 << 20).unwrap())
        .unwrap();
    let crcs = pretend_cloned(&task, |n| n as u8 + 1);
    store.faults().arm(
        &id,
        Fault::StallSync(SyncTarget::Journal, Duration::from_secs(2)),
    );
    let started = std::time::Instant::now();
    let err = store
        .record_cloned_piece(&task, 0, crcs[0])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            StoreError::Timeout {
                piece: 0,
                step: IoStep::Durability,
                ..
            }
        ),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_millis(1500));
    assert_eq!(task.held(0), None);
    assert!(matches!(
        store.record_cloned_piece(&task, 1, crcs[1]).await,
        Err(StoreError::TaskFailed { .. })
    ));
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(task.held(0), None, "the late sync does not make it held");
}

/// Where no reflink is possible (a source on another filesystem: EXDEV; on tmpfs:
/// EOPNOTSUPP) nothing changes: the content stays preallocated, no piece may be recorded
/// as cloned, and pieces are written as before. A task holding pieces is never cloned.
#[tokio::test]
async fn clone_content_where_reflinks_are_unsupported_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let geometry = Geometry::new(8 << 20, 4 << 20).unwrap();
    let task = store.create_or_get(&"a".repeat(64), geometry).unwrap();
    let source = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
    source.as_file().set_len(8 << 20).unwrap();
    let source = Arc::new(source.reopen().unwrap());
    let cloned = store
        .clone_content(&task, Arc::clone(&source))
        .await
        .unwrap();
    let Cloned::Unsupported(err) = cloned else {
        panic!("a reflink across filesystems succeeded")
    };
    assert!(reflink_unsupported(&err), "{err}");
    assert!(!task.cloned.load(Ordering::Acquire));
    assert!(task.failure().is_none());
    let content = fs::metadata(task.content_path()).unwrap();
    assert_eq!(content.len(), 8 << 20);
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&content) * 512 >= 8 << 20,
        "still preallocated"
    );
    let err = store.record_cloned_piece(&task, 0, 1).await.unwrap_err();
    assert!(matches!(err, StoreError::NotClonable { .. }), "{err}");
    write(&store, &task, 0, 1).await;
    let err = store.clone_content(&task, source).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::NotClonable { reason, .. } if reason.contains("holds 1 pieces")),
        "{err}"
    );
    assert_eq!(task.held_count(), 1);
}

/// Was: only the task dir was synced (by task.json's rename), so a crash could lose the
/// new dir's entry in tasks/ and with it every piece written into it.
#[test]
fn a_new_task_dir_is_synced_into_tasks_and_its_files_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = runtime.block_on(async { open(dir.path()) });
    let id = "f".repeat(64);
    store
        .create_or_get(&id, Geometry::new(4 << 20, 4 << 20).unwrap())
        .unwrap();
    let synced = SYNCED_DIRS.lock().unwrap().clone();
    let tasks = dir.path().join("tasks");
    assert!(synced.contains(&tasks), "tasks/ not synced: {synced:?}");
    assert!(synced.contains(&tasks.join(&id)), "task dir not synced");
}
