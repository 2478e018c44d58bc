//! A `BertForSequenceClassification` whose weights are trainable variables, built from a
//! checkpoint, with the parts transformers would initialise fresh (the classifier, and the
//! pooler when a checkpoint has none) initialised as transformers does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use bert::bert_embeddings::nn::SplitMix64;
use bert::{BertForSequenceClassification, Checkpoint, Config, ModelFiles};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};

/// One named weight of the model.
#[derive(Debug, Clone)]
pub struct Param {
    /// The name it has in an HF `BertForSequenceClassification` checkpoint.
    pub name: String,
    /// The variable, when it is trained; `None` for frozen weights.
    pub var: Option<Var>,
    /// The tensor the model computes with (the variable's tensor when trained).
    pub tensor: Tensor,
    /// Whether AdamW applies weight decay to it (not to biases and LayerNorm weights, as
    /// sentence-transformers and the transformers Trainer do).
    pub decay: bool,
    /// Whether it was initialised here rather than read from the checkpoint.
    pub fresh: bool,
}

/// A classifier ready to train, with all its weights by name.
#[derive(Debug, Clone)]
pub struct TrainableClassifier {
    /// The model; its trained weights are the variables in `params`.
    pub model: BertForSequenceClassification,
    /// Its configuration.
    pub config: Config,
    /// Every weight, in the order the model asked for them.
    pub params: Vec<Param>,
}

impl TrainableClassifier {
    /// The trained variables.
    pub fn vars(&self) -> Vec<&Param> {
        self.params.iter().filter(|p| p.var.is_some()).collect()
    }

    /// Every weight by name, as they would be saved.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.var
                        .as_ref()
                        .map_or_else(|| p.tensor.clone(), |v| v.as_tensor().clone()),
                )
            })
            .collect()
    }
}

/// Which weights train.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Trainable {
    /// Every weight (full fine-tuning).
    #[default]
    All,
    /// Only the head (pooler and classifier); the encoder is frozen.
    HeadOnly,
}

fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.contains("pooler.")
}

fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

/// Loads `files` as a trainable one-head classifier (`config` decides `num_labels`), in `dtype`
/// on `device`. Weights the checkpoint lacks are initialised only where transformers does so too
/// (the classifier, and the pooler): normal(0, initializer_range) weights, zero biases, from
/// `seed`. Any other missing weight is an error listing them.
pub fn load_trainable(
    files: &ModelFiles,
    config: &Config,
    trainable: Trainable,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<TrainableClassifier> {
    let checkpoint = Checkpoint::open(&files.weights)?;
    let backend = Builder {
        checkpoint: &checkpoint,
        trainable,
        std: config.initializer_range,
        rng: Mutex::new(SplitMix64(seed ^ 0x5EED_1417)),
        params: Mutex::new(Vec::new()),
        missing: Mutex::new(Vec::new()),
    };
    let vb = VarBuilder::from_backend(Box::new(&backend), dtype, device.clone());
    let model = BertForSequenceClassification::load(config, vb);
    let missing = backend.missing.into_inner().unwrap_or_default();
    if !missing.is_empty() {
        return Err(Error::Load(bert::Error::MissingTensors {
            path: checkpoint.origin().to_path_buf(),
            architecture: "BertForSequenceClassification",
            names: missing,
        }));
    }
    Ok(TrainableClassifier {
        model: model.map_err(bert::Error::from)?,
        config: config.clone(),
        params: backend.params.into_inner().unwrap_or_default(),
    })
}

/// Reads the model's weights from the checkpoint and wraps the trained ones in variables.
struct Builder<'a> {
    checkpoint: &'a Checkpoint,
    trainable: Trainable,
    std: f64,
    rng: Mutex<SplitMix64>,
    params: Mutex<Vec<Param>>,
    missing: Mutex<Vec<String>>,
}

impl Builder<'_> {
    fn fetch(
        &self,
        shape: &Shape,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let poisoned = |e: String| candle_core::Error::Msg(e);
        let (tensor, fresh) = match self.checkpoint.resolve(name) {
            Some(stored) => {
                let t = self
                    .checkpoint
                    .load_weight(&stored, Some(shape), dtype, device)
                    .map_err(candle_core::Error::wrap)?;
                (t, false)
            }
            None if is_head(name) => {
                let t = if name.ends_with(".weight") {
                    let mut rng = self.rng.lock().map_err(|e| poisoned(e.to_string()))?;
                    let values: Vec<f32> = (0..shape.elem_count())
                        .map(|_| (rng.next_normal() * self.std) as f32)
                        .collect();
                    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?
                } else {
                    Tensor::zeros(shape, dtype, device)?
                };
                (t, true)
            }
            None => {
                self.missing
                    .lock()
                    .map_err(|e| poisoned(e.to_string()))?
                    .push(name.to_string());
                return Tensor::zeros(shape, dtype, device);
            }
        };
        let trains = match self.trainable {
            Trainable::All => true,
            Trainable::HeadOnly => is_head(name),
        };
        let (var, tensor) = if trains {
            let var = Var::from_tensor(&tensor)?;
            let t = var.as_tensor().clone();
            (Some(var), t)
        } else {
            (None, tensor)
        };
        self.params
            .lock()
            .map_err(|e| poisoned(e.to_string()))?
            .push(Param {
                name: name.to_string(),
                var,
                tensor: tensor.clone(),
                decay: decays(name),
                fresh,
            });
        Ok(tensor)
    }
}

impl SimpleBackend for &Builder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(&s, name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: the trainable builder needs shapes")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.resolve(name).is_some()
    }
}

/// Writes weights as `model.safetensors` into `dir`, atomically (a temporary file renamed into
/// place after it is flushed to disk).
pub fn save_weights(tensors: &HashMap<String, Tensor>, dir: &Path) -> Result<()> {
    let tmp = dir.join(".model.safetensors.tmp");
    let contiguous: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&contiguous, &tmp)?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, dir.join("model.safetensors")).map_err(|e| Error::io(dir, e))
}

/// Flushes a file's data to disk, so a rename after it never exposes a partial file.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}
