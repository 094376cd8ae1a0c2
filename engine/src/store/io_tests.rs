//! The store over the real io_uring backend with its faults injected, serving reads, and
//! the pool budgets seen from the store.

use super::*;
use crate::io::{Budget, IoChoice, IoCounters, IoFault, POISON};

const PIECE: u64 = 4 << 20;

fn open_uring(dir: &Path, direct_io: bool) -> Store {
    let pool = BufferPool::new(PIECE as usize, 16).unwrap();
    pool.set_poison_on_release(true);
    let io = IoEngine::start(&pool, IoChoice::Uring, 1).expect("io_uring works here");
    let options = StoreOptions {
        direct_io,
        io_timeout: Duration::from_secs(10),
        ..StoreOptions::default()
    };
    Store::open_with(dir, pool, io, options).unwrap()
}

fn piece_bytes(number: u32, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u32).wrapping_mul(0x9E37_79B1) >> 13) as u8 ^ number as u8)
        .collect()
}

async fn write_bytes(
    store: &Store,
    task: &Arc<StoredTask>,
    number: u32,
) -> (Option<PieceBuffer>, Result<(), StoreError>) {
    let piece = task.geometry().piece(number).unwrap();
    let bytes = piece_bytes(number, piece.length as usize);
    let mut buf = store.pool().acquire(piece.length).await.unwrap();
    let mut at = 0;
    for chunk in buf.chunks_mut() {
        chunk.copy_from_slice(&bytes[at..at + chunk.len()]);
        at += chunk.len();
    }
    let crc = buf.crc32();
    store.write_piece(task, piece, buf, crc).await
}

/// Every held piece has exactly its bytes on disk (read back through the page cache).
fn assert_held_pieces_are_right(task: &StoredTask) {
    let content = std::fs::read(task.content_path()).unwrap();
    for piece in task.geometry().pieces() {
        if let Some(crc) = task.held(piece.number) {
            let on_disk = &content[piece.offset as usize..(piece.offset + piece.length) as usize];
            assert!(
                on_disk == piece_bytes(piece.number, piece.length as usize),
                "held piece {} has wrong bytes (poison: {})",
                piece.number,
                on_disk.contains(&POISON)
            );
            assert_eq!(crc32fast::hash(on_disk), crc);
        }
    }
}

/// The test: an injected io_uring submit error (before or after the kernel took the
/// SQEs), a short write and an EIO completion never leave a held piece with wrong bytes, and
/// no buffer goes back to the pool before its completions.
#[tokio::test]
async fn injected_io_uring_faults_never_leave_a_held_piece_with_wrong_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_uring(dir.path(), true);
    let id = "c".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(6 * PIECE + 12_345, PIECE).unwrap())
        .unwrap();
    let faults = [
        IoFault::SubmitError,
        IoFault::SubmitErrorAfterSubmit,
        IoFault::ShortWrite,
        IoFault::EioCompletion,
    ];
    for (number, fault) in faults.into_iter().enumerate() {
        let number = number as u32;
        store.io_faults().arm(fault);
        let (buf, result) = write_bytes(&store, &task, number).await;
        let buf = buf.expect("answered, so the buffer is back");
        assert!(!buf.device_owned());
        drop(buf);
        match fault {
            // The kernel did write it: the completions are the truth.
            IoFault::SubmitErrorAfterSubmit => result.unwrap(),
            _ => {
                assert!(result.is_err(), "{fault:?}: {result:?}");
                assert_eq!(task.held(number), None, "{fault:?}");
                // Pieces written meanwhile reuse (poisoned) slots.
                write_bytes(&store, &task, 6).await.1.unwrap();
                write_bytes(&store, &task, number).await.1.unwrap();
            }
        }
        assert_held_pieces_are_right(&task);
    }
    assert_eq!(IoCounters::get(&store.io_counters().ring_rebuilds), 2);
    assert_eq!(store.pool().returned_while_device_owned(), 0);
    assert_eq!(store.pool().free_slots(), 16);
}

async fn served_bytes(store: &Store, task: &Arc<StoredTask>, number: u32) -> Vec<u8> {
    let piece = task.geometry().piece(number).unwrap();
    let buf = store.read_piece(task, piece).await.unwrap();
    assert_eq!(buf.budget(), Budget::Serve);
    buf.chunks().concat()
}

async fn a_held_task_is_served_from_disk(direct_io: bool) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_uring(dir.path(), direct_io);
    let id = "d".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(2 * PIECE + 5_000, PIECE).unwrap())
        .unwrap();
    for number in 0..3 {
        write_bytes(&store, &task, number).await.1.unwrap();
    }
    assert!(task.is_complete());
    // Cold: the pages leave the cache, so a read goes to the device.
    let content = File::open(task.content_path()).unwrap();
    nix::fcntl::posix_fadvise(
        &content,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
    for number in [2, 0, 1] {
        let piece = task.geometry().piece(number).unwrap();
        assert!(
            served_bytes(&store, &task, number).await == piece_bytes(number, piece.length as usize),
            "piece {number}"
        );
    }
    let counters = store.io_counters();
    assert_eq!(IoCounters::get(&counters.reads), 3);
    let copies = if direct_io { 0 } else { 3 };
    assert_eq!(IoCounters::get(&counters.read_payload_copies), copies);
    assert_eq!(store.pool().free_slots(), 16);
    // The file cut short under the daemon: a typed error, not short bytes.
    OpenOptions::new()
        .write(true)
        .open(task.content_path())
        .unwrap()
        .set_len(PIECE + 100)
        .unwrap();
    let piece = task.geometry().piece(1).unwrap();
    let err = store.read_piece(&task, piece).await.unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::ShortRead {
                piece: 1,
                got: 100,
                expected: PIECE,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(store.pool().free_slots(), 16);
}

#[tokio::test]
async fn a_held_task_is_served_with_direct_reads_and_no_copy() {
    a_held_task_is_served_from_disk(true).await;
}

#[tokio::test]
async fn a_held_task_is_served_with_buffered_reads() {
    a_held_task_is_served_from_disk(false).await;
}

/// A host whose receive side holds every buffer it may still serves, and one whose serving
/// side holds every buffer it may still receives: neither waits on the other's buffers.
#[tokio::test]
async fn receiving_and_serving_cannot_starve_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_uring(dir.path(), true);
    store
        .pool()
        .set_acquire_timeout(Some(Duration::from_millis(300)));
    let id = "e".repeat(64);
    let task = store
        .create_or_get(&id, Geometry::new(PIECE, PIECE).unwrap())
        .unwrap();
    write_bytes(&store, &task, 0).await.1.unwrap();
    let piece = task.geometry().piece(0).unwrap();
    // Receiving takes all it can: its reserve and the whole common part.
    let mut receiving = Vec::new();
    while let Some(buf) = store.pool().try_acquire(PIECE).unwrap() {
        receiving.push(buf);
    }
    assert_eq!(receiving.len(), store.pool().budget_limit(Budget::Receive));
    let err = store.pool().acquire(PIECE).await.unwrap_err();
    assert!(
        matches!(
            err,
            crate::io::PoolError::Timeout {
                budget: Budget::Receive,
                ..
            }
        ),
        "{err}"
    );
    // Serving still goes: every piece of the serve reserve at once.
    let mut serving = Vec::new();
    for _ in 0..store.pool().shares().serve {
        serving.push(store.read_piece(&task, piece).await.expect("serves"));
    }
    drop(serving);
    drop(receiving);
    // The other way round: serving holds all it may, receiving still gets its reserve.
    let mut serving = Vec::new();
    while let Some(buf) = store.pool().try_acquire_for(Budget::Serve, PIECE).unwrap() {
        serving.push(buf);
    }
    assert_eq!(serving.len(), store.pool().budget_limit(Budget::Serve));
    assert!(matches!(
        store.read_piece(&task, piece).await.unwrap_err(),
        StoreError::Pool(crate::io::PoolError::Timeout {
            budget: Budget::Serve,
            ..
        })
    ));
    let mut receiving = Vec::new();
    for _ in 0..store.pool().shares().receive {
        receiving.push(store.pool().acquire(PIECE).await.expect("receives"));
    }
    // And an import too.
    let import = store
        .pool()
        .acquire_for(Budget::Import, PIECE)
        .await
        .expect("imports");
    drop((import, receiving, serving));
    assert_eq!(store.pool().free_slots(), 16);
}
