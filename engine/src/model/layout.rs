//! The directory a model pull places: built whole in a temporary sibling, then renamed onto
//! the output path in one step, so a reader sees no model or all of it.
//!
//! - tar layers are unpacked first, entry by entry, each path checked: relative, no `..`,
//!   not under a link an earlier entry made, symlinks whose target stays inside the model,
//!   hard links to paths inside it; devices and FIFOs refused;
//! - raw layers are placed next at their `org.cncf.model.filepath` the way a single-file
//!   output is (hard link to the store's content where possible, else reflink or copy), each
//!   under a temporary name then renamed, so no write ever goes through a store file;
//! - `.modelpack/manifest.json` and `.modelpack/config.json` hold the artifact's manifest and
//!   config: a later pull of the same manifest digest finds it there and does nothing.
//!
//! An existing output directory is replaced (an atomic exchange, then the old one removed)
//! only when it is a model Ferry placed; anything else there is refused.

use super::spec::{self, Layer, LayerFormat};
use super::ModelError;
use crate::transfer::{OutputPolicy, OutputTarget, Placement};
use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
use std::collections::HashSet;
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const META_DIR: &str = ".modelpack";

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Syncs every directory of the tree (their entries), following no symlink.
fn sync_dirs(root: &Path) -> Result<(), ModelError> {
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(place_err(&dir, "listing"))? {
            let entry = entry.map_err(place_err(&dir, "listing"))?;
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(entry.path());
            }
        }
        sync_dir(&dir).map_err(place_err(&dir, "syncing"))?;
    }
    Ok(())
}

/// A layer whose content the store holds completely.
#[derive(Debug, Clone)]
pub struct HeldContent {
    pub layer: Layer,
    pub content: PathBuf,
}

/// What placing did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlaceOutcome {
    pub files: u32,
    pub bytes: u64,
    /// Raw layers placed by hard link (no bytes copied).
    pub hard_links: u32,
    /// An earlier model Ferry placed at the path was replaced.
    pub replaced: bool,
}

/// The manifest digest of the model Ferry placed at `dir`, if it is one.
pub fn placed_digest(dir: &Path) -> Option<String> {
    let bytes = std::fs::read(dir.join(META_DIR).join("manifest.json")).ok()?;
    Some(super::registry::sha256_digest(&bytes))
}

fn place_err(path: &Path, doing: &str) -> impl FnOnce(io::Error) -> ModelError {
    let path = path.to_owned();
    let doing = doing.to_owned();
    move |source| ModelError::Place {
        path,
        doing,
        source,
    }
}

/// Builds the model at a temporary sibling of `dir` and renames it onto `dir`. Blocking.
pub fn place_model(
    dir: &Path,
    layers: &[HeldContent],
    manifest: &[u8],
    config: &[u8],
    policy: &OutputPolicy,
) -> Result<PlaceOutcome, ModelError> {
    let parent = dir.parent().ok_or_else(|| {
        ModelError::OutputExists(dir.to_owned()) // a root path: never a model dir
    })?;
    let name = dir.file_name().expect("a checked path has a name");
    let replaced = match std::fs::symlink_metadata(dir) {
        Ok(_) if placed_digest(dir).is_some() => true,
        Ok(_) => return Err(ModelError::OutputExists(dir.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(place_err(dir, "looking at the output")(e)),
    };
    let tmp = parent.join(format!(
        ".{}.ferry-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&tmp).map_err(place_err(&tmp, "creating the temporary directory"))?;
    let built = build(&tmp, layers, manifest, config, policy).and_then(|mut outcome| {
        sync_dirs(&tmp)?;
        let flags = if replaced {
            RenameFlags::RENAME_EXCHANGE
        } else {
            RenameFlags::RENAME_NOREPLACE
        };
        renameat2(AT_FDCWD, &tmp, AT_FDCWD, dir, flags)
            .map_err(|e| place_err(dir, "renaming the model into place")(e.into()))?;
        sync_dir(parent).map_err(place_err(parent, "syncing"))?;
        outcome.replaced = replaced;
        Ok(outcome)
    });
    // On success `tmp` now holds the replaced model (or nothing); on failure, the partial one.
    if let Err(err) = std::fs::remove_dir_all(&tmp) {
        if err.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %tmp.display(), error = %err, "could not remove a temporary model directory");
        }
    }
    built
}

fn build(
    root: &Path,
    layers: &[HeldContent],
    manifest: &[u8],
    config: &[u8],
    policy: &OutputPolicy,
) -> Result<PlaceOutcome, ModelError> {
    let mut outcome = PlaceOutcome::default();
    for held in layers.iter().filter(|l| l.layer.format == LayerFormat::Tar) {
        let (files, bytes) = unpack_tar(root, held)?;
        outcome.files += files;
        outcome.bytes += bytes;
    }
    for held in layers.iter().filter(|l| l.layer.format == LayerFormat::Raw) {
        let placement = place_raw(root, held, policy)?;
        outcome.files += 1;
        outcome.bytes += held.layer.size;
        if placement == Placement::HardLink {
            outcome.hard_links += 1;
        }
    }
    let meta = root.join(META_DIR);
    std::fs::create_dir(&meta).map_err(place_err(&meta, "creating"))?;
    for (file, bytes) in [("manifest.json", manifest), ("config.json", config)] {
        let path = meta.join(file);
        std::fs::write(&path, bytes).map_err(place_err(&path, "writing"))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(place_err(&path, "syncing"))?;
    }
    Ok(outcome)
}

/// Creates the directories above a raw file, refusing to pass through a symlink (a tar layer
/// may have made one).
fn make_parents(root: &Path, relative: &str) -> Result<PathBuf, ModelError> {
    let mut dir = root.to_owned();
    let components: Vec<&str> = relative.split('/').collect();
    for component in &components[..components.len() - 1] {
        dir.push(component);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(ModelError::Place {
                    path: dir,
                    doing: "making the file's directory".into(),
                    source: io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "a file or link of a tar layer is there",
                    ),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(place_err(&dir, "creating"))?
            }
            Err(e) => return Err(place_err(&dir, "looking at")(e)),
        }
    }
    Ok(root.join(relative))
}

fn place_raw(
    root: &Path,
    held: &HeldContent,
    policy: &OutputPolicy,
) -> Result<Placement, ModelError> {
    let path = make_parents(root, &held.layer.filepath)?;
    if held.layer.size == 0 {
        // An empty blob is no task: nothing to link or copy.
        std::fs::File::create_new(&path).map_err(place_err(&path, "creating"))?;
        return Ok(Placement::Copy);
    }
    let target = OutputTarget::open(path.clone()).map_err(|e| ModelError::Place {
        path: path.clone(),
        doing: "opening its directory".into(),
        source: io::Error::other(e.to_string()),
    })?;
    crate::transfer::place(&held.content, held.layer.size, &target, policy).map_err(|e| {
        ModelError::Place {
            path,
            doing: "placing the layer".into(),
            source: io::Error::other(e.to_string()),
        }
    })
}

/// A tar entry's path as a checked relative path ("./" prefixes and a trailing "/" dropped);
/// `None` for the archive's root entry itself.
fn entry_path(raw: &[u8]) -> Result<Option<String>, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "not UTF-8".to_owned())?;
    let mut text = text.trim_end_matches('/');
    while let Some(rest) = text.strip_prefix("./") {
        text = rest;
    }
    if text.is_empty() || text == "." {
        return Ok(None);
    }
    spec::check_relative_path(text)?;
    Ok(Some(text.to_owned()))
}

/// Where a symlink at `link` (relative to the root) pointing at `target` lands, lexically;
/// an error when it is absolute or climbs out of the root.
fn link_stays_inside(link: &str, target: &str) -> Result<(), String> {
    if target.is_empty() || target.starts_with('/') {
        return Err(format!("a link to {target:?} (absolute or empty)"));
    }
    let mut depth: Vec<&str> = link.split('/').collect();
    depth.pop();
    for component in Path::new(target).components() {
        match component {
            Component::Normal(c) => depth.push(c.to_str().unwrap_or("?")),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return Err(format!("a link to {target:?}, outside the model"));
                }
            }
            _ => return Err(format!("a link to {target:?}")),
        }
    }
    Ok(())
}

fn under_link(path: &str, links: &HashSet<String>) -> bool {
    let mut prefix = String::new();
    for component in path.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(component);
        if prefix.len() < path.len() && links.contains(&prefix) {
            return true;
        }
    }
    false
}

/// Unpacks a tar layer at the root, every entry checked first. Returns files and bytes.
fn unpack_tar(root: &Path, held: &HeldContent) -> Result<(u32, u64), ModelError> {
    let digest = &held.layer.digest;
    let file = std::fs::File::open(&held.content).map_err(|source| ModelError::Read {
        path: held.content.clone(),
        source,
    })?;
    let mut archive = tar::Archive::new(file);
    archive.set_preserve_permissions(false);
    archive.set_unpack_xattrs(false);
    let bad_tar = |why: String| ModelError::BadLayer {
        digest: digest.clone(),
        why: format!("not a readable tar: {why}"),
    };
    let mut links = HashSet::new();
    let (mut files, mut bytes) = (0u32, 0u64);
    for entry in archive.entries().map_err(|e| bad_tar(e.to_string()))? {
        let mut entry = entry.map_err(|e| bad_tar(e.to_string()))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let unsafe_path = |why: String| ModelError::UnsafeTarPath {
            digest: digest.clone(),
            path: shown.clone(),
            why,
        };
        let Some(path) = entry_path(&raw_path).map_err(unsafe_path)? else {
            continue;
        };
        if under_link(&path, &links) {
            return Err(unsafe_path(
                "it lies under a link an earlier entry made".into(),
            ));
        }
        let kind = entry.header().entry_type();
        use tar::EntryType;
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::Directory => {}
            EntryType::Symlink | EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                if kind == EntryType::Symlink {
                    link_stays_inside(&path, &target).map_err(unsafe_path)?;
                    links.insert(path.clone());
                } else {
                    let target = entry_path(target.as_bytes())
                        .map_err(|w| unsafe_path(format!("a hard link to {target:?}: {w}")))?
                        .ok_or_else(|| unsafe_path("a hard link to the root".into()))?;
                    if under_link(&target, &links) || links.contains(&target) {
                        return Err(unsafe_path("a hard link through a symlink".into()));
                    }
                }
            }
            other => return Err(unsafe_path(format!("entry type {other:?} is not allowed"))),
        }
        let unpacked = entry
            .unpack_in(root)
            .map_err(place_err(&root.join(&path), "unpacking"))?;
        if !unpacked {
            return Err(unsafe_path("the tar reader refused it".into()));
        }
        if matches!(kind, EntryType::Regular | EntryType::Continuous) {
            // Durable before the rename publishes the directory, as raw layers are.
            let placed = root.join(&path);
            std::fs::File::open(&placed)
                .and_then(|f| f.sync_all())
                .map_err(place_err(&placed, "syncing"))?;
        }
        if kind != EntryType::Directory {
            files += 1;
            bytes += entry.size();
        }
    }
    Ok((files, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_stay_inside() {
        assert!(link_stays_inside("a/b", "../c").is_ok());
        assert!(link_stays_inside("a/b", "./x/../y").is_ok());
        assert!(link_stays_inside("a", "../x").is_err());
        assert!(link_stays_inside("a/b", "../../x").is_err());
        assert!(link_stays_inside("a", "/etc/passwd").is_err());
        let links: HashSet<String> = ["d/l".to_owned()].into();
        assert!(under_link("d/l/x", &links));
        assert!(!under_link("d/l", &links));
        assert!(!under_link("d/lx", &links));
        assert_eq!(entry_path(b"./a/b/").unwrap().as_deref(), Some("a/b"));
        assert_eq!(entry_path(b"./").unwrap(), None);
        assert!(entry_path(b"../x").is_err());
        assert!(entry_path(b"/abs").is_err());
        assert!(entry_path(b"a/../../b").is_err());
    }

    fn tar_with(entries: &[(&str, tar::EntryType, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, target) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(0o644);
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"data"
            } else {
                b""
            };
            header.set_size(data.len() as u64);
            // Bypass the builder's own path checks: the point is what a hostile tar holds.
            let name = header.as_old_mut().name.as_mut();
            name[..path.len()].copy_from_slice(path.as_bytes());
            if !target.is_empty() {
                let link = header.as_old_mut().linkname.as_mut();
                link[..target.len()].copy_from_slice(target.as_bytes());
            }
            header.set_cksum();
            builder.append(&header, data).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn unpack(bytes: Vec<u8>) -> (tempfile::TempDir, Result<(u32, u64), ModelError>) {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("layer.tar");
        std::fs::write(&content, bytes).unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let held = HeldContent {
            layer: Layer {
                digest: "sha256:x".into(),
                size: 0,
                media_type: spec::CODE_TAR.into(),
                format: LayerFormat::Tar,
                filepath: String::new(),
            },
            content,
        };
        let result = unpack_tar(&root, &held);
        (dir, result)
    }

    #[test]
    fn unpacks_safe_tars_and_refuses_hostile_ones() {
        use tar::EntryType::*;
        let (dir, ok) = unpack(tar_with(&[
            ("./code/", Directory, ""),
            ("code/run.py", Regular, ""),
            ("code/link", Symlink, "run.py"),
        ]));
        assert_eq!(ok.unwrap(), (2, 4));
        assert_eq!(
            std::fs::read(dir.path().join("root/code/run.py")).unwrap(),
            b"data"
        );
        for hostile in [
            vec![("../evil", Regular, "")],
            vec![("/abs", Regular, "")],
            vec![("a/../../evil", Regular, "")],
            vec![("l", Symlink, "/etc")],
            vec![("l", Symlink, "..")],
            vec![
                ("d/", Directory, ""),
                ("d/l", Symlink, "."),
                ("d/l/x", Regular, ""),
            ],
            vec![("h", Link, "../x")],
            vec![("fifo", Fifo, "")],
        ] {
            let (dir, result) = unpack(tar_with(&hostile));
            assert!(
                matches!(result, Err(ModelError::UnsafeTarPath { .. })),
                "{hostile:?}: {result:?}"
            );
            assert!(!dir.path().join("evil").exists());
        }
    }
}
