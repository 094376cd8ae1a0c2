//! Importing a local file as a task: its bytes are read into pool buffers, digested once, and
//! written into the store through the same path as fetched pieces.

use crate::geometry::{self, Geometry, GeometryError, TaskIdInputs};
use crate::store::{self, Store, StoreError, StoredTask, WriterKind};
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
) -> Result<Arc<StoredTask>, ImportError> {
    if !path.is_absolute() {
        return Err(ImportError::RelativePath(path.display().to_string()));
    }
    let file = File::open(path).map_err(|source| ImportError::Open {
        path: path.display().to_string(),
        source,
    })?;
    import_opened(store, file, path, options).await
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
) -> Result<Arc<StoredTask>, ImportError> {
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
) -> Result<Arc<StoredTask>, ImportError> {
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
    let file = Arc::new(file);
    let missing: Vec<_> = task
        .geometry()
        .pieces()
        .filter(|p| task.held(p.number).is_none())
        .collect();
    // The task's one writer while pieces are copied in (a transfer or import into it refused).
    let _writing = match missing.is_empty() {
        true => None,
        false => Some(task.try_begin_writing(WriterKind::Import)?),
    };
    let mut running = tokio::task::JoinSet::new();
    for piece in missing {
        if running.len() >= IMPORT_DEPTH {
            running
                .join_next()
                .await
                .expect("non-empty")
                .expect("import task panicked")?;
        }
        let buf = store
            .pool()
            .acquire(piece.length)
            .await
            .map_err(StoreError::Pool)?;
        let (store, task, file, shown) = (
            Arc::clone(store),
            Arc::clone(&task),
            Arc::clone(&file),
            shown.clone(),
        );
        running.spawn(async move {
            let (buf, read) = tokio::task::spawn_blocking(move || {
                let mut buf = buf;
                let read = store::read_range_into(&file, piece.offset, &mut buf);
                (buf, read)
            })
            .await
            .expect("read task panicked");
            read.map_err(|source| ImportError::Read {
                path: shown,
                source,
            })?;
            let crc = buf.crc32();
            let (_buf, written) = store.write_piece(&task, piece, buf, crc).await;
            written.map_err(ImportError::from)
        });
    }
    while let Some(done) = running.join_next().await {
        done.expect("import task panicked")?;
    }
    tracing::info!(task_id = %task.id(), path = %shown, bytes = content_length, pieces = task.geometry().piece_count(), "imported");
    Ok(task)
}
