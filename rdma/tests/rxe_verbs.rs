//! Real verbs between two soft-RoCE devices. These need RDMA devices, so they are ignored in a
//! plain `cargo test`; `scripts/test.sh` runs them inside the soft-RoCE VM
//! (`scripts/rxe-vm.sh`), where `FERRY_RXE_DEV0`/`FERRY_RXE_DEV1` name two devices that reach
//! each other.

use ferry_rdma::{
    choose, discover, Connection, ConnectionConfig, RdmaContext, RdmaError, RegisteredRegion,
    SelectionRequest, WcOpcode, WcStatus,
};
use std::sync::Arc;

#[test]
fn discovery_never_panics_without_rdma() {
    match discover() {
        Ok(devices) => assert!(!devices.is_empty()),
        Err(err) => assert!(matches!(err, RdmaError::Unavailable(_)), "{err}"),
    }
}

fn device(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| panic!("{var} is not set: run inside scripts/rxe-vm.sh"))
}

fn open(name: &str) -> Arc<RdmaContext> {
    let devices = discover().expect("RDMA devices");
    let selection = choose(
        &devices,
        &SelectionRequest {
            device: Some(name.into()),
            ..Default::default()
        },
    )
    .expect("a RoCE v2 GID");
    assert!(
        selection.gid.ipv4().is_some(),
        "the default GID is an IPv4 RoCE v2 one: {selection:?}"
    );
    RdmaContext::open(selection).expect("open device")
}

/// A heap buffer registered with a device. The region is declared first so it is
/// deregistered before the memory is freed.
struct Buffer {
    region: Arc<RegisteredRegion>,
    bytes: Vec<u8>,
}

fn buffer(
    context: &Arc<RdmaContext>,
    len: usize,
    fill: impl Fn(usize) -> u8,
    remote_write: bool,
) -> Buffer {
    let mut bytes: Vec<u8> = (0..len).map(fill).collect();
    // SAFETY: the Vec is never resized, and `Buffer` drops the region before the Vec.
    let region =
        unsafe { context.register(bytes.as_mut_ptr(), len, remote_write) }.expect("register");
    Buffer {
        region: Arc::new(region),
        bytes,
    }
}

/// Queue pairs whose receive queue is left to the test (bufferless receives that RDMA WRITEs
/// with immediate consume), not the connection's own control messages.
fn immediates() -> ConnectionConfig {
    ConnectionConfig {
        control_receives: 0,
        receive_depth: 256,
        ..ConnectionConfig::default()
    }
}

async fn connected_pair(
    config: ConnectionConfig,
) -> (Arc<RdmaContext>, Connection, Arc<RdmaContext>, Connection) {
    let (a, b) = (
        open(&device("FERRY_RXE_DEV0")),
        open(&device("FERRY_RXE_DEV1")),
    );
    let (qa, qb) = (
        Connection::new(&a, config.clone()).unwrap(),
        Connection::new(&b, config).unwrap(),
    );
    qa.connect(&qb.local_endpoint()).unwrap();
    qb.connect(&qa.local_endpoint()).unwrap();
    (a, qa, b, qb)
}

#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn write_with_immediate_lands_every_chunk() {
    const CHUNK: usize = 256 * 1024;
    const CHUNKS: usize = 16;
    let (a, sender, b, receiver) = connected_pair(immediates()).await;
    let source = buffer(&a, CHUNK * CHUNKS, |i| (i * 7 % 251) as u8, false);
    let target = buffer(&b, CHUNK * CHUNKS, |_| 0xee, true);
    receiver.post_receives(1000, CHUNKS as u32).unwrap();
    for chunk in 0..CHUNKS {
        let offset = (chunk * CHUNK) as u64;
        {
            sender
                .post_write_with_immediate(
                    chunk as u64,
                    &source.region,
                    source.region.base() + offset,
                    CHUNK as u32,
                    target.region.rkey(),
                    target.region.base() + offset,
                    0xC000 | chunk as u32,
                )
                .unwrap();
        }
    }
    let mut sent = 0;
    while sent < CHUNKS {
        for completion in sender.completions().await.unwrap() {
            completion.ok().unwrap();
            sent += 1;
        }
    }
    let mut immediates = Vec::new();
    while immediates.len() < CHUNKS {
        for completion in receiver.completions().await.unwrap() {
            completion.ok().unwrap();
            assert_eq!(completion.byte_len as usize, CHUNK);
            immediates.push(completion.immediate.expect("write with immediate"));
        }
    }
    immediates.sort_unstable();
    assert_eq!(
        immediates,
        (0..CHUNKS as u32).map(|c| 0xC000 | c).collect::<Vec<_>>()
    );
    assert!(target.bytes == source.bytes, "every byte landed");
}

#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn a_write_outside_the_registered_region_is_a_remote_access_error() {
    let (a, sender, b, receiver) = connected_pair(ConnectionConfig {
        retry_count: 1,
        ..immediates()
    })
    .await;
    let source = buffer(&a, 8192, |_| 1, false);
    let target = buffer(&b, 4096, |_| 2, true);
    receiver.post_receives(0, 4).unwrap();
    {
        // 8 KiB into a 4 KiB region: the responder must refuse it.
        sender
            .post_write_with_immediate(
                7,
                &source.region,
                source.region.base(),
                8192,
                target.region.rkey(),
                target.region.base(),
                1,
            )
            .unwrap();
    }
    let completion = sender.completions().await.unwrap().remove(0);
    assert_eq!(completion.wr_id, 7);
    assert_eq!(completion.status, WcStatus::RemoteAccess, "{completion:?}");
    assert!(target.bytes.iter().all(|&b| b == 2), "nothing was written");
}

/// Waits (at most 20 s) for the completions of every id in `wr_ids`, returned in that order;
/// other completions met on the way must be successes.
async fn completions_of(connection: &Connection, wr_ids: &[u64]) -> Vec<ferry_rdma::Completion> {
    let wait = async {
        let mut found: Vec<ferry_rdma::Completion> = Vec::new();
        while found.len() < wr_ids.len() {
            for completion in connection.completions().await.unwrap() {
                if wr_ids.contains(&completion.wr_id) {
                    found.push(completion);
                } else {
                    completion.ok().unwrap();
                }
            }
        }
        found.sort_by_key(|c| wr_ids.iter().position(|&id| id == c.wr_id));
        found
    };
    tokio::time::timeout(std::time::Duration::from_secs(20), wait)
        .await
        .unwrap_or_else(|_| panic!("no completions for {wr_ids:?}"))
}

async fn completion_of(connection: &Connection, wr_id: u64) -> ferry_rdma::Completion {
    completions_of(connection, &[wr_id]).await.remove(0)
}

#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn a_memory_window_lets_writes_in_only_until_it_is_invalidated() {
    const SLOT: u64 = 4096;
    // The region itself is not remotely writable: only the window grants access.
    let (a, sender, b, receiver) = connected_pair(ConnectionConfig {
        retry_count: 1,
        ..immediates()
    })
    .await;
    let source = buffer(&a, SLOT as usize, |_| 9, false);
    let target = buffer(&b, 2 * SLOT as usize, |_| 0, false);
    let mut window = b.alloc_window().unwrap();
    let slot = target.region.base() + SLOT;
    // SAFETY: the slot is this test's alone until the window is invalidated below.
    let rkey =
        unsafe { receiver.post_bind(1, &mut window, &target.region, slot, SLOT, true) }.unwrap();
    completion_of(&receiver, 1).await.ok().unwrap();
    receiver.post_receives(100, 4).unwrap();
    sender
        .post_write_with_immediate(
            10,
            &source.region,
            source.region.base(),
            SLOT as u32,
            rkey,
            slot,
            5,
        )
        .unwrap();
    completion_of(&sender, 10).await.ok().unwrap();
    assert!(
        target.bytes[SLOT as usize..].iter().all(|&b| b == 9),
        "the granted slot was written"
    );
    assert!(
        target.bytes[..SLOT as usize].iter().all(|&b| b == 0),
        "nothing else was"
    );
    // The credit returns: the window is invalidated, and the same rkey is refused.
    receiver.post_invalidate(2, rkey, true).unwrap();
    completion_of(&receiver, 2).await.ok().unwrap();
    let late = buffer(&a, SLOT as usize, |_| 3, false);
    sender
        .post_write_with_immediate(
            11,
            &late.region,
            late.region.base(),
            SLOT as u32,
            rkey,
            slot,
            6,
        )
        .unwrap();
    let refused = completion_of(&sender, 11).await;
    assert!(refused.status == WcStatus::RemoteAccess, "{refused:?}");
    assert!(
        target.bytes[SLOT as usize..].iter().all(|&b| b == 9),
        "the late write changed nothing"
    );
}

#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn a_window_is_bound_again_for_every_grant() {
    // As the daemon does piece after piece: one window, one connection, a fresh key and a new
    // address for every grant, each grant filled by several chunk writes.
    const GRANT: u64 = 1 << 20;
    const CHUNK: u64 = 256 << 10;
    let (a, sender, b, receiver) = connected_pair(immediates()).await;
    let source = buffer(&a, GRANT as usize, |i| (i % 241) as u8, false);
    let target = buffer(&b, 4 * GRANT as usize, |_| 0, false);
    let mut window = b.alloc_window().unwrap();
    for round in 0..4u64 {
        let at = target.region.base() + round * GRANT;
        // SAFETY: each grant's range is this test's alone until its invalidation completes.
        let rkey =
            unsafe { receiver.post_bind(20 + round, &mut window, &target.region, at, GRANT, true) }
                .unwrap();
        completion_of(&receiver, 20 + round).await.ok().unwrap();
        receiver.post_receives(200, (GRANT / CHUNK) as u32).unwrap();
        for chunk in 0..GRANT / CHUNK {
            let offset = chunk * CHUNK;
            sender
                .post_write_with_immediate(
                    30 + chunk,
                    &source.region,
                    source.region.base() + offset,
                    CHUNK as u32,
                    rkey,
                    at + offset,
                    chunk as u32,
                )
                .unwrap();
        }
        let writes: Vec<u64> = (0..GRANT / CHUNK).map(|chunk| 30 + chunk).collect();
        for completion in completions_of(&sender, &writes).await {
            completion.ok().unwrap();
        }
        receiver.post_invalidate(40 + round, rkey, true).unwrap();
        completion_of(&receiver, 40 + round).await.ok().unwrap();
        let slot = (round * GRANT) as usize;
        assert!(
            target.bytes[slot..slot + GRANT as usize] == source.bytes[..],
            "round {round}"
        );
    }
}

#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn the_pool_key_itself_grants_no_remote_write() {
    let (a, sender, b, receiver) = connected_pair(ConnectionConfig {
        retry_count: 1,
        ..immediates()
    })
    .await;
    let source = buffer(&a, 4096, |_| 1, false);
    // Registered as the daemon registers its pool: local write and window binding only.
    let target = buffer(&b, 4096, |_| 2, false);
    receiver.post_receives(0, 1).unwrap();
    sender
        .post_write_with_immediate(
            7,
            &source.region,
            source.region.base(),
            4096,
            target.region.rkey(),
            target.region.base(),
            1,
        )
        .unwrap();
    let refused = completion_of(&sender, 7).await;
    assert!(refused.status == WcStatus::RemoteAccess, "{refused:?}");
    assert!(target.bytes.iter().all(|&b| b == 2));
}

/// On soft-RoCE the port is Ethernet with LID 0: the handshake says so (queried from the port,
/// not assumed), and the address vector is a GRH from the chosen GID to the peer's, never LID
/// routing. Every queue pair starts at its own random PSN.
#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn the_handshake_carries_the_queried_port_and_roce_takes_a_grh() {
    let devices = discover().unwrap();
    let name = device("FERRY_RXE_DEV0");
    let port = &devices.iter().find(|d| d.name == name).unwrap().ports[0];
    assert_eq!(port.link_layer, ferry_rdma::LinkLayer::Ethernet, "{port:?}");
    assert_eq!(port.lid, 0, "rxe has no LID");
    assert_eq!(
        port.subnet_prefix,
        0xfe80 << 48,
        "GID 0 of a RoCE port is link-local"
    );
    let (a, qa, b, qb) = connected_pair(immediates()).await;
    let (ea, eb) = (qa.local_endpoint(), qb.local_endpoint());
    for (context, endpoint) in [(&a, ea), (&b, eb)] {
        let selection = context.selection();
        assert_eq!(endpoint.lid, 0);
        assert_eq!(endpoint.link_layer, ferry_rdma::LinkLayer::Ethernet);
        assert_eq!(endpoint.gid, selection.gid.gid);
        assert_eq!(endpoint.subnet_prefix, selection.subnet_prefix);
        // The handshake bytes carry exactly this.
        assert_eq!(
            ferry_rdma::Endpoint::decode(&endpoint.encode()).unwrap(),
            endpoint
        );
    }
    let vector = qa.address_vector(&eb).unwrap();
    let grh = vector.grh.expect("RoCE always has a GRH");
    assert_eq!(grh.dest_gid, eb.gid);
    assert_eq!(u32::from(grh.src_gid_index), a.selection().gid.index);
    assert_eq!(vector.dest_lid, 0);
    // A peer claiming InfiniBand is refused before the queue pair is touched.
    let ib = ferry_rdma::Endpoint {
        link_layer: ferry_rdma::LinkLayer::InfiniBand,
        lid: 5,
        ..eb
    };
    let err = qa.address_vector(&ib).unwrap_err();
    assert!(
        matches!(
            err,
            RdmaError::Address(ferry_rdma::AddressError::LinkLayerMismatch { .. })
        ),
        "{err}"
    );
    let third = Connection::new(&a, ConnectionConfig::default()).unwrap();
    let psns = [
        ea.packet_sequence,
        eb.packet_sequence,
        third.local_endpoint().packet_sequence,
    ];
    assert!(
        psns[0] != psns[1] && psns[1] != psns[2] && psns[0] != psns[2],
        "{psns:?}"
    );
}

/// The piece exchange's verbs, as the daemons use them: the receiver posts an unsignalled bind
/// and, right behind it, a message granting the window (no wait for the bind); the sender
/// posts unsignalled WRITEs and one signalled SEND_WITH_INVALIDATE. The receiver sees the
/// message only with every byte placed and the window already invalidated by its device; a
/// write through the same rkey afterwards is refused. Each side reaps exactly one completion
/// per direction of the exchange.
#[tokio::test]
#[ignore = "needs two RDMA devices: scripts/rxe-vm.sh runs it"]
async fn writes_then_a_send_with_invalidate_complete_a_grant_in_one_completion() {
    const GRANT: u64 = 1 << 20;
    const CHUNK: u64 = 128 << 10;
    let (a, sender, b, receiver) = connected_pair(ConnectionConfig {
        retry_count: 1,
        ..Default::default()
    })
    .await;
    let source = buffer(&a, GRANT as usize, |i| (i % 239) as u8, false);
    let target = buffer(&b, GRANT as usize, |_| 0, false);
    let mut window = b.alloc_window().unwrap();
    // SAFETY: the target is this test's alone until the window is invalidated.
    let rkey = unsafe {
        receiver.post_bind(
            1,
            &mut window,
            &target.region,
            target.region.base(),
            GRANT,
            false,
        )
    }
    .unwrap();
    let grant = [rkey.to_be_bytes(), [0xAB; 4]].concat();
    receiver.post_message(2, &grant, None).unwrap();
    completion_of(&receiver, 2).await.ok().unwrap();
    // The sender learns the rkey from the message, as a source would.
    let request = loop {
        let batch = sender.completions().await.unwrap();
        if let Some(message) = batch.into_iter().find_map(|c| c.message) {
            break message;
        }
    };
    assert_eq!(request, grant);
    let granted = u32::from_be_bytes(request[..4].try_into().unwrap());
    let before = sender.work_counts();
    for chunk in 0..GRANT / CHUNK {
        sender
            .post_write(
                10 + chunk,
                &source.region,
                source.region.base() + chunk * CHUNK,
                CHUNK as u32,
                granted,
                target.region.base() + chunk * CHUNK,
                false,
            )
            .unwrap();
    }
    sender.post_message(99, b"done", Some(granted)).unwrap();
    let sent = completion_of(&sender, 99).await;
    sent.ok().unwrap();
    let after = sender.work_counts();
    assert_eq!(after.send_requests - before.send_requests, 9);
    assert_eq!(
        after.signalled - before.signalled,
        1,
        "one signalled request per grant"
    );
    assert_eq!(
        sender.send_queue_free(),
        ferry_rdma::verbs::SEND_QUEUE_DEPTH
    );
    let answer = loop {
        let batch = receiver.completions().await.unwrap();
        if let Some(c) = batch.into_iter().find(|c| c.message.is_some()) {
            break c;
        }
    };
    assert_eq!(answer.opcode, WcOpcode::Receive);
    assert_eq!(answer.message.as_deref(), Some(&b"done"[..]));
    assert_eq!(
        answer.invalidated_rkey,
        Some(rkey),
        "the device invalidated the window"
    );
    assert!(
        target.bytes == source.bytes,
        "every chunk placed before the message"
    );
    // The window is gone: a late write through it is refused, and nothing changes.
    let late = buffer(&a, CHUNK as usize, |_| 0xEE, false);
    sender
        .post_write(
            200,
            &late.region,
            late.region.base(),
            CHUNK as u32,
            granted,
            target.region.base(),
            true,
        )
        .unwrap();
    // The refusal moves the queue pair to the error state: its posted receives flush too,
    // possibly first.
    let refused = loop {
        let batch = sender.completions().await.unwrap();
        if let Some(c) = batch.into_iter().find(|c| c.wr_id == 200) {
            break c;
        }
    };
    assert_eq!(refused.status, WcStatus::RemoteAccess, "{refused:?}");
    assert!(
        target.bytes == source.bytes,
        "the late write changed nothing"
    );
}
