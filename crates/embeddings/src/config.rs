//! A mirror of HF transformers' `BertConfig` (`config.json`).
//!
//! Defaults follow `transformers.BertConfig` and `PretrainedConfig`
//! (models/bert/configuration_bert.py, configuration_utils.py). Every field is validated on
//! parse, and a bad value is reported with the name it has in `config.json`. Fields this crate
//! does not interpret are kept in [`Config::extra`] so a config read and written back loses
//! nothing.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The activation named by `hidden_act` (HF's `ACT2FN`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `gelu`: the exact, erf-based GELU.
    Gelu,
    /// `gelu_new`: the tanh approximation (as in the original BERT code).
    GeluNew,
    /// `gelu_pytorch_tanh`: the same tanh approximation under PyTorch's name.
    GeluPytorchTanh,
    /// `relu`.
    Relu,
    /// `silu`.
    Silu,
    /// `swish`: HF's alias of SiLU.
    Swish,
}

impl HiddenAct {
    /// The name HF uses in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gelu => "gelu",
            Self::GeluNew => "gelu_new",
            Self::GeluPytorchTanh => "gelu_pytorch_tanh",
            Self::Relu => "relu",
            Self::Silu => "silu",
            Self::Swish => "swish",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" => Self::GeluNew,
            "gelu_pytorch_tanh" => Self::GeluPytorchTanh,
            "relu" => Self::Relu,
            "silu" => Self::Silu,
            "swish" => Self::Swish,
            _ => return None,
        })
    }
}

/// How positions enter the model (`position_embedding_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PositionEmbeddingType {
    /// A learned absolute position table added to the embeddings.
    Absolute,
    /// Shaw et al. relative positions: a learned distance table scored against the query.
    RelativeKey,
    /// Huang et al. relative positions: the distance table scored against query and key.
    RelativeKeyQuery,
}

impl PositionEmbeddingType {
    /// The name HF uses in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Absolute => "absolute",
            Self::RelativeKey => "relative_key",
            Self::RelativeKeyQuery => "relative_key_query",
        }
    }

    /// Whether attention uses a learned distance table.
    pub fn is_relative(self) -> bool {
        !matches!(self, Self::Absolute)
    }
}

/// What the classification head predicts (`problem_type`), which decides its loss and the
/// activation that turns logits into probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemType {
    /// One real value per input (MSE loss).
    Regression,
    /// Exactly one class per input (softmax, cross-entropy).
    SingleLabelClassification,
    /// Any number of classes per input (per-label sigmoid, BCE).
    MultiLabelClassification,
}

impl ProblemType {
    /// The name HF uses in `config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Regression => "regression",
            Self::SingleLabelClassification => "single_label_classification",
            Self::MultiLabelClassification => "multi_label_classification",
        }
    }
}

/// A validated BERT configuration, field for field HF's `BertConfig`.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Size of the WordPiece vocabulary (rows of the word embedding table).
    pub vocab_size: usize,
    /// Width of every hidden state.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer; divides `hidden_size`.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// Activation of the feed-forward layer and of the MLM transform.
    pub hidden_act: HiddenAct,
    /// Dropout on embeddings and on every residual branch.
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// Rows of the position table (the longest sequence the model accepts).
    pub max_position_embeddings: usize,
    /// Rows of the token-type (segment) table.
    pub type_vocab_size: usize,
    /// Standard deviation used to initialise new weights.
    pub initializer_range: f64,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    pub pad_token_id: Option<u32>,
    /// Absolute or relative positions.
    pub position_embedding_type: PositionEmbeddingType,
    /// Dropout before the classifier; `None` means `hidden_dropout_prob`.
    pub classifier_dropout: Option<f64>,
    /// Number of outputs of the classification head.
    pub num_labels: usize,
    /// Label names by class index (`id2label`).
    pub id2label: BTreeMap<usize, String>,
    /// Class index by label name (`label2id`).
    pub label2id: BTreeMap<String, usize>,
    /// The task of the classification head, when the checkpoint says.
    pub problem_type: Option<ProblemType>,
    /// Model classes the checkpoint was saved from (`architectures`).
    pub architectures: Vec<String>,
    /// Whether the MLM decoder shares the word-embedding matrix.
    pub tie_word_embeddings: bool,
    /// Every other field of `config.json`, kept verbatim.
    pub extra: Map<String, Value>,
}

impl Default for Config {
    /// `BertConfig()` of HF transformers: bert-base-uncased's shapes.
    fn default() -> Self {
        Self::from_json_value(Value::Object(Map::new())).expect("the defaults are valid")
    }
}

impl Config {
    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)?;
        Self::from_json_value(value)
    }

    /// Reads, parses and validates a `config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|err| {
            Error::config(
                "config.json",
                format!("cannot read {}: {err}", path.display()),
            )
        })?;
        Self::from_json_str(&text)
    }

    /// Parses and validates a JSON object holding a config.
    pub fn from_json_value(value: Value) -> Result<Self> {
        let Value::Object(mut map) = value else {
            return Err(Error::config("config.json", "expected a JSON object"));
        };
        let mut f = Fields(&mut map);
        // Always "bert" here; written back by `to_json_value`.
        f.take("model_type");

        let vocab_size = f.positive("vocab_size", 30522)?;
        let hidden_size = f.positive("hidden_size", 768)?;
        let num_hidden_layers = f.usize("num_hidden_layers", 12)?;
        let num_attention_heads = f.positive("num_attention_heads", 12)?;
        let intermediate_size = f.positive("intermediate_size", 3072)?;
        let hidden_act = match f.take("hidden_act") {
            None => HiddenAct::Gelu,
            Some(Value::String(name)) => HiddenAct::parse(&name).ok_or_else(|| {
                Error::config(
                    "hidden_act",
                    format!(
                        "unknown activation {name:?}; expected one of gelu, gelu_new, \
                         gelu_pytorch_tanh, relu, silu, swish"
                    ),
                )
            })?,
            Some(other) => return Err(wrong_type("hidden_act", "a string", &other)),
        };
        let hidden_dropout_prob = f
            .probability("hidden_dropout_prob", Some(0.1))?
            .unwrap_or(0.1);
        let attention_probs_dropout_prob = f
            .probability("attention_probs_dropout_prob", Some(0.1))?
            .unwrap_or(0.1);
        let max_position_embeddings = f.positive("max_position_embeddings", 512)?;
        let type_vocab_size = f.positive("type_vocab_size", 2)?;
        let initializer_range = f.f64("initializer_range", 0.02)?;
        let layer_norm_eps = f.f64("layer_norm_eps", 1e-12)?;
        if !(layer_norm_eps > 0.0 && layer_norm_eps.is_finite()) {
            return Err(Error::config(
                "layer_norm_eps",
                format!("must be a positive number, got {layer_norm_eps}"),
            ));
        }
        let pad_token_id = match f.take("pad_token_id") {
            None => Some(0),
            Some(Value::Null) => None,
            Some(v) => Some(
                as_usize("pad_token_id", &v)?
                    .try_into()
                    .map_err(|_| Error::config("pad_token_id", "does not fit in u32"))?,
            ),
        };
        if let Some(pad) = pad_token_id {
            if pad as usize >= vocab_size {
                return Err(Error::config(
                    "pad_token_id",
                    format!("{pad} is outside the vocabulary of {vocab_size} tokens"),
                ));
            }
        }
        let position_embedding_type = match f.take("position_embedding_type") {
            None | Some(Value::Null) => PositionEmbeddingType::Absolute,
            Some(Value::String(name)) => match name.as_str() {
                "absolute" => PositionEmbeddingType::Absolute,
                "relative_key" => PositionEmbeddingType::RelativeKey,
                "relative_key_query" => PositionEmbeddingType::RelativeKeyQuery,
                _ => {
                    return Err(Error::config(
                        "position_embedding_type",
                        format!(
                            "unknown type {name:?}; expected absolute, relative_key or \
                             relative_key_query"
                        ),
                    ))
                }
            },
            Some(other) => return Err(wrong_type("position_embedding_type", "a string", &other)),
        };
        let classifier_dropout = f.probability("classifier_dropout", None)?;

        let id2label = match f.take("id2label") {
            None | Some(Value::Null) => None,
            Some(Value::Object(entries)) => {
                let mut labels = BTreeMap::new();
                for (key, name) in entries {
                    let id: usize = key.parse().map_err(|_| {
                        Error::config("id2label", format!("key {key:?} is not a class index"))
                    })?;
                    let Value::String(name) = name else {
                        return Err(wrong_type("id2label", "string label names", &name));
                    };
                    labels.insert(id, name);
                }
                Some(labels)
            }
            Some(other) => return Err(wrong_type("id2label", "an object", &other)),
        };
        let explicit_num_labels = match f.take("num_labels") {
            None | Some(Value::Null) => None,
            Some(v) => Some(as_usize("num_labels", &v)?),
        };
        // HF: `id2label` decides the number of labels; `num_labels` only applies without it.
        let (num_labels, id2label) = match (id2label, explicit_num_labels) {
            (Some(labels), Some(n)) if labels.len() != n => {
                return Err(Error::config(
                    "num_labels",
                    format!("is {n} but id2label names {} labels", labels.len()),
                ))
            }
            (Some(labels), _) => (labels.len(), labels),
            (None, n) => {
                let n = n.unwrap_or(2);
                (n, (0..n).map(|i| (i, format!("LABEL_{i}"))).collect())
            }
        };
        if let Some(bad) = id2label.keys().find(|&&id| id >= num_labels) {
            return Err(Error::config(
                "id2label",
                format!("class index {bad} is not below the number of labels {num_labels}"),
            ));
        }
        let label2id = match f.take("label2id") {
            None | Some(Value::Null) => id2label.iter().map(|(i, n)| (n.clone(), *i)).collect(),
            Some(Value::Object(entries)) => {
                let mut ids = BTreeMap::new();
                for (name, id) in entries {
                    ids.insert(name, as_usize("label2id", &id)?);
                }
                ids
            }
            Some(other) => return Err(wrong_type("label2id", "an object", &other)),
        };
        let problem_type = match f.take("problem_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(name)) => Some(match name.as_str() {
                "regression" => ProblemType::Regression,
                "single_label_classification" => ProblemType::SingleLabelClassification,
                "multi_label_classification" => ProblemType::MultiLabelClassification,
                _ => {
                    return Err(Error::config(
                        "problem_type",
                        format!(
                            "unknown problem type {name:?}; expected regression, \
                             single_label_classification or multi_label_classification"
                        ),
                    ))
                }
            }),
            Some(other) => return Err(wrong_type("problem_type", "a string", &other)),
        };
        let architectures = match f.take("architectures") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(name) => Ok(name),
                    other => Err(wrong_type("architectures", "a list of strings", &other)),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(wrong_type("architectures", "a list", &other)),
        };
        let tie_word_embeddings = match f.take("tie_word_embeddings") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(wrong_type("tie_word_embeddings", "a boolean", &other)),
        };

        if hidden_size % num_attention_heads != 0 {
            return Err(Error::config(
                "num_attention_heads",
                format!(
                    "hidden_size {hidden_size} is not a multiple of num_attention_heads \
                     {num_attention_heads}"
                ),
            ));
        }

        Ok(Self {
            vocab_size,
            hidden_size,
            num_hidden_layers,
            num_attention_heads,
            intermediate_size,
            hidden_act,
            hidden_dropout_prob,
            attention_probs_dropout_prob,
            max_position_embeddings,
            type_vocab_size,
            initializer_range,
            layer_norm_eps,
            pad_token_id,
            position_embedding_type,
            classifier_dropout,
            num_labels,
            id2label,
            label2id,
            problem_type,
            architectures,
            tie_word_embeddings,
            extra: map,
        })
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The dropout applied before the classifier (`classifier_dropout`, else the hidden one).
    pub fn classifier_dropout_prob(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// The task of the classification head, inferred as transformers does when the config does
    /// not say: one label is regression, several are single-label classification.
    pub fn effective_problem_type(&self) -> ProblemType {
        self.problem_type.unwrap_or(if self.num_labels == 1 {
            ProblemType::Regression
        } else {
            ProblemType::SingleLabelClassification
        })
    }

    /// The config as HF writes `config.json`, unknown fields included.
    pub fn to_json_value(&self) -> Value {
        let mut map = self.extra.clone();
        let mut put = |key: &str, value: Value| {
            map.insert(key.to_string(), value);
        };
        if !self.architectures.is_empty() {
            put("architectures", self.architectures.clone().into());
        }
        put("model_type", "bert".into());
        put("vocab_size", self.vocab_size.into());
        put("hidden_size", self.hidden_size.into());
        put("num_hidden_layers", self.num_hidden_layers.into());
        put("num_attention_heads", self.num_attention_heads.into());
        put("intermediate_size", self.intermediate_size.into());
        put("hidden_act", self.hidden_act.as_str().into());
        put("hidden_dropout_prob", self.hidden_dropout_prob.into());
        put(
            "attention_probs_dropout_prob",
            self.attention_probs_dropout_prob.into(),
        );
        put(
            "max_position_embeddings",
            self.max_position_embeddings.into(),
        );
        put("type_vocab_size", self.type_vocab_size.into());
        put("initializer_range", self.initializer_range.into());
        put("layer_norm_eps", self.layer_norm_eps.into());
        put(
            "pad_token_id",
            self.pad_token_id.map_or(Value::Null, Value::from),
        );
        put(
            "position_embedding_type",
            self.position_embedding_type.as_str().into(),
        );
        put(
            "classifier_dropout",
            self.classifier_dropout.map_or(Value::Null, Value::from),
        );
        put(
            "id2label",
            Value::Object(
                self.id2label
                    .iter()
                    .map(|(i, n)| (i.to_string(), Value::from(n.clone())))
                    .collect(),
            ),
        );
        put(
            "label2id",
            Value::Object(
                self.label2id
                    .iter()
                    .map(|(n, i)| (n.clone(), Value::from(*i)))
                    .collect(),
            ),
        );
        if let Some(problem_type) = self.problem_type {
            put("problem_type", problem_type.as_str().into());
        }
        put("tie_word_embeddings", self.tie_word_embeddings.into());
        Value::Object(map)
    }

    /// The config as pretty-printed `config.json` text.
    pub fn to_json_string(&self) -> String {
        serde_json::to_string_pretty(&self.to_json_value()).expect("a JSON value always prints")
    }
}

impl serde::Serialize for Config {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        self.to_json_value().serialize(serializer)
    }
}

impl<'de> serde::Deserialize<'de> for Config {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(deserializer)?;
        Self::from_json_value(value).map_err(serde::de::Error::custom)
    }
}

/// Takes fields out of the JSON object one by one, so what is left is the "extra" fields.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn take(&mut self, key: &str) -> Option<Value> {
        self.0.remove(key)
    }

    fn usize(&mut self, key: &'static str, default: usize) -> Result<usize> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => as_usize(key, &v),
        }
    }

    fn positive(&mut self, key: &'static str, default: usize) -> Result<usize> {
        let n = self.usize(key, default)?;
        if n == 0 {
            return Err(Error::config(key, "must be at least 1"));
        }
        Ok(n)
    }

    fn f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.take(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| wrong_type(key, "a finite number", &v)),
        }
    }

    /// A dropout probability in [0, 1); `null` gives `None`.
    fn probability(&mut self, key: &'static str, default: Option<f64>) -> Result<Option<f64>> {
        let p = match self.take(key) {
            None => return Ok(default),
            Some(Value::Null) => return Ok(None),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| wrong_type(key, "a probability", &v))?,
        };
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(key, format!("must be in [0, 1), got {p}")));
        }
        Ok(Some(p))
    }
}

fn as_usize(key: &'static str, value: &Value) -> Result<usize> {
    value
        .as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| wrong_type(key, "a non-negative integer", value))
}

fn wrong_type(key: &'static str, expected: &str, got: &Value) -> Error {
    Error::config(key, format!("expected {expected}, got {got}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_mirror_bert_base() {
        let c = Config::default();
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.num_hidden_layers,
                c.num_attention_heads
            ),
            (30522, 768, 12, 12)
        );
        assert_eq!(c.intermediate_size, 3072);
        assert_eq!(c.hidden_act, HiddenAct::Gelu);
        assert_eq!(c.num_labels, 2);
        assert_eq!(c.id2label[&1], "LABEL_1");
        assert_eq!(c.label2id["LABEL_0"], 0);
        assert_eq!(c.layer_norm_eps, 1e-12);
        assert_eq!(c.pad_token_id, Some(0));
        assert!(c.tie_word_embeddings);
        assert_eq!(
            c.effective_problem_type(),
            ProblemType::SingleLabelClassification
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (json!({"hidden_act": "tanhh"}), "hidden_act"),
            (
                json!({"hidden_size": 100, "num_attention_heads": 12}),
                "num_attention_heads",
            ),
            (
                json!({"position_embedding_type": "rotary"}),
                "position_embedding_type",
            ),
            (json!({"problem_type": "ranking"}), "problem_type"),
            (json!({"hidden_size": "big"}), "hidden_size"),
            (json!({"vocab_size": 0}), "vocab_size"),
            (json!({"hidden_dropout_prob": 1.5}), "hidden_dropout_prob"),
            (json!({"layer_norm_eps": -1.0}), "layer_norm_eps"),
            (
                json!({"num_labels": 3, "id2label": {"0": "a", "1": "b"}}),
                "num_labels",
            ),
            (json!({"id2label": {"x": "a"}}), "id2label"),
            (json!({"pad_token_id": 40000}), "pad_token_id"),
        ];
        for (json, field) in cases {
            match Config::from_json_value(json.clone()) {
                Err(Error::Config { field: got, reason }) => {
                    assert_eq!(got, field, "{json}: {reason}");
                    let message = Error::config(got, reason).to_string();
                    assert!(message.contains(field), "{message}");
                }
                other => panic!("{json} should be rejected for {field}, got {other:?}"),
            }
        }
        assert!(matches!(
            Config::from_json_str("{not json"),
            Err(Error::ConfigJson(_))
        ));
        assert!(matches!(
            Config::from_json_str("[1, 2]"),
            Err(Error::Config {
                field: "config.json",
                ..
            })
        ));
    }

    #[test]
    fn labels_follow_transformers() {
        let c = Config::from_json_value(json!({"num_labels": 1})).unwrap();
        assert_eq!(c.num_labels, 1);
        assert_eq!(c.effective_problem_type(), ProblemType::Regression);
        let c = Config::from_json_value(json!({
            "id2label": {"0": "neg", "1": "neu", "2": "pos"},
            "problem_type": "multi_label_classification"
        }))
        .unwrap();
        assert_eq!(c.num_labels, 3);
        assert_eq!(c.label2id["pos"], 2);
        assert_eq!(
            c.effective_problem_type(),
            ProblemType::MultiLabelClassification
        );
    }

    #[test]
    fn round_trip_keeps_every_field() {
        let original = json!({
            "architectures": ["BertForSequenceClassification"],
            "hidden_size": 384, "num_attention_heads": 12, "hidden_act": "gelu_new",
            "position_embedding_type": "relative_key_query", "classifier_dropout": 0.2,
            "id2label": {"0": "LABEL_0"}, "problem_type": "regression",
            "gradient_checkpointing": false, "transformers_version": "4.8.2"
        });
        let c = Config::from_json_value(original).unwrap();
        assert_eq!(c.extra["transformers_version"], "4.8.2");
        let again = Config::from_json_str(&c.to_json_string()).unwrap();
        assert_eq!(c, again);
        let via_serde: Config = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(c, via_serde);
    }
}
