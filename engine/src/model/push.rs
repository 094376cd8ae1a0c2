//! `ferry push DIR oci://...`: a directory made a ModelPack artifact and pushed.
//!
//! Each regular file at the top of DIR is a raw layer at its name (media type by its kind:
//! weights, weight configs and tokenizers, docs, code); each subdirectory is one tar layer
//! (entries sorted, owners and times zeroed, so the same tree gives the same digest). The
//! config names the model (`descriptor.name`, `family`) and its `config` (`format`,
//! `architecture`, `precision`), guessed from `config.json` where present and overridable,
//! and lists the layers as `modelfs.diffIds`. Blobs already in the repository (HEAD) are not
//! sent again; the rest go up monolithically (POST, then PUT with the digest).

use super::layout::META_DIR;
use super::reference::Reference;
use super::registry::{sha256_digest, BlobContent, Registry, RegistryOptions};
use super::spec::{self, Descriptor, ImageManifest};
use super::ModelError;
use bytes::Bytes;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What the config says, where the user sets it (the rest is guessed).
#[derive(Debug, Clone, Default)]
pub struct ModelMeta {
    pub name: Option<String>,
    pub family: Option<String>,
    pub format: Option<String>,
    pub architecture: Option<String>,
    pub precision: Option<String>,
}

/// A blob to push: a file of the directory, or a tar built in a temporary file.
#[derive(Debug)]
pub struct PlannedLayer {
    pub descriptor: Descriptor,
    pub source: PathBuf,
    /// Holds the temporary tar until the push is done.
    _temp: Option<tempfile::TempPath>,
}

#[derive(Debug)]
pub struct Plan {
    pub layers: Vec<PlannedLayer>,
    pub config: Bytes,
    pub manifest: Bytes,
}

#[derive(Debug, Clone, Default)]
pub struct PushSummary {
    pub manifest_digest: String,
    pub layers: u32,
    pub uploaded: u32,
    pub skipped: u32,
    pub bytes_uploaded: u64,
    pub bytes_total: u64,
}

/// The media type of a file, by its name.
pub fn file_media_type(name: &str) -> &'static str {
    let lower = name.to_ascii_lowercase();
    let ext = lower.rsplit_once('.').map_or("", |(_, e)| e);
    const WEIGHTS: &[&str] = &[
        "safetensors",
        "bin",
        "pt",
        "pth",
        "ckpt",
        "gguf",
        "onnx",
        "h5",
        "msgpack",
        "npz",
        "pdparams",
        "tflite",
        "ggml",
    ];
    const CODE: &[&str] = &[
        "py", "sh", "ipynb", "js", "rs", "go", "c", "cc", "cpp", "cu",
    ];
    if WEIGHTS.contains(&ext) {
        spec::WEIGHT_RAW
    } else if CODE.contains(&ext) {
        spec::CODE_RAW
    } else if lower.starts_with("readme")
        || lower.starts_with("license")
        || lower.starts_with("notice")
        || ext == "md"
    {
        spec::DOC_RAW
    } else {
        // config.json, tokenizer.json, tokenizer.model, vocab.txt, merges.txt, ...
        spec::WEIGHT_CONFIG_RAW
    }
}

fn read_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError {
    let path = path.to_owned();
    move |source| ModelError::Read { path, source }
}

fn hash_file(path: &Path) -> Result<(String, u64), ModelError> {
    let mut file = std::fs::File::open(path).map_err(read_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(read_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(hasher.finalize())), size))
}

/// Sorted entries of a directory, without the `.modelpack` metadata and `.git`.
fn sorted_entries(dir: &Path) -> Result<Vec<(String, std::fs::Metadata)>, ModelError> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err(dir))? {
        let entry = entry.map_err(read_err(dir))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| ModelError::Read {
                path: dir.join(n),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    "a name that is not UTF-8",
                ),
            })?;
        if name == META_DIR || name == ".git" {
            continue;
        }
        let meta = entry.metadata().map_err(read_err(&entry.path()))?;
        entries.push((name, meta));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// A subdirectory as a deterministic tar: paths `<name>/...`, sorted, mode kept (0644 or
/// 0755), owners and times zero; symlinks kept as links.
fn tar_dir(root: &Path, name: &str, out: &Path) -> Result<bool, ModelError> {
    let file = std::fs::File::create(out).map_err(read_err(out))?;
    let mut builder = tar::Builder::new(std::io::BufWriter::new(file));
    let mut has_weights = false;
    let mut stack = vec![name.to_owned()];
    while let Some(relative) = stack.pop() {
        let path = root.join(&relative);
        let mut header = tar::Header::new_ustar();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        header.set_mtime(0);
        builder
            .append_data(&mut header, format!("{relative}/"), std::io::empty())
            .map_err(read_err(&path))?;
        let mut subdirs = Vec::new();
        for (child, meta) in sorted_entries(&path)? {
            let child_rel = format!("{relative}/{child}");
            let child_path = root.join(&child_rel);
            let ft = meta.file_type();
            let link_meta =
                std::fs::symlink_metadata(&child_path).map_err(read_err(&child_path))?;
            if link_meta.file_type().is_symlink() {
                let target = std::fs::read_link(&child_path).map_err(read_err(&child_path))?;
                let mut header = tar::Header::new_ustar();
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                header.set_mtime(0);
                builder
                    .append_link(&mut header, &child_rel, &target)
                    .map_err(read_err(&child_path))?;
            } else if ft.is_dir() {
                subdirs.push(child_rel);
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt;
                has_weights |= file_media_type(&child) == spec::WEIGHT_RAW;
                let mut header = tar::Header::new_ustar();
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                });
                header.set_size(meta.len());
                header.set_mtime(0);
                let file = std::fs::File::open(&child_path).map_err(read_err(&child_path))?;
                builder
                    .append_data(&mut header, &child_rel, file)
                    .map_err(read_err(&child_path))?;
            }
        }
        // Depth first, in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    builder
        .into_inner()
        .and_then(|mut w| std::io::Write::flush(&mut w))
        .map_err(read_err(out))?;
    Ok(has_weights)
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDescriptor {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    family: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigModelFs {
    r#type: &'static str,
    diff_ids: Vec<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    architecture: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    precision: Option<String>,
}

#[derive(Serialize)]
struct ModelConfig {
    descriptor: ConfigDescriptor,
    modelfs: ConfigModelFs,
    config: ConfigBody,
}

/// Fills what the user left unset from the directory: its name, and from `config.json`
/// (`model_type`, `architectures[0]`, `torch_dtype`), and the weights' format.
pub fn guess_meta(dir: &Path, given: &ModelMeta, weight_names: &[String]) -> ModelMeta {
    let hf: serde_json::Value = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
    let format = weight_names.iter().find_map(|n| {
        let lower = n.to_ascii_lowercase();
        let ext = lower.rsplit_once('.')?.1.to_owned();
        Some(
            match ext.as_str() {
                "safetensors" => "safetensors",
                "gguf" => "gguf",
                "onnx" => "onnx",
                "bin" | "pt" | "pth" | "ckpt" => "pytorch",
                other => return Some(other.to_owned()),
            }
            .to_owned(),
        )
    });
    ModelMeta {
        name: given.name.clone().or_else(|| {
            std::fs::canonicalize(dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        }),
        family: given.family.clone().or_else(|| text(&hf["model_type"])),
        format: given.format.clone().or(format),
        architecture: given
            .architecture
            .clone()
            .or_else(|| text(&hf["architectures"][0])),
        precision: given.precision.clone().or_else(|| text(&hf["torch_dtype"])),
    }
}

/// Builds the artifact: layers hashed (tars built), config and manifest serialized.
/// Blocking (it reads every byte).
pub fn plan(dir: &Path, given: &ModelMeta) -> Result<Plan, ModelError> {
    let mut layers = Vec::new();
    let mut weight_names = Vec::new();
    for (name, meta) in sorted_entries(dir)? {
        let path = dir.join(&name);
        let link = std::fs::symlink_metadata(&path).map_err(read_err(&path))?;
        if link.file_type().is_symlink() {
            return Err(ModelError::Read {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "a symlink at the top of the model directory (push its target instead)",
                ),
            });
        }
        let (media_type, source, temp) = if meta.is_file() {
            let media_type = file_media_type(&name);
            if media_type == spec::WEIGHT_RAW {
                weight_names.push(name.clone());
            }
            (media_type, path, None)
        } else if meta.is_dir() {
            let temp = tempfile::NamedTempFile::new()
                .map_err(read_err(&std::env::temp_dir()))?
                .into_temp_path();
            let weights = tar_dir(dir, &name, &temp)?;
            let media_type = if weights {
                spec::WEIGHT_TAR
            } else {
                spec::CODE_TAR
            };
            (media_type, temp.to_path_buf(), Some(temp))
        } else {
            continue;
        };
        let (digest, size) = hash_file(&source)?;
        layers.push(PlannedLayer {
            descriptor: Descriptor {
                media_type: media_type.to_owned(),
                digest,
                size,
                // The OCI title too, so generic clients (oras) name the files the same.
                annotations: Some(BTreeMap::from([
                    (spec::ANNOTATION_FILEPATH.to_owned(), name.clone()),
                    (spec::ANNOTATION_TITLE.to_owned(), name),
                ])),
                artifact_type: None,
                platform: None,
            },
            source,
            _temp: temp,
        });
    }
    if layers.is_empty() {
        return Err(ModelError::Read {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no files to push"),
        });
    }
    let meta = guess_meta(dir, given, &weight_names);
    let config = ModelConfig {
        descriptor: ConfigDescriptor {
            name: meta.name,
            family: meta.family,
        },
        modelfs: ConfigModelFs {
            r#type: "layers",
            diff_ids: layers.iter().map(|l| l.descriptor.digest.clone()).collect(),
        },
        config: ConfigBody {
            architecture: meta.architecture,
            format: meta.format,
            precision: meta.precision,
        },
    };
    let config = Bytes::from(serde_json::to_vec(&config).expect("a config serializes"));
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(spec::OCI_MANIFEST.into()),
        artifact_type: Some(spec::ARTIFACT_TYPE.into()),
        config: Descriptor {
            media_type: spec::CONFIG_MEDIA_TYPE.into(),
            digest: sha256_digest(&config),
            size: config.len() as u64,
            annotations: None,
            artifact_type: None,
            platform: None,
        },
        layers: layers.iter().map(|l| l.descriptor.clone()).collect(),
        annotations: None,
    };
    let manifest = Bytes::from(serde_json::to_vec(&manifest).expect("a manifest serializes"));
    Ok(Plan {
        layers,
        config,
        manifest,
    })
}

/// Pushes a planned artifact under `reference`'s tag (or its digest).
pub async fn push(
    plan: &Plan,
    reference: &Reference,
    options: RegistryOptions,
) -> Result<PushSummary, ModelError> {
    let registry = Registry::new(reference, true, options);
    let mut summary = PushSummary {
        layers: plan.layers.len() as u32,
        ..Default::default()
    };
    for layer in &plan.layers {
        let d = &layer.descriptor;
        summary.bytes_total += d.size;
        if registry
            .upload_blob(&d.digest, d.size, BlobContent::File(&layer.source))
            .await?
        {
            summary.uploaded += 1;
            summary.bytes_uploaded += d.size;
        } else {
            summary.skipped += 1;
        }
    }
    let config_digest = sha256_digest(&plan.config);
    registry
        .upload_blob(
            &config_digest,
            plan.config.len() as u64,
            BlobContent::Bytes(plan.config.clone()),
        )
        .await?;
    summary.manifest_digest = registry
        .put_manifest(
            reference.manifest_reference(),
            spec::OCI_MANIFEST,
            plan.manifest.clone(),
        )
        .await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_a_model_directory_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tiny-llama");
        std::fs::create_dir_all(root.join("code/sub")).unwrap();
        std::fs::write(root.join("model-00001.safetensors"), b"weights").unwrap();
        std::fs::write(
            root.join("config.json"),
            br#"{"model_type":"llama","architectures":["LlamaForCausalLM"],"torch_dtype":"bfloat16"}"#,
        )
        .unwrap();
        std::fs::write(root.join("tokenizer.json"), b"{}").unwrap();
        std::fs::write(root.join("README.md"), b"# hi").unwrap();
        std::fs::write(root.join("code/run.py"), b"print(1)").unwrap();
        std::fs::write(root.join("code/sub/util.py"), b"x=1").unwrap();
        let a = plan(&root, &ModelMeta::default()).unwrap();
        let b = plan(&root, &ModelMeta::default()).unwrap();
        assert_eq!(a.manifest, b.manifest, "same tree, same manifest");
        let types: Vec<(&str, &str)> = a
            .layers
            .iter()
            .map(|l| {
                (
                    l.descriptor.annotations.as_ref().unwrap()[spec::ANNOTATION_FILEPATH].as_str(),
                    l.descriptor.media_type.as_str(),
                )
            })
            .collect();
        assert_eq!(
            types,
            [
                ("README.md", spec::DOC_RAW),
                ("code", spec::CODE_TAR),
                ("config.json", spec::WEIGHT_CONFIG_RAW),
                ("model-00001.safetensors", spec::WEIGHT_RAW),
                ("tokenizer.json", spec::WEIGHT_CONFIG_RAW),
            ]
        );
        let config: serde_json::Value = serde_json::from_slice(&a.config).unwrap();
        assert_eq!(config["descriptor"]["name"], "tiny-llama");
        assert_eq!(config["descriptor"]["family"], "llama");
        assert_eq!(config["config"]["format"], "safetensors");
        assert_eq!(config["config"]["architecture"], "LlamaForCausalLM");
        assert_eq!(config["modelfs"]["diffIds"].as_array().unwrap().len(), 5);
        let manifest: ImageManifest = serde_json::from_slice(&a.manifest).unwrap();
        assert_eq!(spec::model_layers(&manifest).unwrap().len(), 5);
        let named = plan(
            &root,
            &ModelMeta {
                family: Some("qwen".into()),
                ..Default::default()
            },
        )
        .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&named.config).unwrap();
        assert_eq!(config["descriptor"]["family"], "qwen");
    }
}
