//! One HTTP/1.1 exchange with an origin over hyper's connection API: plain TCP or TLS through
//! rustls (ring, the system's roots plus `origin.ca_file`), connections kept per host for the
//! next request, every wait bounded. Redirects, retries and what a response must say are the
//! caller's (`super`).

use super::{OriginError, OriginSettings};
use bytes::Bytes;
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderMap, HeaderValue, HOST, RANGE, USER_AGENT};
use hyper::{Request, Response, Uri};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::net::TcpStream;

/// Where a request goes: scheme, host and port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct Endpoint {
    pub https: bool,
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn of(uri: &Uri) -> Result<Endpoint, OriginError> {
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(OriginError::InvalidUrl(format!(
                    "{}: only http:// and https:// origins are supported",
                    super::redact(uri)
                )))
            }
        };
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| OriginError::InvalidUrl(format!("{}: no host", super::redact(uri))))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        Ok(Endpoint { https, host, port })
    }
}

type Sender = SendRequest<Empty<Bytes>>;

/// A response and the connection it came on (given back once its body was read whole).
pub(super) struct Exchange {
    pub response: Response<Incoming>,
    pub sender: Sender,
    pub endpoint: Endpoint,
}

pub(super) struct Client {
    settings: OriginSettings,
    idle: Mutex<HashMap<Endpoint, Vec<Sender>>>,
    tls: OnceLock<Result<tokio_rustls::TlsConnector, String>>,
}

impl Client {
    pub fn new(settings: OriginSettings) -> Client {
        Client {
            settings,
            idle: Mutex::new(HashMap::new()),
            tls: OnceLock::new(),
        }
    }

    fn tls(&self) -> Result<tokio_rustls::TlsConnector, OriginError> {
        self.tls
            .get_or_init(|| build_tls(&self.settings).map(tokio_rustls::TlsConnector::from))
            .clone()
            .map_err(OriginError::Tls)
    }

    /// Gives back a connection whose last response was read whole.
    pub fn give_back(&self, endpoint: Endpoint, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.entry(endpoint).or_default();
        if list.len() < 64 {
            list.push(sender);
        }
    }

    fn pooled(&self, endpoint: &Endpoint) -> Option<Sender> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(endpoint)?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    async fn connect(&self, uri: &Uri, endpoint: &Endpoint) -> Result<Sender, OriginError> {
        let limit = self.settings.connect_timeout;
        let connect_error = |why: String| OriginError::Connect {
            url: super::redact(uri),
            why,
        };
        let tcp = tokio::time::timeout(
            limit,
            TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
        )
        .await
        .map_err(|_| connect_error(format!("no connection within {limit:?}")))?
        .map_err(|err| connect_error(err.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let io_timeout = self.settings.io_timeout;
        if endpoint.https {
            let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|err| connect_error(format!("not a TLS server name: {err}")))?;
            let tls = tokio::time::timeout(io_timeout, self.tls()?.connect(name, tcp))
                .await
                .map_err(|_| connect_error(format!("no TLS handshake within {io_timeout:?}")))?
                .map_err(|err| connect_error(format!("TLS: {err}")))?;
            handshake(TokioIo::new(tls), uri).await
        } else {
            handshake(TokioIo::new(tcp), uri).await
        }
    }

    /// Sends one GET (with `range`, when given) and waits for the response head, at most
    /// `io_timeout`. A pooled connection the origin closed meanwhile is replaced once, quietly.
    pub async fn get(
        &self,
        uri: &Uri,
        headers: &HeaderMap,
        range: Option<(u64, u64)>,
    ) -> Result<Exchange, OriginError> {
        let endpoint = Endpoint::of(uri)?;
        let mut request = Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
            .body(Empty::<Bytes>::new())
            .map_err(|err| OriginError::InvalidUrl(err.to_string()))?;
        let host = match uri.port() {
            Some(port) => format!("{}:{}", endpoint_host_for_header(uri), port),
            None => endpoint_host_for_header(uri),
        };
        let request_headers = request.headers_mut();
        request_headers.insert(
            HOST,
            HeaderValue::from_str(&host).map_err(|e| OriginError::InvalidUrl(e.to_string()))?,
        );
        request_headers.insert(
            USER_AGENT,
            HeaderValue::from_static(concat!("ferry/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in headers {
            request_headers.append(name, value.clone());
        }
        if let Some((first, last)) = range {
            request_headers.insert(
                RANGE,
                HeaderValue::from_str(&format!("bytes={first}-{last}")).expect("ascii"),
            );
        }
        let limit = self.settings.io_timeout;
        let mut fresh_tried = false;
        let mut sender = match self.pooled(&endpoint) {
            Some(sender) => sender,
            None => {
                fresh_tried = true;
                self.connect(uri, &endpoint).await?
            }
        };
        loop {
            let again = request_clone(&request);
            let sent = async {
                sender.ready().await.map_err(|e| (true, e.to_string()))?;
                sender
                    .send_request(again)
                    .await
                    .map_err(|e| (e.is_canceled() || e.is_incomplete_message(), e.to_string()))
            };
            match tokio::time::timeout(limit, sent).await {
                Ok(Ok(response)) => {
                    return Ok(Exchange {
                        response,
                        sender,
                        endpoint,
                    })
                }
                Ok(Err((closed, _))) if closed && !fresh_tried => {
                    // The origin closed the idle connection: one more try on a new one.
                    fresh_tried = true;
                    sender = self.connect(uri, &endpoint).await?;
                }
                Ok(Err((_, why))) => {
                    return Err(OriginError::Connect {
                        url: super::redact(uri),
                        why,
                    })
                }
                Err(_) => {
                    return Err(OriginError::Stalled {
                        url: super::redact(uri),
                        range: range
                            .map(|(a, b)| format!("bytes {a}-{b}"))
                            .unwrap_or_default(),
                        received: 0,
                        timeout: limit,
                    })
                }
            }
        }
    }
}

fn endpoint_host_for_header(uri: &Uri) -> String {
    uri.host().unwrap_or_default().to_owned()
}

fn request_clone(request: &Request<Empty<Bytes>>) -> Request<Empty<Bytes>> {
    let mut copy = Request::new(Empty::new());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.headers_mut() = request.headers().clone();
    copy
}

async fn handshake<T>(io: TokioIo<T>, uri: &Uri) -> Result<Sender, OriginError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(1 << 20)
        .handshake(io)
        .await
        .map_err(|err| OriginError::Connect {
            url: super::redact(uri),
            why: err.to_string(),
        })?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(error = %err, "origin connection ended");
        }
    });
    Ok(sender)
}

pub(super) fn build_tls(settings: &OriginSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for cert in native.certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = &settings.ca_file {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|err| format!("reading origin.ca_file {}: {err}", path.display()))?;
        for cert in certs {
            let cert =
                cert.map_err(|err| format!("reading origin.ca_file {}: {err}", path.display()))?;
            roots
                .add(cert)
                .map_err(|err| format!("origin.ca_file {}: {err}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err("no CA certificates: the system has none and origin.ca_file is not set".into());
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|err| err.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
