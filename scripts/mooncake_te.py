#!/usr/bin/env python3
"""Mooncake Transfer Engine memory-to-memory write benchmark (for the soft-RoCE VM).

One process holds two Mooncake TransferEngine instances: a target on TARGET_DEV (default rxe0,
10.77.0.1) that registers the destination buffer, and an initiator on INITIATOR_DEV (default
rxe1, 10.77.0.2) that registers the source buffer. Metadata mode is P2PHANDSHAKE (no etcd):
the initiator opens the segment "<target addr>:<target rpc port>". Each round writes SIZE
bytes as SIZE/BLOCK write requests, one request per batch (transfer_submit_write), keeping
IN_FLIGHT of them outstanding and polling each with transfer_check_status plus short sleeps
(the blocking status calls spin a core, which hurts on 2 vCPUs). One untimed warm-up write
sets the connection up first. After the last round the destination is compared with the
source byte for byte.

Prints one JSON line per round ({"round", "bytes", "seconds", "mb_per_s"}, MB = 10^6 bytes)
and a summary line with the median. Set MC_* variables (MC_GID_INDEX, MC_WORKERS_PER_CTX,
MC_TRANSFER_TIMEOUT, ...) in the environment before starting it.
"""
import argparse
import ctypes
import json
import mmap
import os
import statistics
import sys
import time

MIB = 1 << 20


def log(msg):
    print(f"mooncake_te: {msg}", file=sys.stderr, flush=True)


def addr_of(buf):
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256, help="bytes written per round (MiB)")
    p.add_argument("--block-mib", type=int, default=4, help="bytes per write request (MiB)")
    p.add_argument("--in-flight", type=int, default=4, help="requests outstanding at once")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--protocol", default="rdma", help="rdma (default) or tcp (for a dry run)")
    p.add_argument("--target-dev", default=os.environ.get("FERRY_RXE_DEV0", "rxe0"))
    p.add_argument("--target-addr", default=os.environ.get("FERRY_RXE_ADDR0", "10.77.0.1"))
    p.add_argument("--initiator-dev", default=os.environ.get("FERRY_RXE_DEV1", "rxe1"))
    p.add_argument("--initiator-addr", default=os.environ.get("FERRY_RXE_ADDR1", "10.77.0.2"))
    p.add_argument("--poll-sleep-us", type=float, default=200.0,
                   help="sleep between polls when nothing completed (microseconds)")
    p.add_argument("--no-verify", action="store_true", help="skip the final byte comparison")
    a = p.parse_args()
    size, block = a.size_mib * MIB, a.block_mib * MIB
    if block <= 0 or size % block or a.in_flight < 1 or a.rounds < 1:
        p.error("size must be a positive multiple of block; in-flight and rounds >= 1")

    t0 = time.monotonic()
    from mooncake.engine import TransferEngine  # slow under emulation: before any timing
    log(f"import took {time.monotonic() - t0:.1f}s")

    dev_t = a.target_dev if a.protocol == "rdma" else ""
    dev_i = a.initiator_dev if a.protocol == "rdma" else ""
    target, initiator = TransferEngine(), TransferEngine()
    rc = target.initialize(a.target_addr, "P2PHANDSHAKE", a.protocol, dev_t)
    if rc != 0:
        sys.exit(f"mooncake_te: target initialize failed: {rc}")
    rc = initiator.initialize(a.initiator_addr, "P2PHANDSHAKE", a.protocol, dev_i)
    if rc != 0:
        sys.exit(f"mooncake_te: initiator initialize failed: {rc}")
    segment = f"{a.target_addr}:{target.get_rpc_port()}"
    log(f"engines up after {time.monotonic() - t0:.1f}s; target segment {segment}")

    # Anonymous mappings (page aligned), touched before registration.
    src, dst = mmap.mmap(-1, size), mmap.mmap(-1, size)
    pattern = bytes(range(251)) * (MIB // 251 + 2)  # period 251: offsets are told apart
    for off in range(0, size, MIB):
        src[off:off + MIB] = pattern[(off % 251):(off % 251) + MIB]
    zeros = bytes(MIB)
    for off in range(0, size, MIB):
        dst[off:off + MIB] = zeros
    src_addr, dst_addr = addr_of(src), addr_of(dst)
    if target.register_memory(dst_addr, size) != 0:
        sys.exit("mooncake_te: target register_memory failed")
    if initiator.register_memory(src_addr, size) != 0:
        sys.exit("mooncake_te: initiator register_memory failed")

    sleep_s = a.poll_sleep_us / 1e6

    def submit(off):
        bid = initiator.transfer_submit_write(segment, src_addr + off, dst_addr + off, block)
        if bid < 0:
            sys.exit(f"mooncake_te: transfer_submit_write failed at offset {off}: {bid}")
        return bid

    def poll(pending):  # pending: list of (batch id, offset); drops the finished ones
        done = False
        for i in range(len(pending) - 1, -1, -1):
            s = initiator.transfer_check_status(pending[i][0])
            if s == 1:  # completed (the binding frees the batch)
                pending.pop(i)
                done = True
            elif s < 0:
                sys.exit(f"mooncake_te: write at offset {pending[i][1]} failed: status {s}")
        if not done:
            time.sleep(sleep_s)

    t = time.monotonic()
    w = [(submit(0), 0)]
    while w:
        poll(w)
    log(f"warm-up write of {a.block_mib} MiB took {time.monotonic() - t:.2f}s")

    rates = []
    for r in range(1, a.rounds + 1):
        offs = list(range(0, size, block))
        pending = []
        t = time.monotonic()
        while offs or pending:
            while offs and len(pending) < a.in_flight:
                off = offs.pop(0)
                pending.append((submit(off), off))
            poll(pending)
        dt = time.monotonic() - t
        mbps = size / dt / 1e6
        rates.append(mbps)
        print(json.dumps({"round": r, "bytes": size, "block": block, "in_flight": a.in_flight,
                          "seconds": round(dt, 3), "mb_per_s": round(mbps, 2)}), flush=True)

    verified = None
    if not a.no_verify:
        verified = src[:] == dst[:]
        log(f"destination {'matches' if verified else 'DIFFERS FROM'} the source")
    print(json.dumps({"summary": "mooncake-te", "protocol": a.protocol, "bytes": size,
                      "block": block, "in_flight": a.in_flight, "rounds": a.rounds,
                      "median_mb_per_s": round(statistics.median(rates), 2),
                      "mb_per_s": [round(x, 2) for x in rates], "verified": verified}),
          flush=True)
    # The engines' threads sometimes hang on teardown; exit without running destructors.
    sys.stdout.flush()
    os._exit(0 if verified is not False else 1)


if __name__ == "__main__":
    main()
