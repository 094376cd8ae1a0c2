//! The fallback: positional reads and writes on tokio's blocking threads.

use super::{PieceBuffer, ReadRequest, WriteRequest};
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

    /// `pread` into the slots (a direct-I/O file reads whole aligned blocks; the slots and
    /// `len` are aligned); stops at the end of the file.
    pub async fn read(&self, request: ReadRequest) -> (PieceBuffer, io::Result<usize>) {
        tokio::task::spawn_blocking(move || {
            let ReadRequest {
                file,
                offset,
                mut buf,
                len,
            } = request;
            let want = buf.len();
            let result = (|| {
                let mut at = offset;
                let mut read = 0usize;
                for chunk in buf.chunks_upto_mut(len) {
                    let mut filled = 0;
                    while filled < chunk.len() {
                        match file
                            .file()
                            .read_at(&mut chunk[filled..], at + filled as u64)
                        {
                            Ok(0) => return Ok(read.min(want)),
                            Ok(n) => {
                                filled += n;
                                read += n;
                            }
                            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                            Err(err) => return Err(err),
                        }
                    }
                    at += chunk.len() as u64;
                }
                Ok(read.min(want))
            })();
            (buf, result)
        })
        .await
        .expect("blocking read task panicked")
    }
}
