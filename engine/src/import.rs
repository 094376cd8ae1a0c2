//! Importing a local file as a task. Where the file and the data dir share a filesystem with
//! reflinks (XFS with reflink=1, btrfs), the task's content becomes a copy-on-write clone of
//! the file (no second copy on disk), and its pieces are then read back from the task's own
//! content to be digested and recorded as held. Elsewhere its bytes are read into pool
//! buffers, digested once, and written into the store through the same path as fetched
//! pieces. Either way every piece is hashed in content order into the task's manifest (its
//! SHA-256) as it goes.

use crate::geometry::{self, Geometry, GeometryError, TaskIdInputs};
use crate::io::PieceBuffer;
use crate::manifest::{ContentDigest, ContentHasher, Manifest, ManifestState};
use crate::store::{self, Cloned, Store, StoreError, StoredTask, WriterKind};
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Pieces read and written at once during an import.
const IMPORT_DEPTH: usize = 4;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    #[error("import path {0} is relative; give an absolute path")]
    RelativePath(String),
    #[error("cannot import {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot import {0}: not a regular file")]
    NotAFile(String),
    #[error("import path {0} contains '..'")]
    ParentDir(String),
    #[error("cannot import {0}: this daemon allows no imports (set import_dirs, or ferry serve --import-dir)")]
    ImportsDisabled(String),
    #[error("cannot import {path}: it resolves to {resolved}, outside the allowed import directories ({allowed})")]
    OutsideImportDirs {
        path: String,
        resolved: String,
        allowed: String,
    },
    #[error(transparent)]
    Geometry(#[from] GeometryError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("reading {path} failed: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} changed since its import began: piece {number} was held with crc32:{held}, the file now gives crc32:{now}; delete the task to import the new version")]
    Changed {
        path: String,
        number: u32,
        held: u32,
        now: u32,
    },
    #[error("task {task_id}: its manifest could not be read or written: {source}")]
    Manifest {
        task_id: String,
        source: std::io::Error,
    },
    #[error("task {task_id} is pinned here to content {pinned} (a transfer into it), but the file imported hashes to {file}: delete the task first to import this version")]
    ContentConflict {
        task_id: String,
        file: ContentDigest,
        pinned: ContentDigest,
    },
}

/// How an import got the file's bytes into the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMethod {
    /// The task's content is a reflink of the file: it shares the file's extents.
    Reflink,
    /// The pieces were read from the file and written into the task's content.
    Copy,
    /// The task held every piece already (the same file imported before).
    AlreadyHeld,
}

impl ImportMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            ImportMethod::Reflink => "reflink",
            ImportMethod::Copy => "copy",
            ImportMethod::AlreadyHeld => "already held",
        }
    }
}

impl std::fmt::Display for ImportMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A finished import.
pub struct Imported {
    pub task: Arc<StoredTask>,
    pub content_sha256: ContentDigest,
    pub method: ImportMethod,
}

/// What identifies the task besides the file (Dragonfly's task id inputs).
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    pub url: Option<String>,
    pub tag: Option<String>,
    pub application: Option<String>,
    pub revision: Option<String>,
    /// 0: the default for the file's length (and then not part of the task id).
    pub piece_length: u64,
}

/// Imports `path` into `store`; importing the same file again returns the held task. Any
/// file this process can read is allowed: for trusted, in-process callers.
pub async fn import_file(
    store: &Arc<Store>,
    path: &Path,
    options: &ImportOptions,
) -> Result<(Arc<StoredTask>, ContentDigest), ImportError> {
    if !path.is_absolute() {
        return Err(ImportError::RelativePath(path.display().to_string()));
    }
    let file = File::open(path).map_err(|source| ImportError::Open {
        path: path.display().to_string(),
        source,
    })?;
    let imported = import_opened(store, file, path, options).await?;
    Ok((imported.task, imported.content_sha256))
}

/// Imports `path` for a remote caller: only a regular file whose real path (every symlink
/// resolved) lies inside one of `allowed` (canonical directories) is read. The check is made
/// on the path and again on the file actually opened, so a symlink swapped in between does
/// not escape it.
pub async fn import_file_within(
    store: &Arc<Store>,
    path: &Path,
    allowed: &[PathBuf],
    options: &ImportOptions,
) -> Result<Imported, ImportError> {
    let shown = path.display().to_string();
    if !path.is_absolute() {
        return Err(ImportError::RelativePath(shown));
    }
    if allowed.is_empty() {
        return Err(ImportError::ImportsDisabled(shown));
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(ImportError::ParentDir(shown));
    }
    let open_error = |source| ImportError::Open {
        path: shown.clone(),
        source,
    };
    let outside = |resolved: &Path| ImportError::OutsideImportDirs {
        path: shown.clone(),
        resolved: resolved.display().to_string(),
        allowed: allowed
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    };
    let resolved = match path.canonicalize() {
        Ok(resolved) => resolved,
        // Outside the import dirs, a missing file is refused like any other: no probing
        // of what exists elsewhere.
        Err(_) if !allowed.iter().any(|dir| path.starts_with(dir)) => return Err(outside(path)),
        Err(err) => return Err(open_error(err)),
    };
    if !allowed.iter().any(|dir| resolved.starts_with(dir)) {
        return Err(outside(&resolved));
    }
    // O_NONBLOCK: opening a FIFO must not hang the request (it is then refused as not a
    // regular file); it changes nothing for regular files.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&resolved)
        .map_err(open_error)?;
    let opened =
        std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(open_error)?;
    if !allowed.iter().any(|dir| opened.starts_with(dir)) {
        return Err(outside(&opened));
    }
    import_opened(store, file, path, options).await
}

async fn import_opened(
    store: &Arc<Store>,
    file: File,
    path: &Path,
    options: &ImportOptions,
) -> Result<Imported, ImportError> {
    let shown = path.display().to_string();
    let meta = file.metadata().map_err(|source| ImportError::Open {
        path: shown.clone(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ImportError::NotAFile(shown));
    }
    let content_length = meta.len();
    let piece_length = match options.piece_length {
        0 => geometry::default_piece_length(content_length),
        set => geometry::validate_piece_length(set)?,
    };
    let url = options
        .url
        .clone()
        .unwrap_or_else(|| format!("file://{}", path.display()));
    let task_id = geometry::task_id(&TaskIdInputs {
        url: &url,
        tag: options.tag.as_deref(),
        application: options.application.as_deref(),
        revision: options.revision.as_deref(),
        piece_length: (options.piece_length != 0).then_some(piece_length),
    });
    let task = store.create_or_get(&task_id, Geometry::new(content_length, piece_length)?)?;
    let manifest_error = |source| ImportError::Manifest {
        task_id: task_id.clone(),
        source,
    };
    let manifest = task.manifest().map_err(manifest_error)?;
    if task.is_complete() {
        if let Some(manifest) = manifest.filter(|m| m.state == ManifestState::Verified) {
            return Ok(Imported {
                task,
                content_sha256: manifest.content_sha256,
                method: ImportMethod::AlreadyHeld,
            });
        }
    }
    // Every piece goes through the hasher in content order, as it is imported: the SHA-256
    // costs no extra read. Pieces already held (an import resumed after a crash) are read
    // for the hash only.
    let file = Arc::new(file);
    // The task's one writer while pieces are copied in (a transfer or import into it refused).
    let _writing = if task.is_complete() {
        None
    } else {
        Some(task.try_begin_writing(WriterKind::Import)?)
    };
    // A task holding no piece yet may become a reflink of the file; one holding some (an
    // import resumed after a crash) keeps them, and the rest is copied.
    let method = if task.is_complete() {
        ImportMethod::AlreadyHeld
    } else if task.held_count() > 0 {
        ImportMethod::Copy
    } else {
        match store.clone_content(&task, Arc::clone(&file)).await? {
            Cloned::Yes => ImportMethod::Reflink,
            Cloned::Unsupported(err) => {
                tracing::debug!(task_id = %task.id(), path = %shown, error = %err, "no reflink into the data dir: copying");
                ImportMethod::Copy
            }
        }
    };
    // A reflinked task's pieces are digested from its own content, a snapshot the file's
    // later changes do not reach; and the file must still have the length it was cloned at.
    let (file, shown) = if method == ImportMethod::Reflink {
        let now = file.metadata().map_err(|source| ImportError::Read {
            path: shown.clone(),
            source,
        })?;
        if now.len() != content_length {
            return Err(ImportError::Read {
                path: shown,
                source: std::io::Error::other(format!(
                    "it changed length while it was imported ({content_length} bytes, now {})",
                    now.len()
                )),
            });
        }
        let content = task.read_file().map_err(|source| ImportError::Read {
            path: task.content_path().display().to_string(),
            source,
        })?;
        (content, task.content_path().display().to_string())
    } else {
        (file, shown)
    };
    let mut hasher = ContentHasher::default();
    let mut running = std::collections::VecDeque::new();
    for piece in task.geometry().pieces() {
        if running.len() >= IMPORT_DEPTH {
            hasher = hash_next(&mut running, hasher).await?;
        }
        // The import budget may hold fewer than IMPORT_DEPTH pieces (a small pool, 64 MiB
        // pieces): waiting for a buffer while the pieces that hold them wait to be hashed
        // would never end, so the oldest is finished first.
        let buf = loop {
            let pool = store.pool();
            let budget = crate::io::Budget::Import;
            match pool.try_acquire_for(budget, piece.length) {
                Ok(Some(buf)) => break buf,
                Ok(None) if !running.is_empty() => {
                    hasher = hash_next(&mut running, hasher).await?;
                }
                Ok(None) => {
                    break pool
                        .acquire_for(budget, piece.length)
                        .await
                        .map_err(StoreError::Pool)?
                }
                Err(err) => return Err(StoreError::Pool(err).into()),
            }
        };
        let (store, task, file, shown) = (
            Arc::clone(store),
            Arc::clone(&task),
            Arc::clone(&file),
            shown.clone(),
        );
        running.push_back(tokio::spawn(async move {
            let (buf, read) = tokio::task::spawn_blocking(move || {
                let mut buf = buf;
                let read = store::read_range_into(&file, piece.offset, &mut buf);
                (buf, read)
            })
            .await
            .expect("read task panicked");
            read.map_err(|source| ImportError::Read {
                path: shown.clone(),
                source,
            })?;
            let crc = buf.crc32();
            if method == ImportMethod::Reflink {
                store.record_cloned_piece(&task, piece.number, crc).await?;
                return Ok(buf);
            }
            match task.held(piece.number) {
                Some(held) if held == crc => return Ok(buf),
                Some(held) => {
                    return Err(ImportError::Changed {
                        path: shown,
                        number: piece.number,
                        held,
                        now: crc,
                    })
                }
                None => {}
            }
            let (buf, written) = store.write_piece(&task, piece, buf, crc).await;
            written.map_err(ImportError::from)?;
            // Only a timed-out write keeps its buffer, and that is an error above.
            Ok(buf.expect("a written piece's buffer comes back"))
        }));
    }
    while !running.is_empty() {
        hasher = hash_next(&mut running, hasher).await?;
    }
    let content_sha256 = hasher.finish();
    if let Some(pinned) = manifest.filter(|m| m.content_sha256 != content_sha256) {
        // A transfer pinned another version of this task here (same url, other content):
        // the pieces just imported do not belong with the ones it fetched.
        return Err(ImportError::ContentConflict {
            task_id,
            file: content_sha256,
            pinned: pinned.content_sha256,
        });
    }
    task.set_manifest(Manifest {
        content_sha256,
        state: ManifestState::Verified,
    })
    .map_err(manifest_error)?;
    tracing::info!(task_id = %task.id(), path = %path.display(), bytes = content_length, pieces = task.geometry().piece_count(), %content_sha256, %method, "imported");
    Ok(Imported {
        task,
        content_sha256,
        method,
    })
}

type ImportedPiece = tokio::task::JoinHandle<Result<PieceBuffer, ImportError>>;

/// Waits for the oldest piece in flight and feeds it to the hasher (off the runtime).
async fn hash_next(
    running: &mut std::collections::VecDeque<ImportedPiece>,
    mut hasher: ContentHasher,
) -> Result<ContentHasher, ImportError> {
    let next = running.pop_front().expect("a piece in flight");
    let buf = next.await.expect("import task panicked")?;
    Ok(tokio::task::spawn_blocking(move || {
        for chunk in buf.chunks() {
            hasher.update(chunk);
        }
        hasher
    })
    .await
    .expect("hash task panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{BufferPool, IoChoice, IoEngine};
    use std::time::Duration;

    /// Was a hang: 16 MiB pieces from a 64 MiB pool, whose import budget (2 reserved + 6
    /// common slots of 4 MiB) holds two pieces, fewer than the import's depth of four. The
    /// third piece waited for a buffer that the first two held until they were hashed, which
    /// came only after the fourth was started.
    #[tokio::test]
    async fn an_import_budget_smaller_than_the_import_depth_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let pool = BufferPool::new(4 << 20, 16).unwrap();
        let io = IoEngine::start(&pool, IoChoice::Auto, 1).unwrap();
        let store = Arc::new(Store::open(&dir.path().join("store"), pool, io, false).unwrap());
        let path = dir.path().join("model.bin");
        let bytes: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let options = ImportOptions {
            piece_length: 16 << 20,
            ..Default::default()
        };
        let imported = tokio::time::timeout(
            Duration::from_secs(60),
            import_file(&store, &path, &options),
        )
        .await
        .expect("the import finishes");
        let (task, _) = imported.unwrap();
        assert_eq!(task.geometry().piece_count(), 4);
        assert!((0..4).all(|n| task.held(n).is_some()));
        assert_eq!(store.pool().free_slots(), 16, "every buffer went back");
    }
}
