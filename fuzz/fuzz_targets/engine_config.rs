//! The daemon's TOML configuration: the parser `ferry serve --config` uses, then validation.
//! Whatever parses must serialize and parse back to the same configuration; whatever
//! validates must be usable by the daemon as it is: the buffer pool's size must fit in memory
//! arithmetic and every timeout must be addable to "now".
#![no_main]

use ferry_engine::config::Config;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) else {
        return;
    };
    let written = toml::to_string(&config).expect("a parsed config serializes");
    let reparsed = Config::parse(&written, Path::new("fuzz.toml")).expect("re-parses");
    assert_eq!(toml::to_string(&reparsed).unwrap(), written);
    let valid = config.validate().is_ok();
    assert_eq!(reparsed.validate().is_ok(), valid);
    if !valid {
        return;
    }
    // What the daemon derives from a validated config (daemon.rs, io/pool.rs, rdma.rs).
    let slot_bytes = config.pool.slot_mib.checked_mul(MIB).expect("slot size");
    let slots = config.pool.size_mib / config.pool.slot_mib;
    assert!(
        usize::try_from(slot_bytes)
            .ok()
            .zip(usize::try_from(slots).ok())
            .and_then(|(slot, count)| slot.checked_mul(count))
            .is_some(),
        "pool of {} MiB overflows the pool's size arithmetic",
        config.pool.size_mib
    );
    let now = Instant::now();
    for secs in [
        config.transfer.piece_timeout_secs,
        config.transfer.io_timeout_secs,
        config.store.io_timeout_secs,
        config.transfer.connect_timeout_secs,
        config.server.idle_timeout_secs,
        config.server.write_timeout_secs,
        config.drain_timeout_secs,
    ] {
        assert!(
            now.checked_add(Duration::from_secs(secs)).is_some(),
            "timeout of {secs} s cannot be added to an Instant"
        );
    }
    assert!(config.rdma.chunk_kib.checked_mul(1024).is_some());
});
