//! The CNCF ModelPack spec (model-spec `specs-go/v1`) and the OCI image manifest and index it
//! rides on: media types, descriptors, and what each layer asks of a pull.

use super::reference::parse_digest;
use super::ModelError;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Component, Path};

pub const ARTIFACT_TYPE: &str = "application/vnd.cncf.model.manifest.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.cncf.model.config.v1+json";
pub const ANNOTATION_FILEPATH: &str = "org.cncf.model.filepath";
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Layer media types: `application/vnd.cncf.model.<kind>.v1.<format>`.
pub const WEIGHT_RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
pub const WEIGHT_TAR: &str = "application/vnd.cncf.model.weight.v1.tar";
pub const WEIGHT_CONFIG_RAW: &str = "application/vnd.cncf.model.weight.config.v1.raw";
pub const DOC_RAW: &str = "application/vnd.cncf.model.doc.v1.raw";
pub const CODE_RAW: &str = "application/vnd.cncf.model.code.v1.raw";
pub const CODE_TAR: &str = "application/vnd.cncf.model.code.v1.tar";

const LAYER_KINDS: &[&str] = &["weight", "weight.config", "doc", "code", "dataset"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ImageIndex {
    pub manifests: Vec<Descriptor>,
}

/// What a pull does with a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerFormat {
    /// The blob is one file, placed at its `org.cncf.model.filepath`.
    Raw,
    /// The blob is an uncompressed tar, unpacked at the model's root.
    Tar,
}

/// A layer as a pull will handle it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    pub format: LayerFormat,
    /// The file's path (raw) or the archived path (tar), relative to the model's root.
    pub filepath: String,
}

/// Picks the model manifest out of an index: one whose artifact type is ModelPack's, else
/// one with no platform, else the one for this host's platform.
pub fn choose_from_index(index: &ImageIndex) -> Option<&Descriptor> {
    let manifests = || {
        index
            .manifests
            .iter()
            .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST))
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    manifests()
        .find(|d| d.artifact_type.as_deref() == Some(ARTIFACT_TYPE))
        .or_else(|| manifests().find(|d| d.platform.is_none()))
        .or_else(|| {
            manifests().find(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == arch)
            })
        })
}

/// Checks a manifest is a ModelPack model and says what each layer is. Layers with the same
/// digest appear once per path; two layers claiming one path are refused.
pub fn model_layers(manifest: &ImageManifest) -> Result<Vec<Layer>, ModelError> {
    let is_model = manifest.artifact_type.as_deref() == Some(ARTIFACT_TYPE)
        || manifest.config.media_type == CONFIG_MEDIA_TYPE;
    if !is_model {
        return Err(ModelError::NotAModel(format!(
            "artifactType {:?} and config mediaType {:?}; a ModelPack model has artifactType {ARTIFACT_TYPE} or config {CONFIG_MEDIA_TYPE}",
            manifest.artifact_type.as_deref().unwrap_or(""),
            manifest.config.media_type
        )));
    }
    let mut paths = HashSet::new();
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for descriptor in &manifest.layers {
        let bad = |why: String| ModelError::BadLayer {
            digest: descriptor.digest.clone(),
            why,
        };
        parse_digest(&descriptor.digest).map_err(bad)?;
        let format = layer_format(&descriptor.media_type).map_err(bad)?;
        let filepath = descriptor
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_FILEPATH))
            .cloned()
            .unwrap_or_default();
        if format == LayerFormat::Raw {
            check_relative_path(&filepath).map_err(|why| {
                bad(format!(
                    "its {ANNOTATION_FILEPATH} annotation {filepath:?}: {why}"
                ))
            })?;
            if !paths.insert(filepath.clone()) {
                return Err(bad(format!("a second layer claims the path {filepath:?}")));
            }
        }
        layers.push(Layer {
            digest: descriptor.digest.clone(),
            size: descriptor.size,
            media_type: descriptor.media_type.clone(),
            format,
            filepath,
        });
    }
    Ok(layers)
}

fn layer_format(media_type: &str) -> Result<LayerFormat, String> {
    let rest = media_type
        .strip_prefix("application/vnd.cncf.model.")
        .ok_or_else(|| format!("media type {media_type:?} is not a ModelPack layer type"))?;
    let (kind, format) = rest
        .rsplit_once(".v1.")
        .ok_or_else(|| format!("media type {media_type:?} is not a ModelPack v1 layer type"))?;
    if !LAYER_KINDS.contains(&kind) {
        return Err(format!("media type {media_type:?}: unknown kind {kind:?}"));
    }
    match format {
        "raw" => Ok(LayerFormat::Raw),
        "tar" => Ok(LayerFormat::Tar),
        "tar+gzip" | "tar+zstd" => Err(format!(
            "media type {media_type:?}: compressed layers are not supported yet (only .raw and .tar)"
        )),
        other => Err(format!("media type {media_type:?}: unknown format {other:?}")),
    }
}

/// A path that stays inside the model's directory: relative, non-empty, no `..`, `.` or
/// empty components, no NUL.
pub fn check_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("empty path".into());
    }
    if path.contains('\0') {
        return Err("a NUL byte".into());
    }
    if path.starts_with('/') {
        return Err("an absolute path".into());
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("an empty, '.' or '..' component".into());
    }
    if Path::new(path)
        .components()
        .any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err("not a plain relative path".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(media_type: &str, path: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: media_type.into(),
            digest: format!("sha256:{}", "ab".repeat(32)),
            size: 1,
            annotations: path.map(|p| [(ANNOTATION_FILEPATH.to_owned(), p.to_owned())].into()),
            artifact_type: None,
            platform: None,
        }
    }

    fn manifest(layers: Vec<Descriptor>) -> ImageManifest {
        ImageManifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: layer(CONFIG_MEDIA_TYPE, None),
            layers,
            annotations: None,
        }
    }

    #[test]
    fn raw_layers_need_safe_unique_paths() {
        let ok = model_layers(&manifest(vec![
            layer(WEIGHT_RAW, Some("model-00001.safetensors")),
            layer(CODE_TAR, None),
            layer(WEIGHT_CONFIG_RAW, Some("sub/config.json")),
        ]))
        .unwrap();
        assert_eq!(ok[1].format, LayerFormat::Tar);
        assert_eq!(ok[2].filepath, "sub/config.json");
        for bad in ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a"] {
            let err = model_layers(&manifest(vec![layer(WEIGHT_RAW, Some(bad))])).unwrap_err();
            assert!(matches!(err, ModelError::BadLayer { .. }), "{bad}");
        }
        let err = model_layers(&manifest(vec![layer(WEIGHT_RAW, None)])).unwrap_err();
        assert!(matches!(err, ModelError::BadLayer { .. }));
        let dup = model_layers(&manifest(vec![
            layer(WEIGHT_RAW, Some("a")),
            layer(DOC_RAW, Some("a")),
        ]));
        assert!(matches!(dup, Err(ModelError::BadLayer { .. })));
    }

    #[test]
    fn refuses_non_models_and_unknown_layers() {
        let mut m = manifest(vec![]);
        m.artifact_type = None;
        m.config.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(matches!(model_layers(&m), Err(ModelError::NotAModel(_))));
        for bad in [
            "application/vnd.oci.image.layer.v1.tar",
            "application/vnd.cncf.model.weight.v1.tar+gzip",
            "application/vnd.cncf.model.bogus.v1.raw",
        ] {
            assert!(matches!(
                model_layers(&manifest(vec![layer(bad, Some("a"))])),
                Err(ModelError::BadLayer { .. })
            ));
        }
    }

    #[test]
    fn index_prefers_the_model_manifest() {
        let mut a = layer(OCI_MANIFEST, None);
        a.platform = Some(Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
        });
        let mut b = layer(OCI_MANIFEST, None);
        b.digest = format!("sha256:{}", "cd".repeat(32));
        let index = ImageIndex {
            manifests: vec![a, b.clone()],
        };
        assert_eq!(choose_from_index(&index), Some(&b));
    }
}
