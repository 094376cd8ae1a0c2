//! CRC-32/ISO-HDLC (Dragonfly's `crc32:` piece digest) throughput: crc32fast against
//! crc-fast, one-shot and streamed over 4 MiB slots the way a piece buffer is hashed.

use crc_fast::{CrcAlgorithm, Digest};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// Deterministic pseudo-random bytes (xorshift64*), so every run hashes the same data.
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        out.extend_from_slice(&seed.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn crc_fast_hash(bytes: &[u8]) -> u32 {
    crc_fast::crc32_iso_hdlc(bytes)
}

fn crc32(c: &mut Criterion) {
    // Both must give the digest Dragonfly writes, on every length and alignment.
    for (i, len) in [0usize, 1, 3, 15, 16, 63, 64, 255, 4096, 65_537, 1 << 20]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(len + 7, i as u64 + 1);
        for start in 0..8.min(data.len() + 1) {
            let slice = &data[start..start + len.min(data.len() - start)];
            assert_eq!(crc32fast::hash(slice), crc_fast_hash(slice), "len {len}");
        }
    }
    assert_eq!(crc_fast_hash(b"123456789"), 0xCBF4_3926);
    eprintln!(
        "crc-fast uses {}",
        crc_fast::get_calculator_target(CrcAlgorithm::Crc32IsoHdlc)
    );

    let mut group = c.benchmark_group("crc32");
    for (name, len) in [("4KiB", 4 << 10), ("1MiB", 1 << 20), ("4MiB", 4 << 20)] {
        let data = random_bytes(len, 42);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::new("crc32fast", name), &data, |b, d| {
            b.iter(|| crc32fast::hash(black_box(d)))
        });
        group.bench_with_input(BenchmarkId::new("crc-fast", name), &data, |b, d| {
            b.iter(|| crc_fast_hash(black_box(d)))
        });
    }
    // A 16 MiB piece hashed slot by slot (4 MiB), as PieceBuffer::crc32 does.
    let piece = random_bytes(16 << 20, 7);
    group.throughput(Throughput::Bytes(piece.len() as u64));
    group.bench_function("crc32fast/16MiB-in-4MiB-slots", |b| {
        b.iter(|| {
            let mut hasher = crc32fast::Hasher::new();
            piece.chunks(4 << 20).for_each(|slot| hasher.update(slot));
            hasher.finalize()
        })
    });
    group.bench_function("crc-fast/16MiB-in-4MiB-slots", |b| {
        b.iter(|| {
            let mut digest = Digest::new(CrcAlgorithm::Crc32IsoHdlc);
            piece.chunks(4 << 20).for_each(|slot| digest.update(slot));
            digest.finalize() as u32
        })
    });
    group.finish();
}

criterion_group!(benches, crc32);
criterion_main!(benches);
