//! The models a daemon has pulled or preheated: one JSON record per manifest digest under
//! `data_dir/models/` (written to a temporary name, then renamed), naming each layer's task.
//! The layers' bytes are the store's tasks; a record says which tasks make a model.

use super::spec::Layer;
use super::ModelError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeldLayer {
    #[serde(flatten)]
    pub layer: Layer,
    pub task_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModelRecord {
    /// Every reference this manifest was pulled by (`oci://...:tag`, `...@sha256:`).
    pub references: Vec<String>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layers: Vec<HeldLayer>,
    /// Directories it was placed at.
    pub placed: Vec<String>,
    /// RFC 3339, of the last pull.
    pub pulled_at: String,
}

pub struct ModelRecords {
    dir: PathBuf,
}

impl ModelRecords {
    pub fn new(data_dir: &Path) -> ModelRecords {
        ModelRecords {
            dir: data_dir.join("models"),
        }
    }

    fn err(&self, path: &Path, source: std::io::Error) -> ModelError {
        ModelError::Record {
            path: path.to_owned(),
            source,
        }
    }

    fn path_of(&self, digest: &str) -> PathBuf {
        self.dir
            .join(format!("{}.json", digest.trim_start_matches("sha256:")))
    }

    /// Saves a record, merging the references and placements of an earlier one.
    pub fn save(&self, mut record: ModelRecord) -> Result<ModelRecord, ModelError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.err(&self.dir, e))?;
        if let Some(old) = self.load(&record.manifest_digest)? {
            for r in old.references {
                if !record.references.contains(&r) {
                    record.references.push(r);
                }
            }
            for p in old.placed {
                if !record.placed.contains(&p) {
                    record.placed.push(p);
                }
            }
        }
        let path = self.path_of(&record.manifest_digest);
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(&record).expect("a record serializes");
        std::fs::write(&tmp, text).map_err(|e| self.err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| self.err(&path, e))?;
        Ok(record)
    }

    pub fn load(&self, digest: &str) -> Result<Option<ModelRecord>, ModelError> {
        let path = self.path_of(digest);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                self.err(
                    &path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(&path, e)),
        }
    }

    /// Every record, newest pull first; unreadable ones are skipped with a warning.
    pub fn list(&self) -> Result<Vec<ModelRecord>, ModelError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&self.dir, e)),
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            match self.load(&format!("sha256:{hex}")) {
                Ok(Some(record)) => records.push(record),
                Ok(None) => {}
                Err(err) => tracing::warn!(error = %err, "skipping an unreadable model record"),
            }
        }
        records.sort_by(|a, b| b.pulled_at.cmp(&a.pulled_at));
        Ok(records)
    }

    /// A record by manifest digest, or by a reference it was pulled by.
    pub fn find(&self, what: &str) -> Result<Option<ModelRecord>, ModelError> {
        if let Ok(digest) = super::reference::parse_digest(what) {
            return self.load(&digest);
        }
        Ok(self
            .list()?
            .into_iter()
            .find(|r| r.references.iter().any(|x| x == what)))
    }
}
