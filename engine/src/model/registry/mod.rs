//! An OCI distribution client for one repository: manifests (an index resolved to the model
//! manifest), small blobs (configs), blob existence, monolithic uploads, manifest pushes; and
//! the auth the spec describes: anonymous, then on a 401 either Basic with the credentials
//! or the token flow (`WWW-Authenticate: Bearer realm,service,scope` → `GET realm` with the
//! credentials as Basic → `Authorization: Bearer <token>`). The settled `Authorization` is
//! what layer transfers send with their Range requests to the blob URLs.

pub mod auth;
mod http;

pub use auth::{Challenge, Credentials};

use super::reference::Reference;
use super::spec::{self, ImageIndex, ImageManifest};
use super::ModelError;
use bytes::Bytes;
use http::{bytes_body, Answer, Body, Transport};
use http_body_util::BodyExt as _;
use hyper::header::{
    HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION,
    WWW_AUTHENTICATE,
};
use hyper::{Method, StatusCode, Uri};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const API_LIMIT: Duration = Duration::from_secs(60);
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// How to reach a registry.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `http://` instead of `https://` (a local registry).
    pub plain_http: bool,
    pub credentials: Option<Credentials>,
    /// TLS roots for `https://` registries.
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug, Clone)]
enum AuthState {
    Anonymous,
    Basic(String),
    Bearer(String),
}

/// A manifest as resolved: its digest (checked against its bytes) and content.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub digest: String,
    pub bytes: Bytes,
    pub manifest: ImageManifest,
}

pub struct Registry {
    base: String,
    registry: String,
    repository: String,
    push: bool,
    credentials: Option<Credentials>,
    transport: Transport,
    auth: Mutex<AuthState>,
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

impl Registry {
    /// A client for `reference`'s repository; `push` asks tokens for `pull,push`.
    pub fn new(reference: &Reference, push: bool, options: RegistryOptions) -> Registry {
        let scheme = if options.plain_http { "http" } else { "https" };
        Registry {
            base: format!("{scheme}://{}", reference.registry),
            registry: reference.registry.clone(),
            repository: reference.repository.clone(),
            push,
            credentials: options.credentials,
            transport: Transport {
                registry: reference.registry.clone(),
                tls: options.tls,
                connect_timeout: Duration::from_secs(10),
            },
            auth: Mutex::new(AuthState::Anonymous),
        }
    }

    /// The blob's URL: the origin its layer task is fetched from (and whose Dragonfly id
    /// is the task id).
    pub fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.repository)
    }

    /// `http(s)://HOST[:PORT]`
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The `Authorization` value settled so far (none while anonymous access works).
    pub fn authorization(&self) -> Option<String> {
        match &*self.auth.lock().expect("auth lock") {
            AuthState::Anonymous => None,
            AuthState::Basic(v) | AuthState::Bearer(v) => Some(v.clone()),
        }
    }

    fn protocol(&self, why: impl Into<String>) -> ModelError {
        ModelError::Protocol {
            registry: self.registry.clone(),
            why: why.into(),
        }
    }

    fn uri(&self, url: &str) -> Result<Uri, ModelError> {
        url.parse::<Uri>()
            .map_err(|e| self.protocol(format!("bad URL {url}: {e}")))
    }

    /// One API call, with the auth settled so far; a 401 settles it (once) and repeats the
    /// call. `body` is repeated too, so it is small.
    async fn call(
        &self,
        method: Method,
        url: &str,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Answer, ModelError> {
        let uri = self.uri(url)?;
        let mut answer = self.send(&method, &uri, headers, body.clone()).await?;
        if answer.status == StatusCode::UNAUTHORIZED {
            let challenge = answer
                .headers
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(Challenge::parse);
            if let Some(challenge) = challenge {
                self.settle(challenge).await?;
                answer = self.send(&method, &uri, headers, body).await?;
            }
        }
        Ok(answer)
    }

    async fn send(
        &self,
        method: &Method,
        uri: &Uri,
        headers: &[(HeaderName, HeaderValue)],
        body: Option<Bytes>,
    ) -> Result<Answer, ModelError> {
        let mut all = headers.to_vec();
        if let Some(value) = self.authorization() {
            all.push((AUTHORIZATION, self.header_value(&value)?));
        }
        let body = body.map_or_else(|| bytes_body(Bytes::new()), bytes_body);
        self.transport
            .exchange(method.clone(), uri, &all, body, API_LIMIT)
            .await
    }

    fn header_value(&self, text: &str) -> Result<HeaderValue, ModelError> {
        HeaderValue::from_str(text).map_err(|_| {
            ModelError::InvalidCredentials("they make an invalid HTTP header value".into())
        })
    }

    /// Answers a challenge: Basic with the credentials, or a token from the realm.
    async fn settle(&self, challenge: Challenge) -> Result<(), ModelError> {
        let state = match challenge {
            Challenge::Basic => match &self.credentials {
                Some(c) => AuthState::Basic(c.basic_header()),
                None => {
                    return Err(ModelError::Unauthorized {
                        registry: self.registry.clone(),
                        what: format!("repository {}", self.repository),
                        code: 401,
                    })
                }
            },
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                let wanted = if self.push { "pull,push" } else { "pull" };
                let scope = match scope {
                    Some(s) if !self.push => s,
                    _ => format!("repository:{}:{wanted}", self.repository),
                };
                let query = {
                    let mut query = form_urlencoded::Serializer::new(String::new());
                    if let Some(service) = &service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", &scope);
                    query.finish()
                };
                let sep = if realm.contains('?') { '&' } else { '?' };
                let url = format!("{realm}{sep}{query}");
                let uri = self.uri(&url)?;
                let mut headers = Vec::new();
                if let Some(c) = &self.credentials {
                    headers.push((AUTHORIZATION, self.header_value(&c.basic_header())?));
                }
                let answer = self
                    .transport
                    .exchange(
                        Method::GET,
                        &uri,
                        &headers,
                        bytes_body(Bytes::new()),
                        API_LIMIT,
                    )
                    .await?;
                if matches!(answer.status.as_u16(), 401 | 403) {
                    return Err(ModelError::Unauthorized {
                        registry: self.registry.clone(),
                        what: format!("a token for {scope}"),
                        code: answer.status.as_u16(),
                    });
                }
                if !answer.status.is_success() {
                    return Err(
                        self.status_error(&answer, format!("the token request for {scope}"))
                    );
                }
                let token = auth::token_from_answer(&answer.body)
                    .ok_or_else(|| self.protocol("the token endpoint's answer has no token"))?;
                AuthState::Bearer(format!("Bearer {token}"))
            }
        };
        *self.auth.lock().expect("auth lock") = state;
        Ok(())
    }

    fn status_error(&self, answer: &Answer, what: String) -> ModelError {
        let code = answer.status.as_u16();
        match code {
            401 | 403 => ModelError::Unauthorized {
                registry: self.registry.clone(),
                what,
                code,
            },
            404 => ModelError::NotFound {
                registry: self.registry.clone(),
                what,
            },
            _ => ModelError::Status {
                registry: self.registry.clone(),
                what,
                code,
                body: String::from_utf8_lossy(&answer.body[..answer.body.len().min(300)])
                    .into_owned(),
            },
        }
    }

    async fn manifest(&self, reference: &str) -> Result<(String, Answer), ModelError> {
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        let accept = HeaderValue::from_static(MANIFEST_ACCEPT);
        let answer = self
            .call(Method::GET, &url, &[(ACCEPT, accept)], None)
            .await?;
        if !answer.status.is_success() {
            return Err(
                self.status_error(&answer, format!("manifest {}:{reference}", self.repository))
            );
        }
        let digest = sha256_digest(&answer.body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_owned())
        } else {
            answer
                .headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .filter(|d| d.starts_with("sha256:"))
                .map(str::to_owned)
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(ModelError::DigestMismatch {
                    what: format!("manifest {}:{reference}", self.repository),
                    expected,
                    actual: digest,
                });
            }
        }
        Ok((digest, answer))
    }

    /// Resolves a reference to its image manifest, through an index where there is one.
    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, ModelError> {
        let (mut digest, mut answer) = self.manifest(reference.manifest_reference()).await?;
        let media_type = |a: &Answer| -> Option<String> {
            let header = a
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.split(';').next().unwrap_or("").trim().to_owned());
            #[derive(serde::Deserialize)]
            #[serde(rename_all = "camelCase")]
            struct Typed {
                media_type: Option<String>,
            }
            serde_json::from_slice::<Typed>(&a.body)
                .ok()
                .and_then(|t| t.media_type)
                .or(header)
        };
        if matches!(
            media_type(&answer).as_deref(),
            Some(spec::OCI_INDEX | spec::DOCKER_LIST)
        ) {
            let index: ImageIndex = serde_json::from_slice(&answer.body)
                .map_err(|e| self.protocol(format!("index {digest} is not valid JSON: {e}")))?;
            let chosen = spec::choose_from_index(&index).ok_or_else(|| {
                ModelError::NotAModel(format!(
                    "index {digest} has no model manifest (none with the ModelPack artifactType, none without a platform, none for this host's platform)"
                ))
            })?;
            (digest, answer) = self.manifest(&chosen.digest.clone()).await?;
        }
        let manifest: ImageManifest = serde_json::from_slice(&answer.body).map_err(|e| {
            self.protocol(format!("manifest {digest} is not an image manifest: {e}"))
        })?;
        Ok(Resolved {
            digest,
            bytes: answer.body,
            manifest,
        })
    }

    /// A small blob (a config), read whole and checked against its digest.
    pub async fn blob_bytes(&self, digest: &str) -> Result<Bytes, ModelError> {
        let mut url = self.blob_url(digest);
        for _ in 0..5 {
            let answer = self.call(Method::GET, &url, &[], None).await?;
            if answer.status.is_redirection() {
                let location = answer
                    .headers
                    .get(LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| self.protocol("a redirect without Location"))?;
                url = if location.starts_with('/') {
                    format!("{}{location}", self.base)
                } else {
                    location.to_owned()
                };
                continue;
            }
            if !answer.status.is_success() {
                return Err(self.status_error(&answer, format!("blob {digest}")));
            }
            let actual = sha256_digest(&answer.body);
            if actual != digest {
                return Err(ModelError::DigestMismatch {
                    what: format!("blob {digest}"),
                    expected: digest.to_owned(),
                    actual,
                });
            }
            return Ok(answer.body);
        }
        Err(self.protocol(format!("blob {digest}: too many redirects")))
    }

    /// Whether the repository already has a blob (`HEAD`).
    pub async fn blob_exists(&self, digest: &str) -> Result<bool, ModelError> {
        let answer = self
            .call(Method::HEAD, &self.blob_url(digest), &[], None)
            .await?;
        match answer.status.as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(self.status_error(&answer, format!("HEAD blob {digest}"))),
        }
    }

    /// Uploads a blob monolithically (`POST` an upload, `PUT` the bytes with `?digest=`),
    /// unless `HEAD` finds it there already. Returns whether bytes were sent.
    pub async fn upload_blob(
        &self,
        digest: &str,
        size: u64,
        content: BlobContent<'_>,
    ) -> Result<bool, ModelError> {
        if self.blob_exists(digest).await? {
            return Ok(false);
        }
        let start = format!("{}/v2/{}/blobs/uploads/", self.base, self.repository);
        let answer = self.call(Method::POST, &start, &[], None).await?;
        if answer.status != StatusCode::ACCEPTED {
            return Err(self.status_error(&answer, format!("starting the upload of {digest}")));
        }
        let location = answer
            .headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| self.protocol("an upload answer without Location"))?;
        let location = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location.to_owned()
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = self.uri(&format!("{location}{sep}digest={digest}"))?;
        let body: Body = match content {
            BlobContent::Bytes(bytes) => bytes_body(bytes),
            BlobContent::File(path) => file_body(path)?,
        };
        let mut headers = vec![
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (CONTENT_LENGTH, HeaderValue::from(size)),
        ];
        if let Some(value) = self.authorization() {
            headers.push((AUTHORIZATION, self.header_value(&value)?));
        }
        // Bounded by a floor rate of 10 MB/s plus a minute.
        let limit = API_LIMIT + Duration::from_secs(size / 10_000_000);
        let answer = self
            .transport
            .exchange(Method::PUT, &put, &headers, body, limit)
            .await?;
        if answer.status != StatusCode::CREATED {
            return Err(self.status_error(&answer, format!("uploading blob {digest}")));
        }
        Ok(true)
    }

    /// Pushes a manifest under a tag (or its digest); returns the digest.
    pub async fn put_manifest(
        &self,
        reference: &str,
        media_type: &'static str,
        bytes: Bytes,
    ) -> Result<String, ModelError> {
        let digest = sha256_digest(&bytes);
        let url = format!("{}/v2/{}/manifests/{reference}", self.base, self.repository);
        let headers = [(CONTENT_TYPE, HeaderValue::from_static(media_type))];
        let answer = self.call(Method::PUT, &url, &headers, Some(bytes)).await?;
        if answer.status != StatusCode::CREATED {
            return Err(self.status_error(&answer, format!("pushing manifest {reference}")));
        }
        Ok(digest)
    }
}

/// What an upload sends.
pub enum BlobContent<'a> {
    Bytes(Bytes),
    File(&'a Path),
}

/// A file's bytes as a streamed body, read in 1 MiB chunks on a blocking thread.
fn file_body(path: &Path) -> Result<Body, ModelError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Read {
        path: path.to_owned(),
        source,
    })?;
    let (tx, rx) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(4);
    std::thread::spawn(move || loop {
        let mut chunk = vec![0u8; 1 << 20];
        match file.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                chunk.truncate(n);
                if tx
                    .blocking_send(Ok(hyper::body::Frame::data(Bytes::from(chunk))))
                    .is_err()
                {
                    return;
                }
            }
            Err(err) => {
                let _ = tx.blocking_send(Err(err));
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    Ok(http_body_util::StreamBody::new(stream).boxed())
}
