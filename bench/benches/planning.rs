//! Piece planning: cutting a task into pieces and running every piece through the RDMA
//! credit protocol, 10 000 pieces spread over 8 sources: the sender's write plan over the
//! granted slots, and the receiver's window (open, one immediate per chunk, done, close).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_engine::geometry::Geometry;
use ferry_rdma::credit::{chunk_count, plan_writes, Progress, ReceiveWindow, SlotCredit};
use std::hint::black_box;

const PIECES: u64 = 10_000;
const SOURCES: usize = 8;
const PIECE: u64 = 4 << 20;
const SLOT: u32 = 4 << 20;
const CHUNK: u32 = 1 << 20;

/// Runs every piece of `geometry` through one window per source; returns the chunk count.
fn plan_transfer(geometry: &Geometry, window: usize) -> u64 {
    let mut windows: Vec<ReceiveWindow> =
        (0..SOURCES).map(|_| ReceiveWindow::new(window)).collect();
    let mut chunks_total = 0;
    for piece in geometry.pieces() {
        let window = &mut windows[piece.number as usize % SOURCES];
        let slots: Vec<SlotCredit> = (0..piece.length.div_ceil(u64::from(SLOT)))
            .map(|i| SlotCredit {
                addr: 0x7f00_0000_0000 + i * u64::from(SLOT),
                rkey: i as u32,
                len: SLOT,
            })
            .collect();
        let lens: Vec<u32> = slots.iter().map(|s| s.len).collect();
        let request = window
            .open(chunk_count(piece.length, CHUNK, &lens))
            .unwrap();
        let writes = plan_writes(request, piece.length, CHUNK, &slots).unwrap();
        for write in &writes {
            assert_eq!(
                window.on_immediate(write.immediate).unwrap(),
                Progress::Pending
            );
        }
        assert_eq!(
            window.on_done(request).unwrap(),
            Progress::Complete(request)
        );
        window.close(request);
        chunks_total += writes.len() as u64;
    }
    chunks_total
}

fn planning(c: &mut Criterion) {
    let mut group = c.benchmark_group("planning");
    group.throughput(Throughput::Elements(PIECES));
    group.bench_function("geometry/10000_pieces", |b| {
        b.iter(|| {
            let geometry = Geometry::new(black_box(PIECES * PIECE - 123), PIECE).unwrap();
            geometry.pieces().map(|p| p.length).sum::<u64>()
        })
    });
    let geometry = Geometry::new(PIECES * PIECE - 123, PIECE).unwrap();
    assert_eq!(u64::from(geometry.piece_count()), PIECES);
    group.bench_function("rdma_credits/10000_pieces_8_sources", |b| {
        b.iter(|| plan_transfer(black_box(&geometry), 2))
    });
    group.finish();
}

criterion_group!(benches, planning);
criterion_main!(benches);
