//! The client's side of the Vortex/TCP protocol: a byte stream cut into frames and decoded as
//! responses (PieceContent metadata, Error, Ferry's TaskInfo). Every response that decodes
//! must encode back to a frame that decodes to the same response.
#![no_main]

use bytes::BytesMut;
use ferry_fallback_tcp::codec::{decode_header, split_frame, Response, MAX_RESPONSE_VALUE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The client reads a header on its own first: that decoder alone must hold too.
    if let Some(header) = data.first_chunk::<6>() {
        let _ = decode_header(header, MAX_RESPONSE_VALUE_LEN);
    }
    let mut stream = BytesMut::from(data);
    while let Ok(Some((header, value))) = split_frame(&mut stream, MAX_RESPONSE_VALUE_LEN) {
        let Ok(response) = Response::decode(header, &value) else {
            continue;
        };
        let mut encoded = BytesMut::new();
        response.encode(&mut encoded);
        let (header2, value2) = split_frame(&mut encoded, MAX_RESPONSE_VALUE_LEN)
            .expect("an encoded response has a valid header")
            .expect("an encoded response is one whole frame");
        assert!(encoded.is_empty(), "encoding left bytes after the frame");
        assert_eq!(header2.tag, header.tag);
        assert_eq!(
            Response::decode(header2, &value2).expect("re-decodes"),
            response
        );
    }
});
