//! Back to source: a task's pieces downloaded from its `http://` or `https://` origin with
//! concurrent HTTP Range requests, one piece per request, straight into pool buffers.
//!
//! What the origin must say, and what it is held to:
//! - its length, from the first answer (`Content-Range: bytes 0-0/N` to a one-byte probe, or
//!   `Content-Length` of a 200); every later `Content-Range` must name the range asked and
//!   the same total;
//! - its version, `ETag` and `Last-Modified` from the probe: a later answer with another is
//!   [`OriginError::Changed`] (a file is one version, never a mix);
//! - each body exactly as long as the range: shorter ([`OriginError::ShortBody`]) and a stall
//!   (no byte for `io_timeout`) are retried with exponential back-off, like connection errors,
//!   5xx, 408 and 429; longer, a wrong range, other 4xx are not.
//!
//! A 200 to a Range request means the origin ignores ranges: fine for a one-piece task,
//! [`OriginError::NoRangeSupport`] otherwise. Redirects are followed up to
//! `origin.max_redirects`; credentials (`Authorization`, `Cookie`) are not sent to another
//! host.

mod http;

use crate::geometry::{self, PieceRange};
use crate::io::PieceBuffer;
use crate::metrics::Metrics;
use http_body_util::BodyExt as _;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, LOCATION};
use hyper::{StatusCode, Uri};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Dragonfly's default `filtered_query_params` (S3, GCS, OSS, OBS, COS signatures and
/// containerd's `ns`): dropped from a URL before it is hashed into a task id, so one object
/// behind differently signed URLs is one task.
pub const FILTERED_QUERY_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-User-Agent",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "OSSAccessKeyId",
    "Expires",
    "Signature",
    "SecurityToken",
    "AccessKeyId",
    "X-Obs-Date",
    "X-Obs-Security-Token",
    "q-sign-algorithm",
    "q-ak",
    "q-sign-time",
    "q-key-time",
    "q-header-list",
    "q-url-param-list",
    "q-signature",
    "x-cos-security-token",
    "ns",
];

/// How the daemon talks to origins (`[origin]` in the configuration).
#[derive(Debug, Clone)]
pub struct OriginSettings {
    /// Range requests in flight per transfer (one connection each).
    pub connections: u32,
    /// Retries per request after the first try.
    pub retries: u32,
    /// First back-off; doubled per retry, up to `retry_max`.
    pub retry_base: Duration,
    pub retry_max: Duration,
    pub connect_timeout: Duration,
    /// Longest wait for a response head or for the next body bytes (a stall).
    pub io_timeout: Duration,
    pub max_redirects: u32,
    /// Extra CA certificates (PEM) for https origins, besides the system's.
    pub ca_file: Option<PathBuf>,
}

impl Default for OriginSettings {
    fn default() -> OriginSettings {
        OriginSettings {
            connections: 8,
            retries: 3,
            retry_base: Duration::from_millis(250),
            retry_max: Duration::from_secs(8),
            connect_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_redirects: 5,
            ca_file: None,
        }
    }
}

/// What a transfer asks of an origin.
#[derive(Debug, Clone, Default)]
pub struct OriginRequest {
    pub url: String,
    /// `K: V` request headers (auth), sent with every request to the origin's host.
    pub headers: Vec<String>,
    pub tag: Option<String>,
    pub application: Option<String>,
}

/// Why an origin could not give a piece (or its length). Each names the URL without its
/// query (signed URLs carry secrets there).
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    #[error("invalid origin URL: {0}")]
    InvalidUrl(String),
    #[error("invalid origin header {0:?}: expected `Name: value`")]
    InvalidHeader(String),
    #[error("origin {url}: cannot connect: {why}")]
    Connect { url: String, why: String },
    #[error("TLS set-up for https origins failed: {0}")]
    Tls(String),
    #[error("origin {url} answered {code}{hint}")]
    Status {
        url: String,
        code: u16,
        hint: &'static str,
    },
    #[error("origin {url}: more than {limit} redirects")]
    TooManyRedirects { url: String, limit: u32 },
    #[error("origin {url}: stalled: no bytes for {timeout:?} after {received} bytes of {range}")]
    Stalled {
        url: String,
        range: String,
        received: u64,
        timeout: Duration,
    },
    #[error("origin {url}: body of {range} ended after {received} of {expected} bytes")]
    ShortBody {
        url: String,
        range: String,
        received: u64,
        expected: u64,
    },
    #[error("origin {url}: body of {range} is longer than the {expected} bytes asked")]
    LongBody {
        url: String,
        range: String,
        expected: u64,
    },
    #[error("origin {url}: asked for {asked} and got Content-Range {got:?}")]
    WrongRange {
        url: String,
        asked: String,
        got: String,
    },
    #[error("origin {url}: states no length (no Content-Length or Content-Range total)")]
    NoLength { url: String },
    #[error("origin {url} does not serve byte ranges (it answered 200 to a Range request) and the content ({length} bytes) has {pieces} pieces; Ferry downloads pieces with Range requests only")]
    NoRangeSupport {
        url: String,
        length: u64,
        pieces: u32,
    },
    #[error("origin {url} changed during the download ({what}); nothing was placed and the task's pieces were dropped: repeat the pull to fetch the new version")]
    Changed { url: String, what: String },
    #[error("origin {url}: {why}")]
    Io { url: String, why: String },
}

impl OriginError {
    /// Worth another try after a back-off.
    pub fn transient(&self) -> bool {
        match self {
            OriginError::Connect { .. }
            | OriginError::Stalled { .. }
            | OriginError::ShortBody { .. }
            | OriginError::Io { .. } => true,
            OriginError::Status { code, .. } => *code >= 500 || *code == 408 || *code == 429,
            _ => false,
        }
    }
}

/// The TLS client configuration origins are reached with (the system's roots plus
/// `origin.ca_file`), for other clients of the same servers (the OCI registry client).
pub fn tls_client_config(
    settings: &OriginSettings,
) -> Result<Arc<rustls::ClientConfig>, OriginError> {
    http::build_tls(settings).map_err(OriginError::Tls)
}

/// A URL as shown in logs and errors: scheme, host, port and path; no credentials, no query.
pub fn redact(uri: &Uri) -> String {
    format!(
        "{}://{}{}",
        uri.scheme_str().unwrap_or("?"),
        uri.host().unwrap_or("?"),
        uri.port().map(|p| format!(":{p}")).unwrap_or_default()
    ) + uri.path()
}

/// The URL Dragonfly hashes into the task id: scheme and host lowercased, the scheme's
/// default port dropped, the query re-encoded (`application/x-www-form-urlencoded`) without
/// the [`FILTERED_QUERY_PARAMS`] and dropped when nothing is left, a bare `/` path dropped.
/// (Dragonfly parses with the `url` crate; hosts are not IDNA-mapped here.)
pub fn task_url(url: &str) -> Result<String, OriginError> {
    let uri: Uri = url
        .parse()
        .map_err(|err| OriginError::InvalidUrl(format!("{url:?}: {err}")))?;
    let scheme = uri
        .scheme_str()
        .ok_or_else(|| OriginError::InvalidUrl(format!("{url:?}: no scheme")))?
        .to_ascii_lowercase();
    let endpoint = http::Endpoint::of(&uri)?;
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let default_port = if endpoint.https { 443 } else { 80 };
    let port = match uri.port_u16() {
        Some(port) if port != default_port => format!(":{port}"),
        _ => String::new(),
    };
    let path = if uri.path().is_empty() {
        "/"
    } else {
        uri.path()
    };
    let mut text = format!("{scheme}://{host}{port}{path}");
    if let Some(query) = uri.query() {
        let kept: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .filter(|(k, _)| !FILTERED_QUERY_PARAMS.contains(&k.as_ref()))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if !kept.is_empty() {
            let encoded = form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish();
            text.push('?');
            text.push_str(&encoded);
        }
    }
    if path == "/" && text.ends_with('/') {
        text.pop();
    }
    Ok(text)
}

/// Dragonfly's task id of a URL (see [`task_url`] and [`geometry::task_id`]).
pub fn task_id(
    url: &str,
    tag: Option<&str>,
    application: Option<&str>,
    piece_length: Option<u64>,
) -> Result<String, OriginError> {
    let url = task_url(url)?;
    Ok(geometry::task_id(&geometry::TaskIdInputs {
        url: &url,
        tag: tag.filter(|t| !t.is_empty()),
        application: application.filter(|a| !a.is_empty()),
        revision: None,
        piece_length,
    }))
}

/// Parses `Name: value`.
pub fn parse_header(text: &str) -> Result<(HeaderName, HeaderValue), OriginError> {
    let bad = || OriginError::InvalidHeader(text.chars().take(80).collect());
    let (name, value) = text.split_once(':').ok_or_else(bad)?;
    let name = HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| bad())?;
    let value = HeaderValue::from_str(value.trim()).map_err(|_| bad())?;
    Ok((name, value))
}

/// What the origin said about the content at first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub length: u64,
    pub ranges: bool,
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

/// One origin, for one transfer.
pub struct Origin {
    client: http::Client,
    settings: OriginSettings,
    /// Where requests go: the URL after the probe's redirects.
    target: Mutex<Uri>,
    headers: HeaderMap,
    name: String,
    probe: tokio::sync::OnceCell<Probe>,
    retries: AtomicU32,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin").field("url", &self.name).finish()
    }
}

fn header_text(headers: &HeaderMap, name: HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// A `Content-Range`: the range (none for `*`) and the total (none for `*`).
type ContentRange = (Option<(u64, u64)>, Option<u64>);

/// Parses `bytes FIRST-LAST/TOTAL` (TOTAL may be `*`), or `bytes */TOTAL`.
fn parse_content_range(text: &str) -> Option<ContentRange> {
    let rest = text.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    let range = match range.trim() {
        "*" => None,
        r => {
            let (a, b) = r.split_once('-')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        }
    };
    Some((range, total))
}

impl Origin {
    pub fn new(
        request: &OriginRequest,
        settings: OriginSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Origin, OriginError> {
        let url: Uri = request
            .url
            .parse()
            .map_err(|err| OriginError::InvalidUrl(format!("{:?}: {err}", request.url)))?;
        http::Endpoint::of(&url)?;
        let mut headers = HeaderMap::new();
        for text in &request.headers {
            let (name, value) = parse_header(text)?;
            headers.append(name, value);
        }
        Ok(Origin {
            client: http::Client::new(settings.clone()),
            target: Mutex::new(url.clone()),
            name: redact(&url),
            settings,
            headers,
            probe: tokio::sync::OnceCell::new(),
            retries: AtomicU32::new(0),
            metrics,
        })
    }

    /// The URL without its query, as pieces name their source.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests retried after a transient failure, so far.
    pub fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    /// The origin's length and validators, asked once (a one-byte Range request).
    pub async fn probe(&self) -> Result<Probe, OriginError> {
        self.probe
            .get_or_try_init(|| self.with_retries("bytes 0-0", || self.probe_once()))
            .await
            .cloned()
    }

    async fn with_retries<T, F, Fut>(&self, what: &str, mut once: F) -> Result<T, OriginError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, OriginError>>,
    {
        let mut attempt = 0u32;
        loop {
            match once().await {
                Ok(value) => return Ok(value),
                Err(err) => self.back_off(what, &mut attempt, err).await?,
            }
        }
    }

    /// After a failed try: sleeps before the next one, or gives the error back when it is
    /// not worth retrying or the retries are spent.
    async fn back_off(
        &self,
        what: &str,
        attempt: &mut u32,
        err: OriginError,
    ) -> Result<(), OriginError> {
        if !err.transient() || *attempt >= self.settings.retries {
            self.metrics.origin_failed(err.kind());
            return Err(err);
        }
        let delay = self
            .settings
            .retry_base
            .saturating_mul(1 << (*attempt).min(16))
            .min(self.settings.retry_max);
        // Up to a quarter more, so that many workers do not retry in step.
        let jitter = delay.mul_f64(f64::from(jitter_seed() % 256) / 1024.0);
        *attempt += 1;
        self.retries.fetch_add(1, Ordering::Relaxed);
        self.metrics.origin_retried();
        tracing::warn!(origin = %self.name, %what, attempt = *attempt, error = %err, ?delay, "origin request failed; retrying");
        tokio::time::sleep(delay + jitter).await;
        Ok(())
    }

    /// A GET following redirects; returns the exchange and the URL that answered.
    async fn get(&self, range: Option<(u64, u64)>) -> Result<(http::Exchange, Uri), OriginError> {
        let mut uri = self.target.lock().expect("target lock").clone();
        let mut headers = self.headers.clone();
        let first_host = uri.host().map(str::to_owned);
        for _ in 0..=self.settings.max_redirects {
            let exchange = self.client.get(&uri, &headers, range).await?;
            let status = exchange.response.status();
            if !status.is_redirection() || status == StatusCode::NOT_MODIFIED {
                return Ok((exchange, uri));
            }
            let location = exchange
                .response
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| OriginError::Status {
                    url: redact(&uri),
                    code: status.as_u16(),
                    hint: " (a redirect without a Location)",
                })?;
            let next = resolve(&uri, location)?;
            if next.host().map(str::to_owned) != first_host {
                for name in ["authorization", "cookie", "proxy-authorization"] {
                    headers.remove(name);
                }
            }
            tracing::debug!(from = %redact(&uri), to = %redact(&next), "origin redirect");
            uri = next;
        }
        Err(OriginError::TooManyRedirects {
            url: self.name.clone(),
            limit: self.settings.max_redirects,
        })
    }

    fn check_status(&self, uri: &Uri, status: StatusCode) -> Result<(), OriginError> {
        if status.is_success() {
            return Ok(());
        }
        Err(OriginError::Status {
            url: redact(uri),
            code: status.as_u16(),
            hint: match status.as_u16() {
                401 | 403 => " (pass credentials with --header 'Authorization: ...')",
                404 | 410 => " (not found)",
                416 => " (the range is past its end: the content shrank)",
                _ => "",
            },
        })
    }

    async fn probe_once(&self) -> Result<Probe, OriginError> {
        let (exchange, uri) = self.get(Some((0, 0))).await?;
        let http::Exchange {
            response,
            sender,
            endpoint,
        } = exchange;
        let status = response.status();
        let headers = response.headers().clone();
        let etag = header_text(&headers, hyper::header::ETAG);
        let last_modified = header_text(&headers, hyper::header::LAST_MODIFIED);
        let probe = match status {
            StatusCode::PARTIAL_CONTENT => {
                let text = header_text(&headers, CONTENT_RANGE).unwrap_or_default();
                let length = match parse_content_range(&text) {
                    Some((Some((0, 0)), Some(total))) => total,
                    _ => {
                        return Err(OriginError::WrongRange {
                            url: redact(&uri),
                            asked: "bytes 0-0".into(),
                            got: text,
                        })
                    }
                };
                let body = tokio::time::timeout(self.settings.io_timeout, response.collect())
                    .await
                    .ok()
                    .and_then(Result::ok);
                if body.is_some_and(|b| b.to_bytes().len() == 1) {
                    self.client.give_back(endpoint, sender);
                }
                Probe {
                    length,
                    ranges: true,
                    etag,
                    last_modified,
                }
            }
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // An empty content: `bytes */0`.
                let text = header_text(&headers, CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&text) {
                    Some((None, Some(0))) => Probe {
                        length: 0,
                        ranges: true,
                        etag,
                        last_modified,
                    },
                    _ => return Err(self.check_status(&uri, status).unwrap_err()),
                }
            }
            StatusCode::OK => {
                // No ranges: the whole body follows, unread (the connection is dropped).
                let length = header_text(&headers, CONTENT_LENGTH)
                    .and_then(|v| v.trim().parse().ok())
                    .ok_or_else(|| OriginError::NoLength { url: redact(&uri) })?;
                Probe {
                    length,
                    ranges: false,
                    etag,
                    last_modified,
                }
            }
            other => {
                self.check_status(&uri, other)?;
                return Err(OriginError::Status {
                    url: redact(&uri),
                    code: other.as_u16(),
                    hint: " (expected 206 or 200)",
                });
            }
        };
        *self.target.lock().expect("target lock") = uri;
        Ok(probe)
    }

    /// Downloads `piece` into `buf` (retrying transient failures) and returns its CRC32.
    pub async fn fetch(
        &self,
        piece: PieceRange,
        content_length: u64,
        buf: &mut PieceBuffer,
    ) -> Result<u32, OriginError> {
        let probe = self.probe().await?;
        if probe.length != content_length {
            return Err(OriginError::Changed {
                url: self.name.clone(),
                what: format!(
                    "it has {} bytes and the task {content_length}",
                    probe.length
                ),
            });
        }
        let what = format!(
            "bytes {}-{}",
            piece.offset,
            piece.offset + piece.length.saturating_sub(1)
        );
        let mut attempt = 0u32;
        loop {
            match self.fetch_once(&probe, piece, buf).await {
                Ok(crc) => return Ok(crc),
                Err(err) => self.back_off(&what, &mut attempt, err).await?,
            }
        }
    }

    async fn fetch_once(
        &self,
        probe: &Probe,
        piece: PieceRange,
        buf: &mut PieceBuffer,
    ) -> Result<u32, OriginError> {
        let last = piece.offset + piece.length - 1;
        let asked = format!("bytes {}-{last}", piece.offset);
        let whole = piece.offset == 0 && piece.length == probe.length;
        let (exchange, uri) = self.get(Some((piece.offset, last))).await?;
        let http::Exchange {
            response,
            sender,
            endpoint,
        } = exchange;
        let url = redact(&uri);
        let status = response.status();
        let headers = response.headers();
        let changed = |what: String| OriginError::Changed {
            url: url.clone(),
            what,
        };
        match status {
            StatusCode::PARTIAL_CONTENT => {
                let text = header_text(headers, CONTENT_RANGE).unwrap_or_default();
                match parse_content_range(&text) {
                    Some((Some((a, b)), total)) if a == piece.offset && b == last => {
                        if let Some(total) = total.filter(|t| *t != probe.length) {
                            return Err(changed(format!(
                                "its length was {} and is now {total}",
                                probe.length
                            )));
                        }
                    }
                    _ => {
                        return Err(OriginError::WrongRange {
                            url,
                            asked,
                            got: text,
                        })
                    }
                }
            }
            StatusCode::OK if whole => {}
            StatusCode::OK => {
                return Err(OriginError::NoRangeSupport {
                    url,
                    length: probe.length,
                    pieces: probe.length.div_ceil(piece.length.max(1)) as u32,
                })
            }
            other => {
                self.check_status(&uri, other)?;
                return Err(OriginError::Status {
                    url,
                    code: other.as_u16(),
                    hint: " (expected 206)",
                });
            }
        }
        for (name, was) in [
            (hyper::header::ETAG, &probe.etag),
            (hyper::header::LAST_MODIFIED, &probe.last_modified),
        ] {
            let now = header_text(headers, name.clone());
            if was.is_some() && now != *was {
                return Err(changed(format!(
                    "{name} was {} and is now {}",
                    was.as_deref().unwrap_or("-"),
                    now.as_deref().unwrap_or("absent")
                )));
            }
        }
        if let Some(stated) = header_text(headers, CONTENT_LENGTH) {
            if stated.trim().parse::<u64>().ok() != Some(piece.length) {
                return Err(OriginError::WrongRange {
                    url,
                    asked,
                    got: format!("Content-Length {stated}"),
                });
            }
        }
        let mut body = response.into_body();
        let mut hasher = crc32fast::Hasher::new();
        let mut received = 0u64;
        {
            let mut chunks = buf.chunks_mut();
            let (mut index, mut at) = (0usize, 0usize);
            loop {
                let frame = tokio::time::timeout(self.settings.io_timeout, body.frame()).await;
                let frame = match frame {
                    Err(_) => {
                        return Err(OriginError::Stalled {
                            url,
                            range: asked,
                            received,
                            timeout: self.settings.io_timeout,
                        })
                    }
                    Ok(None) => break,
                    Ok(Some(Err(err))) => {
                        return Err(if err.is_incomplete_message() || received < piece.length {
                            OriginError::ShortBody {
                                url,
                                range: asked,
                                received,
                                expected: piece.length,
                            }
                        } else {
                            OriginError::Io {
                                url,
                                why: err.to_string(),
                            }
                        })
                    }
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(mut data) = frame.into_data() else {
                    continue;
                };
                while !data.is_empty() {
                    let Some(chunk) = chunks.get_mut(index) else {
                        return Err(OriginError::LongBody {
                            url,
                            range: asked,
                            expected: piece.length,
                        });
                    };
                    let take = data.len().min(chunk.len() - at);
                    chunk[at..at + take].copy_from_slice(&data[..take]);
                    hasher.update(&data[..take]);
                    bytes::Buf::advance(&mut data, take);
                    at += take;
                    received += take as u64;
                    if at == chunk.len() {
                        index += 1;
                        at = 0;
                    }
                }
            }
        }
        if received != piece.length {
            return Err(OriginError::ShortBody {
                url,
                range: asked,
                received,
                expected: piece.length,
            });
        }
        self.client.give_back(endpoint, sender);
        Ok(hasher.finalize())
    }
}

impl OriginError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::InvalidUrl(_) | OriginError::InvalidHeader(_) => "invalid",
            OriginError::Connect { .. } | OriginError::Tls(_) | OriginError::Io { .. } => "connect",
            OriginError::Status { .. } | OriginError::TooManyRedirects { .. } => "status",
            OriginError::Stalled { .. } => "stall",
            OriginError::ShortBody { .. }
            | OriginError::LongBody { .. }
            | OriginError::WrongRange { .. }
            | OriginError::NoLength { .. } => "length",
            OriginError::NoRangeSupport { .. } => "no_ranges",
            OriginError::Changed { .. } => "changed",
        }
    }
}

/// A cheap varying number for back-off jitter.
fn jitter_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// A `Location` against the URL that sent it.
fn resolve(base: &Uri, location: &str) -> Result<Uri, OriginError> {
    let invalid = || OriginError::InvalidUrl(format!("redirect to {location:?}"));
    if location.starts_with("http://") || location.starts_with("https://") {
        return location.parse().map_err(|_| invalid());
    }
    let authority = base.authority().ok_or_else(invalid)?;
    let scheme = base.scheme_str().unwrap_or("http");
    let path = if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}").parse().map_err(|_| invalid());
    } else if location.starts_with('/') {
        location.to_owned()
    } else {
        let dir = base.path().rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{location}")
    };
    format!("{scheme}://{authority}{path}")
        .parse()
        .map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_urls_follow_dragonfly() {
        assert_eq!(
            task_url("https://example.com").unwrap(),
            "https://example.com"
        );
        assert_eq!(
            task_url("https://example.com/").unwrap(),
            "https://example.com"
        );
        assert_eq!(
            task_url("HTTPS://Example.COM:443/a/b.bin").unwrap(),
            "https://example.com/a/b.bin"
        );
        assert_eq!(
            task_url("http://h:8080/m.bin?X-Amz-Signature=abc&v=2&X-Amz-Date=1&ns=x").unwrap(),
            "http://h:8080/m.bin?v=2"
        );
        assert_eq!(
            task_url("http://h/m.bin?Expires=1&Signature=2").unwrap(),
            "http://h/m.bin"
        );
        assert_eq!(
            task_url("http://h/m.bin?a=b%20c&d=e+f").unwrap(),
            "http://h/m.bin?a=b+c&d=e+f"
        );
        // The id of a bare host is the id Dragonfly's own vectors give.
        assert_eq!(
            task_id("https://example.com/", Some("foo"), Some("bar"), None).unwrap(),
            "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca"
        );
        assert!(task_url("ftp://h/x").is_err());
        assert!(task_url("not a url").is_err());
    }

    #[test]
    fn content_ranges_parse() {
        assert_eq!(
            parse_content_range("bytes 0-0/100"),
            Some((Some((0, 0)), Some(100)))
        );
        assert_eq!(parse_content_range("bytes */0"), Some((None, Some(0))));
        assert_eq!(
            parse_content_range("bytes 5-9/*"),
            Some((Some((5, 9)), None))
        );
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes 0-x/2"), None);
    }

    #[test]
    fn headers_and_redirects_parse() {
        let (name, value) = parse_header("Authorization: Bearer x y").unwrap();
        assert_eq!(name, "authorization");
        assert_eq!(value, "Bearer x y");
        assert!(parse_header("no colon").is_err());
        assert!(parse_header("bad name: v").is_err());
        let base: Uri = "http://h:1/a/b.bin?q=1".parse().unwrap();
        assert_eq!(resolve(&base, "/c").unwrap(), "http://h:1/c");
        assert_eq!(resolve(&base, "d.bin").unwrap(), "http://h:1/a/d.bin");
        assert_eq!(resolve(&base, "https://o/x?y").unwrap(), "https://o/x?y");
        assert_eq!(resolve(&base, "//o2/z").unwrap(), "http://o2/z");
    }

    #[test]
    fn which_failures_are_retried() {
        let status = |code| OriginError::Status {
            url: String::new(),
            code,
            hint: "",
        };
        assert!(status(503).transient());
        assert!(status(429).transient());
        assert!(!status(404).transient());
        assert!(!OriginError::Changed {
            url: String::new(),
            what: String::new()
        }
        .transient());
        assert!(OriginError::ShortBody {
            url: String::new(),
            range: String::new(),
            received: 1,
            expected: 2
        }
        .transient());
    }
}
