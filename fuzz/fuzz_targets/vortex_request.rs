//! The server's side of the Vortex/TCP protocol: a byte stream cut into frames and decoded as
//! requests (DownloadPiece, Ferry's StatTask, Close, the RDMA upgrade). Every request that
//! decodes must encode back to a frame that decodes to the same request, and (but for Close,
//! whose value is ignored) to the very same value bytes.
#![no_main]

use bytes::BytesMut;
use ferry_fallback_tcp::codec::{split_frame, Request, MAX_REQUEST_VALUE_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = BytesMut::from(data);
    while let Ok(Some((header, value))) = split_frame(&mut stream, MAX_REQUEST_VALUE_LEN) {
        let Ok(request) = Request::decode(header, &value) else {
            continue;
        };
        let mut encoded = BytesMut::new();
        request.encode(&mut encoded);
        let (header2, value2) = split_frame(&mut encoded, MAX_REQUEST_VALUE_LEN)
            .expect("an encoded request has a valid header")
            .expect("an encoded request is one whole frame");
        assert!(encoded.is_empty(), "encoding left bytes after the frame");
        assert_eq!(header2.tag, header.tag);
        assert_eq!(
            Request::decode(header2, &value2).expect("re-decodes"),
            request
        );
        if request != Request::Close {
            assert_eq!(value2, value, "encoding is not canonical");
        }
    }
});
