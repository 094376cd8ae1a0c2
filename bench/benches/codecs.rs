//! The wire codecs: Vortex frames (requests and piece metadata) and the RDMA handshake and
//! control messages, each encoded and decoded.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use ferry_fallback_tcp::codec::{
    split_frame, Request, Response, MAX_REQUEST_VALUE_LEN, MAX_RESPONSE_VALUE_LEN,
};
use ferry_fallback_tcp::PieceMetadata;
use ferry_rdma::credit::SlotCredit;
use ferry_rdma::wire::Message;
use ferry_rdma::Endpoint;
use std::hint::black_box;
use std::time::Duration;

const TASK: &str = "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f";

fn vortex(c: &mut Criterion) {
    let request = Request::DownloadPiece {
        task_id: TASK.into(),
        number: 1234,
    };
    let response = Response::PieceContent(PieceMetadata {
        number: 1234,
        offset: 1234 * (4 << 20),
        length: 4 << 20,
        digest: "crc32:3421780262".into(),
        parent_id: "10.0.0.5:4100".into(),
        traffic_type: 0,
        cost: Duration::from_secs(1),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0)
            .unwrap()
            .naive_utc(),
    });
    let mut group = c.benchmark_group("vortex");
    let mut out = BytesMut::with_capacity(256);
    group.bench_function("download_piece/encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&request).encode(&mut out);
        })
    });
    let mut frame = BytesMut::new();
    request.encode(&mut frame);
    group.bench_function("download_piece/decode", |b| {
        b.iter(|| {
            let mut buf = black_box(&frame).clone();
            let (header, value) = split_frame(&mut buf, MAX_REQUEST_VALUE_LEN)
                .unwrap()
                .unwrap();
            Request::decode(header, &value).unwrap()
        })
    });
    group.bench_function("piece_content/encode", |b| {
        b.iter(|| {
            out.clear();
            black_box(&response).encode(&mut out);
        })
    });
    let mut frame = BytesMut::new();
    response.encode(&mut frame);
    group.bench_function("piece_content/decode", |b| {
        b.iter(|| {
            let mut buf = black_box(&frame).clone();
            let (header, value) = split_frame(&mut buf, MAX_RESPONSE_VALUE_LEN)
                .unwrap()
                .unwrap();
            Response::decode(header, &value).unwrap()
        })
    });
    group.finish();
}

fn rdma(c: &mut Criterion) {
    let endpoint = Endpoint {
        qp_number: 0x11,
        packet_sequence: 0x2233,
        gid: "::ffff:10.77.0.1".parse().unwrap(),
        lid: 0,
        mtu: 1024,
        link_layer: ferry_rdma::LinkLayer::Ethernet,
        subnet_prefix: 0xfe80 << 48,
    };
    let fetch = Message::Fetch {
        request: 7,
        task_id: TASK.into(),
        number: 1234,
        chunk_size: 1 << 20,
        // A 64 MiB piece in 4 MiB slots: the most one fetch grants.
        credits: (0..16)
            .map(|i| SlotCredit {
                addr: 0x7f00_0000_0000 + i * (4 << 20),
                rkey: 0x100 + i as u32,
                len: 4 << 20,
            })
            .collect(),
        range: None,
    };
    let done = Message::Done {
        request: 7,
        number: 1234,
        length: 64 << 20,
        digest: "crc32:3421780262".into(),
    };
    let mut group = c.benchmark_group("rdma");
    group.bench_function("endpoint/encode", |b| {
        b.iter(|| black_box(&endpoint).encode())
    });
    let bytes = endpoint.encode();
    group.bench_function("endpoint/decode", |b| {
        b.iter(|| Endpoint::decode(black_box(&bytes)).unwrap())
    });
    for (name, message) in [("fetch_16_credits", &fetch), ("done", &done)] {
        group.bench_function(format!("{name}/encode"), |b| {
            b.iter(|| black_box(message).encode())
        });
        let frame = message.encode();
        group.bench_function(format!("{name}/decode"), |b| {
            b.iter(|| Message::decode(frame[1], black_box(&frame[6..])).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, vortex, rdma);
criterion_main!(benches);
