//! `oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]` references, checked by the distribution
//! spec's grammar (repository path components, tag characters, a sha256 digest).

use super::ModelError;

/// A parsed reference. With both a tag and a digest the digest wins (the tag is kept for
/// display), as in `docker pull`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    /// `host[:port]`.
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Reference, ModelError> {
        let bad = |why: &str| ModelError::InvalidReference {
            reference: text.to_owned(),
            why: why.to_owned(),
        };
        let rest = text
            .strip_prefix("oci://")
            .ok_or_else(|| bad("it must start with oci://"))?;
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad("no repository after the registry"))?;
        if registry.is_empty()
            || !registry
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        {
            return Err(bad("the registry must be HOST or HOST:PORT"));
        }
        let (path, digest) = match path.split_once('@') {
            Some((path, digest)) => (path, Some(parse_digest(digest).map_err(|w| bad(&w))?)),
            None => (path, None),
        };
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag)),
            _ => (path, None),
        };
        if let Some(tag) = tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && tag
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !valid {
                return Err(bad(
                    "a tag is 1-128 of [A-Za-z0-9_.-], not starting with . or -",
                ));
            }
        }
        if repository.is_empty() || !repository.split('/').all(valid_component) {
            return Err(bad(
                "repository path components are lowercase [a-z0-9] separated by '.', '_', '__' or '-'",
            ));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some("latest".to_owned()),
            (tag, _) => tag.map(str::to_owned),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository: repository.to_owned(),
            tag,
            digest,
        })
    }

    /// What `GET /v2/<name>/manifests/<reference>` takes: the digest, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .expect("a reference has a tag or a digest")
    }

    /// The same repository at a digest.
    pub fn at_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_owned()),
            ..self.clone()
        }
    }
}

impl std::fmt::Display for Reference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "oci://{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// `sha256:<64 lowercase hex>`; other algorithms are refused (Ferry pins SHA-256 only).
pub fn parse_digest(text: &str) -> Result<String, String> {
    let hex = text
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {text:?} is not sha256:<hex>"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(format!("digest {text:?}: expected 64 lowercase hex digits"));
    }
    Ok(text.to_owned())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &component[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parses_tags_digests_and_ports() {
        let r = Reference::parse("oci://127.0.0.1:5000/models/llama-3:v1.0").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "models/llama-3");
        assert_eq!(r.tag.as_deref(), Some("v1.0"));
        assert_eq!(r.manifest_reference(), "v1.0");
        let r = Reference::parse(&format!("oci://reg.example/m@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), D);
        let r = Reference::parse("oci://localhost:5000/a/b").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.to_string(), "oci://localhost:5000/a/b:latest");
        let r = Reference::parse(&format!("oci://h/a:t@{D}")).unwrap();
        assert_eq!(r.manifest_reference(), D);
    }

    #[test]
    fn refuses_malformed_references() {
        for bad in [
            "http://h/a",
            "oci://h",
            "oci:///a",
            "oci://h/A",
            "oci://h/a//b",
            "oci://h/a:",
            "oci://h/a:.x",
            "oci://h/a@sha256:12",
            "oci://h/a@md5:0123",
            "oci://h/a-",
            "oci://h/a..b",
            "oci://h u/a",
        ] {
            assert!(
                matches!(
                    Reference::parse(bad),
                    Err(ModelError::InvalidReference { .. })
                ),
                "{bad}"
            );
        }
    }
}
