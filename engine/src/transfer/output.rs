//! The output side of a transfer: which paths a transfer may place a file at.

use super::TransferError;
use std::path::{Component, Path, PathBuf};

/// Checks an output path: absolute, no `..`, its directory existing and inside one of
/// the configured output directories (none configured: no output is placed anywhere).
pub fn check_output_path(
    output_dirs: &[PathBuf],
    data_dir: &Path,
    path: &Path,
) -> Result<PathBuf, TransferError> {
    if !path.is_absolute() {
        return Err(TransferError::InvalidArgument(format!(
            "output path {} is relative; give an absolute path",
            path.display()
        )));
    }
    if path.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(TransferError::InvalidArgument(format!(
            "output path {} contains '..'",
            path.display()
        )));
    }
    let name = path.file_name().ok_or_else(|| {
        TransferError::InvalidArgument(format!("output path {} names no file", path.display()))
    })?;
    let parent = path
        .parent()
        .expect("absolute path with a file name has a parent");
    let parent = parent.canonicalize().map_err(|e| {
        TransferError::InvalidArgument(format!(
            "output directory {} is not usable: {e}",
            parent.display()
        ))
    })?;
    if output_dirs.is_empty() {
        return Err(TransferError::PermissionDenied(format!(
            "output path {}: this daemon has no output directories; set output_dirs \
             (--output-dir) to let transfers place files",
            path.display()
        )));
    }
    if !output_dirs
        .iter()
        .any(|allowed| parent.starts_with(allowed))
    {
        let allowed: Vec<String> = output_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        return Err(TransferError::PermissionDenied(format!(
            "output path {} is outside the allowed output directories ({})",
            path.display(),
            allowed.join(", ")
        )));
    }
    if parent.starts_with(
        data_dir
            .canonicalize()
            .unwrap_or_else(|_| data_dir.to_owned()),
    ) {
        return Err(TransferError::PermissionDenied(format!(
            "output path {} is inside the daemon's data dir",
            path.display()
        )));
    }
    Ok(parent.join(name))
}
