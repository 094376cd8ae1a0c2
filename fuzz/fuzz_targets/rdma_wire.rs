//! The RDMA control channel: a byte stream read message by message with the same
//! `read_message` the daemon uses (frame header, size limit, then the value decoder), and the
//! value decoder on its own (first byte: the tag). Every message that decodes must encode to
//! a frame that reads back as the same message; all but a Vortex error (whose code is dropped
//! and whose text is decoded lossily) must encode to the very same value bytes.
#![no_main]

use ferry_rdma::wire::{read_message, Message};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
}

fn check_roundtrip(message: &Message, value: Option<&[u8]>) {
    let frame = message.encode();
    assert_eq!(frame[1], message.tag());
    assert_eq!(
        u32::from_be_bytes(frame[2..6].try_into().unwrap()) as usize,
        frame.len() - 6
    );
    let again = Message::decode(frame[1], &frame[6..]).expect("an encoded message decodes");
    assert_eq!(&again, message);
    if let Some(value) = value {
        if !matches!(message, Message::Refused { .. }) {
            assert_eq!(&frame[6..], value, "encoding is not canonical");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&tag, value)) = data.split_first() {
        if let Ok(message) = Message::decode(tag, value) {
            check_roundtrip(&message, Some(value));
        }
    }
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let mut stream = data;
            // Reading from a slice never waits; the end of it is an error that ends the loop.
            while let Ok(message) = read_message(&mut stream, Duration::from_secs(5)).await {
                check_roundtrip(&message, None);
            }
        })
    });
});
