//! The io_uring backend against the real kernel, with its fault switches: a buffer comes back
//! only after its completions, a failed ring is drained and replaced, fixed-file slots are not
//! repointed under outstanding SQEs, and reads land in the pool slots.

use crate::io::{
    BufferPool, IoChoice, IoCounters, IoEngine, IoFault, PieceBuffer, ReadRequest, TaskFile,
    WriteRequest, POISON,
};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const SLOT: usize = 1 << 20;

fn engine(slots: usize) -> (Arc<BufferPool>, IoEngine) {
    let pool = BufferPool::new(SLOT, slots).unwrap();
    pool.set_poison_on_release(true);
    let io = IoEngine::start(&pool, IoChoice::Uring, 1).expect("io_uring works on this kernel");
    (pool, io)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

async fn filled(pool: &Arc<BufferPool>, bytes: &[u8]) -> PieceBuffer {
    let mut buf = pool.acquire(bytes.len() as u64).await.unwrap();
    let mut at = 0;
    for chunk in buf.chunks_mut() {
        chunk.copy_from_slice(&bytes[at..at + chunk.len()]);
        at += chunk.len();
    }
    buf
}

async fn write(
    io: &IoEngine,
    file: &Arc<TaskFile>,
    offset: u64,
    mut buf: PieceBuffer,
) -> (PieceBuffer, std::io::Result<()>) {
    let len = file.io_len(buf.len());
    buf.zero_tail(len);
    io.write(WriteRequest {
        file: Arc::clone(file),
        offset,
        buf,
        len,
    })
    .await
}

fn on_disk(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut back = vec![0u8; len];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut back, offset)
        .unwrap();
    back
}

fn rebuilds(io: &IoEngine) -> u64 {
    IoCounters::get(&io.counters().ring_rebuilds)
}

/// The kernel never saw the SQEs: the write fails, its buffer comes straight back, and the
/// replacement ring takes the retry.
#[tokio::test]
async fn a_submit_error_before_the_kernel_fails_the_write_and_a_new_ring_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, io) = engine(8);
    let path = dir.path().join("content");
    let file = Arc::new(TaskFile::open(&path, true).unwrap());
    let bytes = pattern(1, 3 * SLOT);
    io.faults().arm(IoFault::SubmitError);
    let (buf, result) = write(&io, &file, 0, filled(&pool, &bytes).await).await;
    let err = result.expect_err("the injected submit error fails the write");
    assert!(err.to_string().contains("before the kernel took"), "{err}");
    assert!(!buf.device_owned());
    assert_eq!(rebuilds(&io), 1);
    let (buf, result) = write(&io, &file, 0, buf).await;
    result.expect("the rebuilt ring writes");
    assert!(on_disk(&path, 0, bytes.len()) == bytes);
    drop(buf);
    assert_eq!(pool.free_slots(), 8);
    assert_eq!(pool.returned_while_device_owned(), 0);
}

/// The submit reports an error after the kernel took the SQEs (the case `fail_all` got
/// wrong): the write runs on, and its buffer comes back only with its completions, with the
/// kernel's real answer. Slots reused right after (poisoned when returned) never reach disk.
#[tokio::test]
async fn a_submit_error_after_the_kernel_took_the_sqes_answers_only_after_their_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, io) = engine(8);
    let path = dir.path().join("content");
    let file = Arc::new(TaskFile::open(&path, true).unwrap());
    let first = pattern(2, 4 * SLOT);
    io.faults().arm(IoFault::SubmitErrorAfterSubmit);
    let (buf, result) = write(&io, &file, 0, filled(&pool, &first).await).await;
    assert!(!buf.device_owned(), "answered before its completions");
    result.expect("the kernel wrote it: its completions say so");
    assert_eq!(rebuilds(&io), 1);
    drop(buf); // poisoned now: a late write from these slots would put POISON on disk
    let second = pattern(3, 4 * SLOT);
    let (buf, result) = write(&io, &file, (4 * SLOT) as u64, filled(&pool, &second).await).await;
    result.unwrap();
    drop(buf);
    assert!(on_disk(&path, 0, first.len()) == first);
    assert!(on_disk(&path, (4 * SLOT) as u64, second.len()) == second);
    assert_eq!(pool.free_slots(), 8);
    assert_eq!(pool.returned_while_device_owned(), 0);
}

#[tokio::test]
async fn a_short_write_and_an_eio_completion_fail_the_write_after_its_completions() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, io) = engine(8);
    let path = dir.path().join("content");
    let file = Arc::new(TaskFile::open(&path, true).unwrap());
    let bytes = pattern(4, 2 * SLOT + 12_345);
    io.faults().arm(IoFault::ShortWrite);
    let (buf, result) = write(&io, &file, 0, filled(&pool, &bytes).await).await;
    let err = result.expect_err("short");
    assert_eq!(err.kind(), std::io::ErrorKind::WriteZero, "{err}");
    assert!(!buf.device_owned());
    io.faults().arm(IoFault::EioCompletion);
    let (buf, result) = write(&io, &file, 0, buf).await;
    assert_eq!(result.unwrap_err().raw_os_error(), Some(libc::EIO));
    assert!(!buf.device_owned());
    let (buf, result) = write(&io, &file, 0, buf).await;
    result.unwrap();
    assert!(on_disk(&path, 0, bytes.len()) == bytes);
    assert_eq!(rebuilds(&io), 0, "a failed write is not a failed ring");
    drop(buf);
    assert_eq!(pool.free_slots(), 8);
}

/// An operation the kernel holds past the drain deadline is quarantined: its buffer stays out
/// of the pool (no answer: the caller's own timeout gives up), and goes back only once its
/// completion finally comes. A read of an empty FIFO is such an operation, for real.
#[tokio::test]
async fn an_operation_the_kernel_never_finishes_keeps_its_buffer_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, io) = engine(4);
    io.faults().set_drain_deadline(Duration::from_millis(200));
    let fifo = dir.path().join("fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Read and write, so opening does not wait for a writer and a read waits for data.
    let handle = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let writer = handle.try_clone().unwrap();
    let file = Arc::new(TaskFile::wrap(handle, false));
    let buf = pool.acquire(4096).await.unwrap();
    io.faults().arm(IoFault::SubmitErrorAfterSubmit);
    let read = io.read(ReadRequest {
        file: Arc::clone(&file),
        offset: 0,
        buf,
        len: 4096,
    });
    let waited = tokio::time::timeout(Duration::from_secs(1), read).await;
    assert!(
        waited.is_err(),
        "no answer while the kernel holds the buffer"
    );
    assert_eq!(IoCounters::get(&io.counters().quarantined_ops), 1);
    assert_eq!(pool.free_slots(), 3, "the slot stays out of the pool");
    // Other work goes on, on the new ring.
    let path = dir.path().join("content");
    let other = Arc::new(TaskFile::open(&path, true).unwrap());
    let bytes = pattern(5, SLOT);
    let (buf, result) = write(&io, &other, 0, filled(&pool, &bytes).await).await;
    result.unwrap();
    drop(buf);
    // The kernel answers at last: the slot comes back.
    nix::unistd::write(&writer, b"late").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pool.free_slots() != 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(IoCounters::get(&io.counters().quarantined_ops), 0);
    assert_eq!(pool.returned_while_device_owned(), 0);
}

/// More files than the ring has fixed-file slots, written at once: slots are reused only
/// when no SQE names them, so every write lands in its own file.
#[tokio::test]
async fn fixed_file_slots_are_reused_only_when_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, io) = engine(96);
    let io = Arc::new(io);
    let mut files = Vec::new();
    for index in 0..90u8 {
        let path = dir.path().join(format!("f{index}"));
        files.push((path.clone(), Arc::new(TaskFile::open(&path, true).unwrap())));
    }
    let mut writes = Vec::new();
    for (index, (_, file)) in files.iter().enumerate() {
        let bytes = pattern(index as u8, 64 * 1024);
        let buf = filled(&pool, &bytes).await;
        let (io, file) = (Arc::clone(&io), Arc::clone(file));
        writes.push(tokio::spawn(async move {
            let (buf, result) = write(&io, &file, 0, buf).await;
            result.unwrap();
            io.release_file(&file);
            drop(buf);
        }));
    }
    for write in writes {
        write.await.unwrap();
    }
    for (index, (path, _)) in files.iter().enumerate() {
        assert!(
            on_disk(path, 0, 64 * 1024) == pattern(index as u8, 64 * 1024),
            "file {index}"
        );
    }
    assert_eq!(pool.free_slots(), 96);
}

async fn read_back(
    io: &IoEngine,
    pool: &Arc<BufferPool>,
    file: &Arc<TaskFile>,
    offset: u64,
    len: usize,
) -> (PieceBuffer, std::io::Result<usize>) {
    let mut buf = pool.acquire(len as u64).await.unwrap();
    let capacity = buf.capacity();
    for chunk in buf.chunks_upto_mut(capacity) {
        chunk.fill(0x11);
    }
    let ask = file.io_len(len);
    io.read(ReadRequest {
        file: Arc::clone(file),
        offset,
        buf,
        len: ask,
    })
    .await
}

/// Drops the file's pages from the page cache, so a read goes to the device.
fn make_cold(path: &Path) {
    let file = std::fs::File::open(path).unwrap();
    file.sync_all().unwrap();
    nix::fcntl::posix_fadvise(
        &file,
        0,
        0,
        nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .unwrap();
}

async fn reads_land_in_the_slots(choice: IoChoice, direct: bool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = BufferPool::new(SLOT, 8).unwrap();
    let io = IoEngine::start(&pool, choice, 1).unwrap();
    let path = dir.path().join("content");
    // Two pieces, the last one short and not block-aligned.
    let bytes = pattern(9, 3 * SLOT + 5_000);
    std::fs::write(&path, &bytes).unwrap();
    make_cold(&path);
    let file = Arc::new(TaskFile::open_read(&path, direct).unwrap());
    if direct {
        assert!(file.is_direct(), "this filesystem takes O_DIRECT");
    }
    for (offset, len) in [(0usize, 2 * SLOT), (2 * SLOT, SLOT + 5_000)] {
        let (buf, result) = read_back(&io, &pool, &file, offset as u64, len).await;
        assert_eq!(result.unwrap(), len, "{choice:?} direct={direct}");
        assert!(buf.chunks().concat() == bytes[offset..offset + len]);
        assert!(!buf.device_owned());
    }
    // A piece the file does not have all of: fewer bytes, no error.
    let (_, result) = read_back(&io, &pool, &file, (2 * SLOT) as u64, 2 * SLOT).await;
    assert_eq!(result.unwrap(), SLOT + 5_000);
    let counters = io.counters();
    assert_eq!(IoCounters::get(&counters.reads), 3);
    let copies = if file.is_direct() { 0 } else { 3 };
    assert_eq!(IoCounters::get(&counters.read_payload_copies), copies);
    assert_eq!(IoCounters::get(&counters.direct_reads), 3 - copies);
    assert_eq!(pool.free_slots(), 8);
}

#[tokio::test]
async fn uring_direct_reads_copy_nothing() {
    reads_land_in_the_slots(IoChoice::Uring, true).await;
}

#[tokio::test]
async fn uring_buffered_reads() {
    reads_land_in_the_slots(IoChoice::Uring, false).await;
}

#[tokio::test]
async fn sync_direct_and_buffered_reads() {
    reads_land_in_the_slots(IoChoice::Sync, true).await;
    reads_land_in_the_slots(IoChoice::Sync, false).await;
}

#[tokio::test]
async fn poison_marks_returned_slots() {
    let (pool, _io) = engine(1);
    let buf = filled(&pool, &pattern(7, 100)).await;
    drop(buf);
    let mut again = pool.acquire(SLOT as u64).await.unwrap();
    assert!(again.chunks_mut()[0].iter().all(|&b| b == POISON));
}
