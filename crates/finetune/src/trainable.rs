//! A `BertForSequenceClassification` whose weights are trainable variables, built from a
//! checkpoint, with the parts transformers would initialise fresh (the classifier, and the
//! pooler when a checkpoint has none) initialised as transformers does.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use bert::bert_embeddings::nn::SplitMix64;
use bert::lora::{is_lora_weight, PEFT_PREFIX};
use bert::{BertForSequenceClassification, Checkpoint, Config, LoraConfig, ModelFiles};
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
    /// Every weight, in the order the model asked for them (LoRA adapters' `A` and `B` too).
    pub params: Vec<Param>,
    /// The adapters' configuration, when training LoRA adapters.
    pub lora: Option<LoraConfig>,
}

impl TrainableClassifier {
    /// The trained variables.
    pub fn vars(&self) -> Vec<&Param> {
        self.params.iter().filter(|p| p.var.is_some()).collect()
    }

    /// Every weight of the plain model by name, as an HF checkpoint holds them: LoRA adapters
    /// are merged into their layers' weights (`W + scaling * B A`, PEFT's `merge_and_unload`).
    pub fn tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut tensors: HashMap<String, Tensor> = self
            .params
            .iter()
            .filter(|p| !is_lora_weight(&p.name))
            .map(|p| (p.name.clone(), p.current()))
            .collect();
        if let Some(lora) = &self.lora {
            let by_name: HashMap<&str, &Param> =
                self.params.iter().map(|p| (p.name.as_str(), p)).collect();
            for param in &self.params {
                let Some(module) = param.name.strip_suffix(".lora_A.weight") else {
                    continue;
                };
                let b = by_name
                    .get(bert::lora::lora_b_name(module).as_str())
                    .ok_or_else(|| Error::Setting(format!("{module}: lora_A without lora_B")))?;
                let weight_name = format!("{module}.weight");
                let weight = tensors
                    .get(&weight_name)
                    .ok_or_else(|| Error::Setting(format!("{module}: an adapter on no weight")))?;
                let delta = (b.current().matmul(&param.current())? * lora.scaling())?;
                let merged = (weight + delta.to_dtype(weight.dtype())?)?;
                tensors.insert(weight_name, merged);
            }
        }
        Ok(tensors)
    }

    /// What a PEFT adapter file holds: every `lora_A`/`lora_B` and the modules saved whole
    /// (the head), under PEFT's `base_model.model.` prefix. Empty without LoRA.
    pub fn adapter_tensors(&self) -> HashMap<String, Tensor> {
        let Some(lora) = &self.lora else {
            return HashMap::new();
        };
        self.params
            .iter()
            .filter(|p| is_lora_weight(&p.name) || lora.saves_whole(&p.name))
            .map(|p| (format!("{PEFT_PREFIX}{}", p.name), p.current()))
            .collect()
    }
}

impl Param {
    /// Its current value (the variable's, when trained).
    pub fn current(&self) -> Tensor {
        self.var
            .as_ref()
            .map_or_else(|| self.tensor.clone(), |v| v.as_tensor().clone())
    }
}

/// Which weights train.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Trainable {
    /// Every weight (full fine-tuning).
    #[default]
    All,
    /// Only the head (pooler and classifier); the encoder is frozen.
    HeadOnly,
    /// LoRA adapters on the targeted linear layers, plus the modules the configuration saves
    /// whole (the classifier); every base weight is frozen.
    Lora(Box<LoraConfig>),
}

impl Trainable {
    fn trains(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::HeadOnly => is_head(name),
            Self::Lora(lora) => is_lora_weight(name) || lora.saves_whole(name),
        }
    }
}

fn is_head(name: &str) -> bool {
    name.starts_with("classifier.") || name.contains("pooler.")
}

fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

/// Loads `files` as a trainable one-head classifier (`config` decides `num_labels`), in `dtype`
/// on `device`. Weights the checkpoint lacks are initialised only where transformers (or PEFT)
/// does so too: the classifier and the pooler get normal(0, initializer_range) weights and zero
/// biases; LoRA's `A` gets PEFT's kaiming-uniform (bound `1 / sqrt(in)`) and `B` zeros, so a
/// new adapter starts as the identity update. All from `seed`. Any other missing weight is an
/// error listing them. Adapters already in `files` (a resumed LoRA run) are read, not made.
pub fn load_trainable(
    files: &ModelFiles,
    config: &Config,
    trainable: Trainable,
    dtype: DType,
    device: &Device,
    seed: u64,
) -> Result<TrainableClassifier> {
    let checkpoint = Checkpoint::open(&files.weights)?;
    let lora = match &trainable {
        Trainable::Lora(lora) => {
            lora.validate().map_err(Error::Setting)?;
            Some((**lora).clone())
        }
        _ => None,
    };
    let backend = Builder {
        checkpoint: &checkpoint,
        trainable,
        std: config.initializer_range,
        rng: Mutex::new(SplitMix64(seed ^ 0x5EED_1417)),
        params: Mutex::new(Vec::new()),
        missing: Mutex::new(Vec::new()),
    };
    let vb = VarBuilder::from_backend(Box::new(&backend), dtype, device.clone());
    let model = BertForSequenceClassification::load(config, vb.clone()).and_then(|mut model| {
        if let Some(lora) = &lora {
            bert::lora::attach(&mut model, lora, &vb)?;
        }
        Ok(model)
    });
    drop(vb);
    let missing = backend.missing.into_inner().unwrap_or_default();
    if !missing.is_empty() {
        return Err(Error::Load(bert::Error::MissingTensors {
            path: checkpoint.origin().to_path_buf(),
            architecture: "BertForSequenceClassification",
            names: missing,
        }));
    }
    let model = model.map_err(bert::Error::from)?;
    let params = backend.params.into_inner().unwrap_or_default();
    if lora.is_some() {
        // A fresh pooler would train nowhere and be saved nowhere: PEFT keeps it frozen.
        if let Some(p) = params
            .iter()
            .find(|p| p.fresh && p.name.contains("pooler.") && !is_lora_weight(&p.name))
        {
            return Err(Error::Setting(format!(
                "LoRA needs a base with trained pooler weights; {} would be random and frozen",
                p.name
            )));
        }
    }
    Ok(TrainableClassifier {
        model,
        config: config.clone(),
        params,
        lora,
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
            None if is_lora_weight(name) => {
                // PEFT: kaiming_uniform_(A, a=sqrt(5)) (bound 1/sqrt(fan_in)), B = 0.
                let t = if name.ends_with(".lora_A.weight") {
                    let bound = 1.0 / (shape.dims()[1] as f64).sqrt();
                    let mut rng = self.rng.lock().map_err(|e| poisoned(e.to_string()))?;
                    let values: Vec<f32> = (0..shape.elem_count())
                        .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                        .collect();
                    Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?
                } else {
                    Tensor::zeros(shape, dtype, device)?
                };
                (t, true)
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
        let trains = self.trainable.trains(name);
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

/// Writes weights as `dir/file` (a `.safetensors` name), atomically (a temporary file renamed
/// into place after it is flushed to disk).
pub fn save_weights(tensors: &HashMap<String, Tensor>, dir: &Path, file: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    let contiguous: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&contiguous, &tmp)?;
    sync_file(&tmp)?;
    std::fs::rename(&tmp, dir.join(file)).map_err(|e| Error::io(dir, e))
}

/// Flushes a file's data to disk, so a rename after it never exposes a partial file.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}
