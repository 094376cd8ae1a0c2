//! The fallback: positional writes on tokio's blocking threads.

use super::PieceBuffer;
use super::WriteRequest;
use std::io;
use std::os::unix::fs::FileExt;

pub struct SyncIo;

impl SyncIo {
    pub async fn write(&self, request: WriteRequest) -> (PieceBuffer, io::Result<()>) {
        tokio::task::spawn_blocking(move || {
            let WriteRequest {
                file,
                offset,
                mut buf,
                len,
            } = request;
            file.take_write_stall();
            let result = (|| {
                let mut at = offset;
                for chunk in buf.chunks_upto_mut(len) {
                    file.file().write_all_at(chunk, at)?;
                    at += chunk.len() as u64;
                }
                Ok(())
            })();
            (buf, result)
        })
        .await
        .expect("blocking write task panicked")
    }
}
