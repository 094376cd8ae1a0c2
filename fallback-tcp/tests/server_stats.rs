//! The server's counters, driven by a real server and a real client over loopback.

use ferry_fallback_tcp::{
    ClientConfig, Connection, PieceMetadata, PieceProvider, ProviderError, ServedPiece, Server,
    ServerConfig, ServerStats, ServerStatsSnapshot, TaskInfo,
};
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TASK: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const PIECE: u64 = 64 * 1024;

/// Two pieces of one task, from a temporary file.
struct TwoPieces {
    file: Arc<std::fs::File>,
    _dir: tempfile::TempDir,
}

impl TwoPieces {
    fn new() -> TwoPieces {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("content");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; 2 * PIECE as usize]).unwrap();
        TwoPieces {
            file: Arc::new(std::fs::File::open(&path).unwrap()),
            _dir: dir,
        }
    }
}

impl PieceProvider for TwoPieces {
    fn piece(&self, task_id: &str, number: u32) -> Result<ServedPiece, ProviderError> {
        if task_id != TASK || number > 1 {
            return Err(ProviderError::NotFound(format!("no piece {number}")));
        }
        Ok(ServedPiece {
            metadata: PieceMetadata {
                number,
                offset: u64::from(number) * PIECE,
                length: PIECE,
                digest: "crc32:0".into(),
                parent_id: "test".into(),
                traffic_type: 1,
                cost: Duration::ZERO,
                created_at: chrono::Utc::now().naive_utc(),
            },
            file: Arc::clone(&self.file),
            file_offset: u64::from(number) * PIECE,
        })
    }

    fn task_info(&self, _task_id: &str) -> Option<TaskInfo> {
        None
    }
}

async fn wait_for(stats: &ServerStats, what: &str, ok: impl Fn(&ServerStatsSnapshot) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(&stats.snapshot()) {
        assert!(
            Instant::now() < deadline,
            "{what}: stats stuck at {:?}",
            stats.snapshot()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn stats_count_connections_bytes_pieces_and_bad_frames() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config = ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    };
    let server = Server::new(listener, Arc::new(TwoPieces::new()), config);
    let stats = server.stats();
    let running = tokio::spawn(server.run());
    assert_eq!(stats.snapshot(), ServerStatsSnapshot::default());

    // Two whole pieces, one refused request and one more piece, all on one connection.
    let mut client = Connection::connect(addr, ClientConfig::default())
        .await
        .unwrap();
    let mut buf = vec![0u8; PIECE as usize];
    for number in 0..2 {
        client
            .fetch_piece(TASK, number, PIECE, &mut [&mut buf[..]])
            .await
            .unwrap();
    }
    assert!(client
        .fetch_piece(TASK, 9, PIECE, &mut [&mut buf[..]])
        .await
        .is_err());
    // An error answer leaves the connection usable: the stock client keeps connections in
    // a pool and sends its next request on the same one.
    client
        .fetch_piece(TASK, 1, PIECE, &mut [&mut buf[..]])
        .await
        .unwrap();
    let now = stats.snapshot();
    assert_eq!(now.connections_open, 1);
    assert_eq!(now.connections_accepted, 1);
    assert_eq!(now.pieces_served, 3);
    assert_eq!(now.content_bytes_sent, 3 * PIECE);

    // A second connection fills the limit; a third is refused at accept.
    let second = TcpStream::connect(addr).await.unwrap();
    wait_for(&stats, "second open", |s| s.connections_open == 2).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(third.read(&mut byte).await.unwrap(), 0, "closed at once");
    wait_for(&stats, "third rejected", |s| s.connections_rejected == 1).await;

    // An oversized frame closes only the second connection, and counts as a bad frame.
    let mut second = second;
    second
        .write_all(&[0, 0, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let _ = second.read(&mut byte).await;
    wait_for(&stats, "bad frame", |s| s.bad_frames == 1).await;

    drop(client);
    drop(second);
    drop(third);
    wait_for(&stats, "all closed", |s| s.connections_open == 0).await;
    let end = stats.snapshot();
    assert_eq!(end.connections_accepted, 2);
    assert_eq!(end.connections_rejected, 1);
    assert_eq!(end.pieces_served, 3);
    running.abort();
}
