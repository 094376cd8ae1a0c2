//! Transfers between two stores in one process, over a real TCP data port, with the store's
//! test-only faults armed on the receiver: what a panicking or hung piece write does to a
//! transfer.

use super::*;
use crate::io::{BufferPool, IoChoice, IoEngine};
use crate::metrics::PieceFailure;
use crate::serve::StoreProvider;
use crate::store::{Fault, StoreOptions};
use ferry_fallback_tcp::{ClientConfig, Server, ServerConfig};

struct Pair {
    _dirs: (tempfile::TempDir, tempfile::TempDir),
    receiver: Arc<Store>,
    engine: Arc<Engine>,
    source: String,
    task_id: String,
    bytes: Vec<u8>,
}

fn store(dir: &Path, io_timeout: Duration) -> Arc<Store> {
    let pool = BufferPool::new(4 << 20, 16).unwrap();
    let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
    let options = StoreOptions {
        direct_io: true,
        io_timeout,
        ..StoreOptions::default()
    };
    Arc::new(Store::open_with(dir, pool, io, options).unwrap())
}

/// A seed holding 5 pieces (18 MiB) behind a real data port, and a receiver's engine.
async fn pair(io_timeout: Duration, max_attempts: u32) -> Pair {
    let dirs = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let seed = store(&dirs.0.path().join("seed"), Duration::from_secs(30));
    let file = dirs.0.path().join("model.bin");
    let bytes: Vec<u8> = (0..18u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    let (task, _) = crate::import::import_file(&seed, &file, &Default::default())
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let source = listener.local_addr().unwrap().to_string();
    let provider = Arc::new(StoreProvider {
        store: Arc::clone(&seed),
        host_id: "seed".into(),
        rdma: None,
    });
    tokio::spawn(Server::new(listener, provider, ServerConfig::default()).run());
    let receiver = store(&dirs.1.path().join("receiver"), io_timeout);
    let engine = Arc::new(Engine::new(
        Arc::clone(&receiver),
        Arc::new(TcpTransport::new(ClientConfig::default())),
        None,
        TransferSettings {
            streams_per_source: 2,
            piece_timeout: Duration::from_secs(30),
            max_attempts,
            source_failure_limit: 3,
            max_task_bytes: 1 << 40,
        },
        Vec::new(),
    ));
    Pair {
        _dirs: dirs,
        receiver,
        engine,
        source,
        task_id: task.id().to_owned(),
        bytes,
    }
}

fn request(pair: &Pair) -> TransferRequest {
    TransferRequest {
        task_id: pair.task_id.clone(),
        content_length: 0,
        piece_length: 0,
        pieces: Vec::new(),
        sources: vec![pair.source.clone()],
        output: None,
        streams_per_source: 0,
        transport: TransportChoice::Tcp,
        digest: None,
        origin: None,
        origin_connections: 0,
        source_weights: Vec::new(),
    }
}

async fn run(pair: &Pair) -> Result<TransferSummary, TransferError> {
    let prepared = pair.engine.prepare(request(pair)).await?;
    let (events, mut drain) = mpsc::channel(64);
    tokio::spawn(async move { while drain.recv().await.is_some() {} });
    pair.engine.run(prepared, events).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_write_that_panics_once_is_retried_and_the_transfer_completes() {
    let pair = pair(Duration::from_secs(30), 3).await;
    // The task exists on the receiver only once prepared: arm the fault by its id first.
    pair.receiver.faults().arm(&pair.task_id, Fault::PanicWrite);
    let summary = run(&pair).await.expect("the transfer completes");
    assert_eq!(summary.retries, 1, "one attempt panicked and was retried");
    assert_eq!(summary.pieces_fetched, 5);
    assert_eq!(
        pair.engine.metrics.piece_failures(PieceFailure::Internal),
        1
    );
    let task = pair.receiver.get(&pair.task_id).unwrap();
    assert!(task.is_complete());
    assert!(task.writer().is_none(), "the writing flag is cleared");
    assert_eq!(std::fs::read(task.content_path()).unwrap(), pair.bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piece_write_that_panics_to_its_last_attempt_fails_as_internal_and_frees_the_task() {
    // One attempt per piece: the first panic is the piece's last.
    let pair = pair(Duration::from_secs(30), 1).await;
    pair.receiver.faults().arm(&pair.task_id, Fault::PanicWrite);
    let err = run(&pair).await.unwrap_err();
    assert!(
        matches!(&err, TransferError::Internal { what, .. } if what.contains("panicked")),
        "{err}"
    );
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::Internal);
    let task = pair.receiver.get(&pair.task_id).unwrap();
    assert!(task.writer().is_none(), "the writing flag is cleared");
    // Nothing is stuck: the same task can be pulled again, and now completes.
    let summary = run(&pair).await.expect("a second transfer runs");
    assert_eq!(summary.pieces_reused + summary.pieces_fetched, 5);
    assert!(pair.receiver.get(&pair.task_id).unwrap().is_complete());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_disk_fails_the_transfer_within_the_store_timeout() {
    let pair = pair(Duration::from_millis(400), 3).await;
    pair.receiver
        .faults()
        .arm(&pair.task_id, Fault::StallWrite(Duration::from_secs(3)));
    let started = Instant::now();
    let err = run(&pair).await.unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(&err, TransferError::Store(StoreError::Timeout { .. })),
        "{err}"
    );
    assert!(took < Duration::from_secs(3), "failed after {took:?}");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::DeadlineExceeded
    );
    let task = pair.receiver.get(&pair.task_id).unwrap();
    assert!(task.writer().is_none(), "the writing flag is cleared");
    assert!(!task.is_complete());
}
