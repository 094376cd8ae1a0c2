//! One HTTP/1.1 exchange with a registry over hyper's connection API (a connection per
//! request: the registry API is a handful of small calls and a few uploads), plain TCP or
//! TLS through the origin client's rustls configuration, every wait bounded.

use super::super::ModelError;
use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::header::{HeaderMap, HeaderName, HeaderValue, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

pub type Body = BoxBody<Bytes, std::io::Error>;

pub fn bytes_body(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A whole response: status, headers, and the body read up to a limit.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

pub struct Transport {
    pub registry: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub connect_timeout: Duration,
}

/// The largest body read into memory (manifests, configs, tokens, error texts).
pub const MAX_BODY: usize = 16 << 20;

impl Transport {
    fn connect_error(&self, why: impl std::fmt::Display) -> ModelError {
        ModelError::Connect {
            registry: self.registry.clone(),
            why: why.to_string(),
        }
    }

    /// Sends one request and reads the whole answer, all within `limit`.
    pub async fn exchange(
        &self,
        method: Method,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Body,
        limit: Duration,
    ) -> Result<Answer, ModelError> {
        match tokio::time::timeout(limit, self.exchange_unbounded(method, uri, headers, body)).await
        {
            Ok(result) => result,
            Err(_) => Err(self.connect_error(format!("no complete answer within {limit:?}"))),
        }
    }

    async fn exchange_unbounded(
        &self,
        method: Method,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Body,
    ) -> Result<Answer, ModelError> {
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(self.connect_error(format!("unsupported URL {uri}"))),
        };
        let host = uri
            .host()
            .ok_or_else(|| self.connect_error(format!("no host in {uri}")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            TcpStream::connect((host.as_str(), port)),
        )
        .await
        .map_err(|_| {
            self.connect_error(format!(
                "connect timed out after {:?}",
                self.connect_timeout
            ))
        })?
        .map_err(|e| self.connect_error(e))?;
        let _ = tcp.set_nodelay(true);
        let mut request = Request::builder()
            .method(method)
            .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
            .body(body)
            .map_err(|e| self.connect_error(e))?;
        let authority = uri.authority().map_or(host.clone(), |a| a.to_string());
        let request_headers = request.headers_mut();
        request_headers.insert(
            HOST,
            HeaderValue::from_str(&authority).map_err(|e| self.connect_error(e))?,
        );
        request_headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("ferry/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in headers {
            request_headers.insert(name.clone(), value.clone());
        }
        if https {
            let tls = self
                .tls
                .clone()
                .ok_or_else(|| self.connect_error("TLS is not configured"))?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| self.connect_error(e))?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| self.connect_error(format!("TLS: {e}")))?;
            self.send(TokioIo::new(stream), request).await
        } else {
            self.send(TokioIo::new(tcp), request).await
        }
    }

    async fn send<IO>(&self, io: IO, request: Request<Body>) -> Result<Answer, ModelError>
    where
        IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| self.connect_error(e))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.connect_error(e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let limited = http_body_util::Limited::new(response.into_body(), MAX_BODY);
        let body = limited
            .collect()
            .await
            .map_err(|e| self.connect_error(format!("reading the answer: {e}")))?
            .to_bytes();
        Ok(Answer {
            status,
            headers,
            body,
        })
    }
}
