//! The fetching side: one [`Connection`] carries one request at a time; a receiver opens
//! several per peer to keep several pieces in flight.

use crate::codec::{self, FrameHeader, Request, Response, TaskInfo};
use crate::error::ClientError;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use vortex_protocol::tlv::piece_metadata::PieceMetadata;
use vortex_protocol::HEADER_SIZE;

/// Timeouts for a client connection: no wait is unbounded.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    /// Longest silence tolerated on any single read or write.
    pub io_timeout: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
        }
    }
}

/// A piece received whole: what the peer said about it and the CRC32 of the bytes received,
/// computed while they arrived (so the receiver never reads them again to verify).
#[derive(Debug, Clone)]
pub struct FetchedPiece {
    pub metadata: PieceMetadata,
    pub crc32: u32,
    pub elapsed: Duration,
}

/// A TCP connection to one peer's data port.
pub struct Connection {
    stream: TcpStream,
    peer: String,
    config: ClientConfig,
    out: BytesMut,
}

impl Connection {
    pub async fn connect(
        addr: SocketAddr,
        config: ClientConfig,
    ) -> Result<Connection, ClientError> {
        let peer = addr.to_string();
        let stream = timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout {
                peer: peer.clone(),
                during: "connecting",
                timeout: config.connect_timeout,
            })?
            .map_err(|source| ClientError::Connect {
                addr: peer.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream,
            peer,
            config,
            out: BytesMut::with_capacity(128),
        })
    }

    pub fn peer(&self) -> &str {
        &self.peer
    }

    async fn send(&mut self, request: &Request) -> Result<(), ClientError> {
        self.out.clear();
        request.encode(&mut self.out);
        let limit = self.config.io_timeout;
        timeout(limit, self.stream.write_all(&self.out))
            .await
            .map_err(|_| ClientError::Timeout {
                peer: self.peer.clone(),
                during: "sending a request",
                timeout: limit,
            })?
            .map_err(|source| ClientError::Io {
                peer: self.peer.clone(),
                source,
            })
    }

    async fn read_exact(
        &mut self,
        buf: &mut [u8],
        during: &'static str,
    ) -> Result<(), ClientError> {
        let limit = self.config.io_timeout;
        let mut got = 0;
        while got < buf.len() {
            let n = timeout(limit, self.stream.read(&mut buf[got..]))
                .await
                .map_err(|_| ClientError::Timeout {
                    peer: self.peer.clone(),
                    during,
                    timeout: limit,
                })?
                .map_err(|source| ClientError::Io {
                    peer: self.peer.clone(),
                    source,
                })?;
            if n == 0 {
                return Err(ClientError::Closed {
                    peer: self.peer.clone(),
                    during,
                });
            }
            got += n;
        }
        Ok(())
    }

    async fn read_response(&mut self) -> Result<Response, ClientError> {
        let mut header_bytes = [0u8; HEADER_SIZE];
        self.read_exact(&mut header_bytes, "awaiting a response header")
            .await?;
        let header: FrameHeader =
            codec::decode_header(&header_bytes, codec::MAX_RESPONSE_VALUE_LEN).map_err(
                |source| ClientError::Protocol {
                    peer: self.peer.clone(),
                    source,
                },
            )?;
        let mut value = vec![0u8; header.value_len as usize];
        self.read_exact(&mut value, "reading a response value")
            .await?;
        let response =
            Response::decode(header, &value).map_err(|source| ClientError::Protocol {
                peer: self.peer.clone(),
                source,
            })?;
        if let Response::Error { code, message } = response {
            return Err(ClientError::Remote {
                peer: self.peer.clone(),
                code: code.into(),
                message,
            });
        }
        Ok(response)
    }

    /// Asks the peer for a task's geometry (a Ferry extension).
    pub async fn stat_task(&mut self, task_id: &str) -> Result<TaskInfo, ClientError> {
        self.send(&Request::StatTask {
            task_id: task_id.to_owned(),
        })
        .await?;
        match self.read_response().await? {
            Response::TaskInfo(info) => Ok(info),
            _ => Err(ClientError::Protocol {
                peer: self.peer.clone(),
                source: crate::CodecError::Malformed("expected TaskInfo".into()),
            }),
        }
    }

    /// Fetches piece `number` of `task_id`, which must be `expected_length` bytes, into the
    /// chunks of `dest` in order. The chunks together must hold at least `expected_length`
    /// bytes. On any error other than [`ClientError::Remote`] the connection must be dropped.
    pub async fn fetch_piece(
        &mut self,
        task_id: &str,
        number: u32,
        expected_length: u64,
        dest: &mut [&mut [u8]],
    ) -> Result<FetchedPiece, ClientError> {
        let started = Instant::now();
        self.send(&Request::DownloadPiece {
            task_id: task_id.to_owned(),
            number,
        })
        .await?;
        let metadata = match self.read_response().await? {
            Response::PieceContent(metadata) => metadata,
            _ => {
                return Err(ClientError::Protocol {
                    peer: self.peer.clone(),
                    source: crate::CodecError::Malformed("expected PieceContent".into()),
                })
            }
        };
        if metadata.number != number {
            return Err(ClientError::WrongPiece {
                peer: self.peer.clone(),
                wanted: number,
                got: metadata.number,
                length: metadata.length,
            });
        }
        if metadata.length != expected_length {
            return Err(ClientError::WrongLength {
                peer: self.peer.clone(),
                number,
                got: metadata.length,
                expected: expected_length,
            });
        }
        let mut hasher = crc32fast::Hasher::new();
        let mut remaining = expected_length as usize;
        for chunk in dest.iter_mut() {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(chunk.len());
            self.read_exact(&mut chunk[..take], "reading piece content")
                .await?;
            hasher.update(&chunk[..take]);
            remaining -= take;
        }
        assert_eq!(remaining, 0, "destination chunks smaller than the piece");
        Ok(FetchedPiece {
            metadata,
            crc32: hasher.finalize(),
            elapsed: started.elapsed(),
        })
    }
}
