//! LoRA adapters in PEFT's layout: `adapter_config.json` (PEFT's `LoraConfig`) and
//! `adapter_model.safetensors`, whose tensors are named as PEFT saves them
//! (`base_model.model.<module path>.lora_A.weight`, `...lora_B.weight`, plus whole copies of the
//! `modules_to_save`, such as `base_model.model.classifier.weight`).
//!
//! An adapter directory names its base model (`base_model_name_or_path`); [`ModelSource`]
//! resolves it, and [`crate::load()`] attaches the adapters to the base's linear layers and
//! merges them (`W + scaling * B A`), so inference costs what the plain model costs.
//!
//! [`ModelSource`]: crate::ModelSource

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bert_embeddings::nn::{Dropout, LoraAdapter, NamedLinears};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The adapter's configuration file.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// The adapter's weights.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT's `PeftModel` wrapper puts before every saved tensor name.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// PEFT's `LoraConfig` as stored in `adapter_config.json`: the fields this implementation acts
/// on, and the rest kept as they were read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// `"LORA"`.
    #[serde(default = "lora_type")]
    pub peft_type: String,
    /// PEFT's task type (`"SEQ_CLS"` for a pair classifier).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Rank of every adapter.
    pub r: usize,
    /// Scale numerator: updates are multiplied by `lora_alpha / r`.
    pub lora_alpha: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names (matched as the last components of a layer's path, as PEFT does).
    pub target_modules: TargetModules,
    /// Modules trained and saved whole (the classification head).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Which biases train: only `"none"` is supported.
    #[serde(default = "no_bias")]
    pub bias: String,
    /// Weights stored `[in, out]` (GPT-2's Conv1D); never for BERT.
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// rsLoRA: scale by `lora_alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (weight-decomposed LoRA): not supported.
    #[serde(default)]
    pub use_dora: bool,
    /// The base model the adapter was trained on: a shipped model name, a directory (relative
    /// to the adapter directory, or absolute), or `hf:ORG/NAME`.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Every other field of the file, kept so a rewrite loses nothing.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn lora_type() -> String {
    "LORA".into()
}

fn no_bias() -> String {
    "none".into()
}

/// PEFT's `target_modules`: a list of names, or a regular expression.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched against the ends of module paths.
    Names(Vec<String>),
    /// A regular expression over full module paths (not supported here).
    Pattern(String),
}

impl LoraConfig {
    /// A configuration for training: rank `r`, `alpha`, `dropout`, on `target_modules`, with
    /// the classification head saved whole, in the shape PEFT 0.21 writes.
    pub fn new(r: usize, alpha: f64, dropout: f64, target_modules: &[&str]) -> Self {
        let mut other = BTreeMap::new();
        other.insert("init_lora_weights".into(), serde_json::Value::Bool(true));
        other.insert("inference_mode".into(), serde_json::Value::Bool(true));
        other.insert("layers_to_transform".into(), serde_json::Value::Null);
        other.insert("layers_pattern".into(), serde_json::Value::Null);
        other.insert("rank_pattern".into(), serde_json::json!({}));
        other.insert("alpha_pattern".into(), serde_json::json!({}));
        Self {
            peft_type: lora_type(),
            task_type: Some("SEQ_CLS".into()),
            r,
            lora_alpha: alpha,
            lora_dropout: dropout,
            target_modules: TargetModules::Names(
                target_modules.iter().map(|s| s.to_string()).collect(),
            ),
            modules_to_save: Some(vec!["classifier".into(), "score".into()]),
            bias: no_bias(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            base_model_name_or_path: None,
            other,
        }
    }

    /// Reads and checks `dir/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(&path, format!("not a PEFT LoRA config: {e}")))?;
        config
            .validate()
            .map_err(|reason| Error::checkpoint(&path, reason))?;
        Ok(config)
    }

    /// Whether this implementation computes exactly what PEFT would with this configuration.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.peft_type != "LORA" {
            return Err(format!(
                "peft_type {:?}: only LORA adapters are supported",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return Err("r (the rank) must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() {
            return Err(format!("lora_alpha {} is not finite", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(format!(
                "lora_dropout {} is not in [0, 1)",
                self.lora_dropout
            ));
        }
        if self.bias != "none" {
            return Err(format!(
                "bias {:?}: only \"none\" (biases frozen) is supported",
                self.bias
            ));
        }
        if self.fan_in_fan_out || self.use_dora {
            return Err("fan_in_fan_out and use_dora are not supported".into());
        }
        if let TargetModules::Pattern(p) = &self.target_modules {
            return Err(format!(
                "target_modules is the pattern {p:?}; list the module names instead"
            ));
        }
        // Options that change what PEFT computes; each must be off (null, false or empty).
        for (key, what) in [
            ("rank_pattern", "per-module ranks"),
            ("alpha_pattern", "per-module alphas"),
            ("layers_to_transform", "adapting a subset of layers"),
            ("exclude_modules", "excluded modules"),
            ("layer_replication", "layer replication"),
            ("trainable_token_indices", "trainable token embeddings"),
            ("target_parameters", "adapters on parameters"),
            ("lora_bias", "a trained LoRA bias"),
            ("use_qalora", "QALoRA"),
            ("use_bdlora", "BD-LoRA"),
            ("alora_invocation_tokens", "activated LoRA"),
        ] {
            let on = self.other.get(key).is_some_and(|v| match v {
                serde_json::Value::Null | serde_json::Value::Bool(false) => false,
                serde_json::Value::Object(o) => !o.is_empty(),
                serde_json::Value::Array(a) => !a.is_empty(),
                _ => true,
            });
            if on {
                return Err(format!("{key} ({what}) is not supported"));
            }
        }
        Ok(())
    }

    /// The factor on `B A`: `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Whether `path` (a module path such as `bert.encoder.layer.0.attention.self.query`) gets
    /// an adapter: its name is a target (PEFT: the path equals it or ends with `.target`) and
    /// it is not a module saved whole.
    pub fn targets(&self, path: &str) -> bool {
        let matches = |name: &str| path == name || path.ends_with(&format!(".{name}"));
        let TargetModules::Names(names) = &self.target_modules else {
            return false;
        };
        names.iter().any(|n| matches(n))
            && !self
                .modules_to_save
                .iter()
                .flatten()
                .any(|m| matches(m) || path.starts_with(&format!("{m}.")))
    }

    /// Whether `name` (a weight path) belongs to a module saved whole with the adapter.
    pub fn saves_whole(&self, name: &str) -> bool {
        self.modules_to_save
            .iter()
            .flatten()
            .any(|m| name.starts_with(&format!("{m}.")) || name.contains(&format!(".{m}.")))
    }

    /// Writes the configuration as `dir/adapter_config.json` (pretty JSON, as PEFT does).
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// `{module}.lora_A.weight`: the name an adapter's `A` has, without PEFT's wrapper prefix.
pub fn lora_a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

/// `{module}.lora_B.weight`.
pub fn lora_b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// Whether a weight name is an adapter's `A` or `B`.
pub fn is_lora_weight(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// Attaches an adapter to every linear layer of `model` that `config` targets, reading
/// `{path}.lora_A.weight` (`[r, in]`) and `{path}.lora_B.weight` (`[out, r]`) from `vb`.
/// Returns how many layers got one; a configuration that targets none is an error.
pub fn attach<M: NamedLinears + ?Sized>(
    model: &mut M,
    config: &LoraConfig,
    vb: &VarBuilder,
) -> bert_embeddings::Result<usize> {
    let mut linears = Vec::new();
    model.named_linears("", &mut linears);
    let dropout = Dropout::new(config.lora_dropout)?;
    let mut attached = 0;
    for (path, linear) in linears {
        if !config.targets(&path) {
            continue;
        }
        let a = vb.get((config.r, linear.in_dim()), &lora_a_name(&path))?;
        let b = vb.get((linear.out_dim(), config.r), &lora_b_name(&path))?;
        linear.set_adapter(Some(LoraAdapter::new(a, b, config.scaling(), dropout)?))?;
        attached += 1;
    }
    if attached == 0 {
        return Err(bert_embeddings::Error::input(format!(
            "LoRA target_modules {:?} match no linear layer of the model",
            config.target_modules
        )));
    }
    Ok(attached)
}

/// Folds every attached adapter into its layer's weight (PEFT's `merge_and_unload`).
pub fn merge<M: NamedLinears + ?Sized>(model: &mut M) -> bert_embeddings::Result<()> {
    let mut linears = Vec::new();
    model.named_linears("", &mut linears);
    for (_, linear) in linears {
        linear.merge_adapter()?;
    }
    Ok(())
}

/// Whether `dir` holds a LoRA adapter (PEFT layout).
pub fn is_adapter_dir(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}

/// Where an adapter's base model is, as a model specification: `base_model_name_or_path`
/// taken relative to the adapter directory when it names a directory there, as written
/// otherwise.
pub fn base_spec(dir: &Path, config: &LoraConfig) -> Result<String> {
    let base = config.base_model_name_or_path.as_deref().ok_or_else(|| {
        Error::checkpoint(
            dir.join(ADAPTER_CONFIG),
            "no base_model_name_or_path: the adapter does not say which model it adapts",
        )
    })?;
    let relative: PathBuf = dir.join(base);
    if !Path::new(base).is_absolute() && relative.is_dir() {
        return Ok(relative.to_string_lossy().into_owned());
    }
    Ok(base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_path_ends_as_peft_does_and_skip_saved_modules() {
        let config = LoraConfig::new(4, 8.0, 0.0, &["query", "dense"]);
        assert!(config.targets("bert.encoder.layer.0.attention.self.query"));
        assert!(config.targets("bert.encoder.layer.3.output.dense"));
        assert!(config.targets("bert.pooler.dense"));
        assert!(!config.targets("bert.encoder.layer.0.attention.self.key"));
        // A name must match whole components: "dense" is not a suffix match of "xdense".
        assert!(!config.targets("bert.encoder.layer.0.xdense"));
        let mut head = LoraConfig::new(4, 8.0, 0.0, &["classifier", "query"]);
        assert!(
            !head.targets("classifier"),
            "a module saved whole gets no adapter"
        );
        head.modules_to_save = None;
        assert!(head.targets("classifier"));
        assert!(config.saves_whole("classifier.weight"));
        assert!(!config.saves_whole("bert.pooler.dense.weight"));
    }

    #[test]
    fn scaling_is_alpha_over_rank_or_its_root() {
        let mut config = LoraConfig::new(16, 32.0, 0.0, &["query"]);
        assert_eq!(config.scaling(), 2.0);
        config.use_rslora = true;
        assert_eq!(config.scaling(), 8.0);
    }

    #[test]
    fn written_configs_read_back_unchanged() {
        let mut config = LoraConfig::new(8, 16.0, 0.1, &["query", "value"]);
        config.base_model_name_or_path = Some("all-MiniLM-L6-v2".into());
        let back: LoraConfig = serde_json::from_str(&config.to_json_string()).unwrap();
        assert_eq!(back, config);
        assert!(back.validate().is_ok());
    }
}
