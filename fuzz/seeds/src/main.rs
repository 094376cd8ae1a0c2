//! Writes the seed corpus of every fuzz target from real encoded frames:
//! `cargo run --manifest-path fuzz/Cargo.toml -p ferry-fuzz-seeds -- fuzz/corpus`.

use bytes::BytesMut;
use ferry_engine::config::Config;
use ferry_fallback_tcp::codec::{ErrorCode, Request, Response, TaskInfo};
use ferry_fallback_tcp::PieceMetadata;
use ferry_rdma::credit::SlotCredit;
use ferry_rdma::wire::Message;
use ferry_rdma::Endpoint;
use std::path::Path;
use std::time::Duration;

const TASK: &str = "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f";

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = root.join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

fn frames(items: &[&dyn Fn(&mut BytesMut)]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for item in items {
        item(&mut out);
    }
    // The packet id is random in Vortex's encoder: fix it so the seeds are reproducible.
    let mut at = 0;
    while at + 6 <= out.len() {
        out[at] = 0;
        let len = u32::from_be_bytes(out[at + 2..at + 6].try_into().unwrap()) as usize;
        at += 6 + len;
    }
    out.to_vec()
}

fn main() {
    let root = std::env::args()
        .nth(1)
        .expect("usage: ferry-fuzz-seeds CORPUS_DIR");
    let root = Path::new(&root);

    let download = Request::DownloadPiece {
        task_id: TASK.into(),
        number: 3,
    };
    let stat = Request::StatTask {
        task_id: TASK.into(),
    };
    let endpoint = Endpoint {
        qp_number: 0x11,
        packet_sequence: 0x2233,
        gid: "::ffff:10.77.0.1".parse().unwrap(),
        lid: 0,
        mtu: 1024,
        link_layer: ferry_rdma::LinkLayer::Ethernet,
        subnet_prefix: 0xfe80 << 48,
    };
    let upgrade = Request::Upgrade {
        tag: ferry_rdma::wire::TAG_CONNECT,
        value: Message::Connect { endpoint }.encode_value(),
    };
    write(
        root,
        "vortex_request",
        "download_piece",
        &frames(&[&|o| download.encode(o)]),
    );
    write(
        root,
        "vortex_request",
        "stat_task",
        &frames(&[&|o| stat.encode(o)]),
    );
    write(
        root,
        "vortex_request",
        "rdma_upgrade",
        &frames(&[&|o| upgrade.encode(o)]),
    );
    write(
        root,
        "vortex_request",
        "session",
        &frames(&[&|o| stat.encode(o), &|o| download.encode(o), &|o| {
            Request::Close.encode(o)
        }]),
    );

    let content = Response::PieceContent(PieceMetadata {
        number: 3,
        offset: 3 * (4 << 20),
        length: 4 << 20,
        digest: "crc32:3421780262".into(),
        parent_id: "127.0.0.1:4100".into(),
        traffic_type: 0,
        cost: Duration::from_secs(1),
        created_at: chrono::DateTime::from_timestamp(1_700_000_000, 0)
            .unwrap()
            .naive_utc(),
    });
    let info = Response::TaskInfo(TaskInfo {
        content_length: 1 << 30,
        piece_length: 4 << 20,
        pieces_held: 256,
        complete: true,
        content_sha256: Some([0x5A; 32]),
    });
    let error = Response::Error {
        code: ErrorCode::NotFound,
        message: format!("piece 3 of task {TASK} is not held"),
    };
    write(
        root,
        "vortex_response",
        "piece_content",
        &frames(&[&|o| content.encode(o)]),
    );
    write(
        root,
        "vortex_response",
        "task_info",
        &frames(&[&|o| info.encode(o)]),
    );
    write(
        root,
        "vortex_response",
        "error",
        &frames(&[&|o| error.encode(o)]),
    );

    write(root, "rdma_handshake", "endpoint", &endpoint.encode());
    let v6 = Endpoint {
        gid: "fe80::1:2ff:fe03:405".parse().unwrap(),
        lid: 7,
        mtu: 4096,
        link_layer: ferry_rdma::LinkLayer::InfiniBand,
        subnet_prefix: 0xfe80 << 48,
        ..endpoint
    };
    write(root, "rdma_handshake", "endpoint_ib", &v6.encode());

    let messages = [
        ("connect", Message::Connect { endpoint }),
        ("accept", Message::Accept { endpoint: v6 }),
        (
            "fetch",
            Message::Fetch {
                request: 7,
                task_id: TASK.into(),
                number: 3,
                chunk_size: 1 << 20,
                credits: vec![
                    SlotCredit {
                        addr: 0x7f00_0000_0000,
                        rkey: 0x1234,
                        len: 4 << 20,
                    },
                    SlotCredit {
                        addr: 0x7f00_0040_0000,
                        rkey: 0x1235,
                        len: 4 << 20,
                    },
                ],
                range: None,
            },
        ),
        (
            "fetch_range",
            Message::Fetch {
                request: 8,
                task_id: TASK.into(),
                number: 3,
                chunk_size: 1 << 20,
                credits: vec![SlotCredit {
                    addr: 0x7f00_0080_0000,
                    rkey: 0x1236,
                    len: 4 << 20,
                }],
                range: Some(ferry_rdma::wire::ByteRange {
                    offset: 4 << 20,
                    length: 4 << 20,
                }),
            },
        ),
        (
            "done",
            Message::Done {
                request: 7,
                number: 3,
                length: 8 << 20,
                digest: "crc32:3421780262".into(),
            },
        ),
        (
            "failed",
            Message::Failed {
                request: 7,
                not_held: true,
                message: "piece 3 is not held".into(),
            },
        ),
        (
            "refused",
            Message::Refused {
                message: "unknown tag 0xf2".into(),
            },
        ),
    ];
    let mut stream = Vec::new();
    for (name, message) in &messages {
        // The target reads its input twice: as one tag byte and a value, and as a stream.
        let mut tagged = vec![message.tag()];
        tagged.extend_from_slice(&message.encode_value());
        write(root, "rdma_wire", name, &tagged);
        stream.extend_from_slice(&message.encode());
    }
    write(root, "rdma_wire", "stream", &stream);

    let example = include_str!("../../../engine/ferry.example.toml");
    write(root, "engine_config", "example", example.as_bytes());
    write(
        root,
        "engine_config",
        "defaults",
        toml::to_string(&Config::default()).unwrap().as_bytes(),
    );
    write(
        root,
        "engine_config",
        "small",
        b"data_dir = \"/data/ferry\"\nlisten = \"127.0.0.1:4100\"\nadvertise = \"10.0.0.5:4100\"\n\
          output_dirs = [\"/models\"]\n[pool]\nslot_mib = 8\nsize_mib = 1024\n[io]\nbackend = \"sync\"\n\
          [rdma]\ndevice = \"rxe0\"\nport = 1\ngid_index = 3\nchunk_kib = 256\n",
    );
}
