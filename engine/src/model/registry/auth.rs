//! Registry credentials and the distribution spec's auth: a `WWW-Authenticate` challenge
//! (Basic, or Bearer with realm/service/scope for the token flow), credentials from
//! `USER:PASS` or the standard `~/.docker/config.json` (`auths.<host>.auth`, base64 of
//! `user:pass`, or `username`/`password`).

use super::super::ModelError;
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <password>)", self.username)
    }
}

impl Credentials {
    /// `USER:PASS` (the password may contain ':').
    pub fn parse(text: &str) -> Result<Credentials, ModelError> {
        match text.split_once(':') {
            Some((user, pass)) if !user.is_empty() => Ok(Credentials {
                username: user.to_owned(),
                password: pass.to_owned(),
            }),
            _ => Err(ModelError::InvalidCredentials(
                "expected USER:PASS with a non-empty user".into(),
            )),
        }
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// The credentials `~/.docker/config.json` (or `$DOCKER_CONFIG/config.json`) holds for a
/// registry; `Ok(None)` when the file or the entry is not there. Credential helpers
/// (`credsStore`, `credHelpers`) are not run.
pub fn docker_config_credentials(
    config: &Path,
    registry: &str,
) -> Result<Option<Credentials>, ModelError> {
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ModelError::Read {
                path: config.to_owned(),
                source,
            })
        }
    };
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: BTreeMap<String, Entry>,
    }
    let config_bad =
        |why: String| ModelError::InvalidCredentials(format!("{}: {why}", config.display()));
    let parsed: Config = serde_json::from_str(&text).map_err(|e| config_bad(e.to_string()))?;
    let key = |k: &str| {
        k.trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .trim_end_matches("/v1")
            .trim_end_matches("/v2")
            .to_owned()
    };
    let Some(entry) = parsed
        .auths
        .iter()
        .find(|(k, _)| key(k) == registry)
        .map(|(_, e)| e)
    else {
        return Ok(None);
    };
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|e| config_bad(format!("auths.{registry}.auth is not base64: {e}")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| config_bad(format!("auths.{registry}.auth is not UTF-8")))?;
        return Credentials::parse(&text).map(Some);
    }
    match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => Ok(Some(Credentials {
            username: u.clone(),
            password: p.clone(),
        })),
        _ => Ok(None),
    }
}

/// The default docker config path: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn default_docker_config() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&dir).join("config.json"));
    }
    std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker/config.json"))
}

/// A parsed `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

impl Challenge {
    pub fn parse(header: &str) -> Option<Challenge> {
        let header = header.trim();
        let (scheme, params) = header.split_once(' ').unwrap_or((header, ""));
        let params = parse_params(params);
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
            scope: params.get("scope").cloned(),
        })
    }
}

/// `k="v", k2=v2` (quoted values may contain commas and `\"`).
fn parse_params(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.peek().copied() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
    }
    out
}

/// The token in a token endpoint's answer (`token`, or OAuth2's `access_token`).
pub fn token_from_answer(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: Answer = serde_json::from_slice(body).ok()?;
    answer
        .token
        .filter(|t| !t.is_empty())
        .or(answer.access_token.filter(|t| !t.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        assert_eq!(
            Challenge::parse(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            Challenge::parse(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(Challenge::parse("Bearer service=x"), None);
        assert_eq!(Challenge::parse("Negotiate"), None);
        assert_eq!(
            token_from_answer(br#"{"access_token":"t1"}"#).as_deref(),
            Some("t1")
        );
        assert_eq!(
            token_from_answer(br#"{"token":"t2","access_token":"t1"}"#).as_deref(),
            Some("t2")
        );
        assert_eq!(token_from_answer(b"{}"), None);
    }

    #[test]
    fn reads_docker_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3:cret");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"https://127.0.0.1:5000/v1/":{{"auth":"{auth}"}},"other:1":{{"username":"bob","password":"pw"}}}}}}"#),
        )
        .unwrap();
        let c = docker_config_credentials(&path, "127.0.0.1:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3:cret")
        );
        let c = docker_config_credentials(&path, "other:1")
            .unwrap()
            .unwrap();
        assert_eq!(c.username, "bob");
        assert_eq!(docker_config_credentials(&path, "nope").unwrap(), None);
        assert_eq!(
            docker_config_credentials(&dir.path().join("x"), "a").unwrap(),
            None
        );
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            docker_config_credentials(&path, "a"),
            Err(ModelError::InvalidCredentials(_))
        ));
        assert!(Credentials::parse("nopass").is_err());
        assert_eq!(
            Credentials::parse("u:").unwrap().basic_header(),
            "Basic dTo="
        );
    }
}
