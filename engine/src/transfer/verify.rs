//! The end of a transfer: the complete content's SHA-256 held to the pin.

use super::*;

impl Engine {
    /// The complete content, hashed once (off the runtime) and held to the pin. On a mismatch
    /// the task is dropped whole: its pieces came from more than one version, or a source
    /// lied, and none of them may be served or placed.
    pub(super) async fn verify_content(
        &self,
        prepared: &PreparedTransfer,
        shared: &Shared,
    ) -> Result<ContentDigest, TransferError> {
        let task = &prepared.task;
        let manifest_error = |source| TransferError::Manifest {
            task_id: task.id().to_owned(),
            source,
        };
        let held = task.manifest().map_err(manifest_error)?;
        if let Some(held) = held.filter(|m| m.state == ManifestState::Verified) {
            return Ok(held.content_sha256);
        }
        let in_order = shared.hash.lock().expect("hash lock").take();
        let path = task.content_path();
        let length = task.geometry().content_length();
        let hashed = tokio::task::spawn_blocking(move || match in_order {
            // Fed while the pieces arrived: usually done already.
            Some(in_order) => in_order
                .finish()
                .map(|(digest, counts)| (digest, Some(counts))),
            None => manifest::hash_file(&std::fs::File::open(&path)?, length).map(|d| (d, None)),
        })
        .await
        .map_err(|err| TransferError::Internal {
            task_id: task.id().to_owned(),
            what: format!("hashing the content: {}", panic_message(err)),
        })?
        .map_err(|source| {
            TransferError::Store(StoreError::Io {
                context: format!("reading task {} to verify it", task.id()),
                source,
            })
        })?;
        let (actual, counts) = hashed;
        if let Some(counts) = counts {
            tracing::debug!(task_id = %task.id(), from_buffer = counts.from_buffer, read_back = counts.read_back, "content hashed as it arrived");
        }
        let pin = *shared.pin.lock().expect("pin lock");
        match pin {
            Some(expected) if expected != actual => {
                let unverified: Vec<&str> = prepared
                    .pinning
                    .without_manifest
                    .iter()
                    .map(|&i| prepared.source_names[i].as_str())
                    .collect();
                tracing::error!(task_id = %task.id(), %expected, %actual, "content does not match its pin; dropping the task");
                if let Err(err) = self.store.delete(task.id()) {
                    tracing::error!(task_id = %task.id(), error = %err, "dropping the mismatched task failed");
                }
                Err(TransferError::ContentMismatch {
                    task_id: task.id().to_owned(),
                    expected,
                    actual,
                    unverified: if unverified.is_empty() {
                        "none".into()
                    } else {
                        unverified.join(", ")
                    },
                })
            }
            _ => {
                task.set_manifest(Manifest {
                    content_sha256: actual,
                    state: ManifestState::Verified,
                })
                .map_err(manifest_error)?;
                Ok(actual)
            }
        }
    }
}
