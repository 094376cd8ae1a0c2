//! A task's manifest: which version of a content a task holds.
//!
//! The geometry is fixed in `task.json` and every piece's CRC32 in the journal; the manifest
//! adds a SHA-256 of the whole content, so that two sources holding different contents under
//! the same task id (two checkpoints of one path, of one size) cannot both feed one receiver.
//! A seed computes it while importing; a receiver pins it when its transfer starts (from the
//! request's `--digest`, or from the first source that states one), fetches only from sources
//! that state the same one, and verifies the whole content against it before the task counts
//! as complete or any output appears.
//!
//! Stored as `tasks/<task id>/manifest.json`, written once per state (temp file, rename,
//! directory fsync).

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::str::FromStr;

const MANIFEST_FILE: &str = "manifest.json";
/// Read size when hashing a whole content file.
const HASH_READ_BYTES: usize = 8 << 20;

/// A SHA-256 of a whole content, written as Dragonfly writes digests: `sha256:<64 hex>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ContentDigest(pub [u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DigestParseError {
    #[error("digest {0:?} is not `sha256:<64 hex digits>` (only SHA-256 is supported)")]
    Malformed(String),
}

impl FromStr for ContentDigest {
    type Err = DigestParseError;

    fn from_str(text: &str) -> Result<ContentDigest, DigestParseError> {
        let malformed = || DigestParseError::Malformed(text.chars().take(80).collect());
        let hex_part = text.strip_prefix("sha256:").ok_or_else(malformed)?;
        if hex_part.len() != 64 || hex_part.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| malformed())?;
        Ok(ContentDigest(bytes))
    }
}

impl fmt::Display for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// How this daemon knows a task's content digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestState {
    /// A transfer fixed it before the content was complete: pieces are fetched only from
    /// sources that state it, and the content is verified against it once complete.
    Pinned,
    /// This daemon hashed the complete content itself (an import, or a transfer's final
    /// check) and got this digest.
    Verified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub content_sha256: ContentDigest,
    pub state: ManifestState,
}

#[derive(Serialize, Deserialize)]
struct ManifestFile {
    content_sha256: String,
    state: ManifestState,
}

/// The task's manifest, if it has one. A manifest that cannot be read or parsed is reported:
/// it must not silently turn into "no manifest", which would accept any source.
pub fn load(task_dir: &Path) -> io::Result<Option<Manifest>> {
    let path = task_dir.join(MANIFEST_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let file: ManifestFile = serde_json::from_slice(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    let content_sha256 = file.content_sha256.parse().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {e}", path.display()),
        )
    })?;
    Ok(Some(Manifest {
        content_sha256,
        state: file.state,
    }))
}

/// Writes the manifest durably (temp file, fsync, rename, directory fsync).
pub fn save(task_dir: &Path, manifest: &Manifest) -> io::Result<()> {
    let file = ManifestFile {
        content_sha256: manifest.content_sha256.to_string(),
        state: manifest.state,
    };
    let bytes = serde_json::to_vec_pretty(&file).expect("serializable");
    let path = task_dir.join(MANIFEST_FILE);
    let temp = task_dir.join(format!("{MANIFEST_FILE}.tmp"));
    {
        use std::io::Write as _;
        let mut out = File::create(&temp)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
    }
    std::fs::rename(&temp, &path)?;
    File::open(task_dir)?.sync_all()
}

/// SHA-256 over the content, fed in content order.
#[derive(Default, Clone)]
pub struct ContentHasher(Sha256);

impl ContentHasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> ContentDigest {
        ContentDigest(self.0.finalize().into())
    }
}

/// Hashes the first `length` bytes of `file` (blocking: call it off the async runtime).
pub fn hash_file(file: &File, length: u64) -> io::Result<ContentDigest> {
    let mut hasher = ContentHasher::default();
    let mut buf = vec![0u8; HASH_READ_BYTES.min(length as usize).max(1)];
    let mut at = 0u64;
    while at < length {
        let want = buf.len().min((length - at) as usize);
        let read = file.read_at(&mut buf[..want], at)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("content ends at {at} bytes, {length} expected"),
            ));
        }
        hasher.update(&buf[..read]);
        at += read as u64;
    }
    Ok(hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_parse_and_print_as_sha256_hex() {
        let text = format!("sha256:{}", "ab".repeat(32));
        let digest: ContentDigest = text.parse().unwrap();
        assert_eq!(digest.0, [0xAB; 32]);
        assert_eq!(digest.to_string(), text);
        for bad in [
            "ab".repeat(32),
            format!("sha512:{}", "ab".repeat(32)),
            format!("sha256:{}", "ab".repeat(31)),
            format!("sha256:{}", "AB".repeat(32)),
            format!("sha256:{}", "zz".repeat(32)),
        ] {
            assert!(bad.parse::<ContentDigest>().is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_a_file_matches_hashing_its_bytes_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..(9u32 << 20) + 7).map(|i| (i * 31) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        let mut hasher = ContentHasher::default();
        hasher.update(&bytes);
        assert_eq!(
            hash_file(&file, bytes.len() as u64).unwrap(),
            hasher.finish()
        );
        let err = hash_file(&file, bytes.len() as u64 + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_manifest_round_trips_and_a_corrupt_one_is_an_error_not_none() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let manifest = Manifest {
            content_sha256: ContentDigest([7; 32]),
            state: ManifestState::Pinned,
        };
        save(dir.path(), &manifest).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(manifest));
        std::fs::write(dir.path().join(MANIFEST_FILE), b"{\"content_sha256\": 3}").unwrap();
        assert_eq!(
            load(dir.path()).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
    }
}
