//! Loading a model: which files make a checkpoint, and building any BERT architecture from them.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use bert_embeddings::nn::NamedLinears;
use bert_embeddings::Config;
use bert_encoder::SelfAttentions;
use bert_heads::{
    BertForMaskedLM, BertForNextSentencePrediction, BertForPreTraining,
    BertForSequenceClassification, BertModel,
};

use crate::checkpoint::{Checkpoint, LoadReport, WeightFiles};
use crate::error::{Error, Result};

/// The files of a model on local disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The directory they came from.
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// The weight files, in load order.
    pub weights: WeightFiles,
    /// `tokenizer.json`, when the model ships one.
    pub tokenizer: Option<PathBuf>,
    /// A LoRA adapter directory (PEFT layout) applied on top of these weights.
    pub adapter: Option<PathBuf>,
}

impl ModelFiles {
    /// The files of an HF-layout model directory (`config.json` + weights, optionally
    /// `tokenizer.json`).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::checkpoint(dir, "not a directory"));
        }
        if crate::lora::is_adapter_dir(dir) {
            return Err(Error::checkpoint(
                dir,
                "a LoRA adapter, not a whole model: load it as a model source (which finds its \
                 base), or add it to its base's files with ModelFiles::with_adapter",
            ));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(Error::checkpoint(dir, "no config.json"));
        }
        let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights: WeightFiles::find_in(dir)?,
            tokenizer,
            adapter: None,
        })
    }

    /// Puts the LoRA adapter in `dir` (PEFT layout) on top of these files: its weights are read
    /// after the base ones (the head it saves whole replaces the base's), its `config.json`
    /// (the trained classifier's) and tokenizer replace the base's when it has them.
    pub fn with_adapter(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        crate::lora::LoraConfig::from_dir(dir)?;
        let weights = dir.join(crate::lora::ADAPTER_WEIGHTS);
        if !weights.is_file() {
            return Err(Error::checkpoint(
                dir,
                format!("no {}", crate::lora::ADAPTER_WEIGHTS),
            ));
        }
        self.weights.paths.push(weights);
        if dir.join("config.json").is_file() {
            self.config = dir.join("config.json");
        }
        if dir.join("tokenizer.json").is_file() {
            self.tokenizer = Some(dir.join("tokenizer.json"));
        }
        self.adapter = Some(dir.to_path_buf());
        Ok(self)
    }

    /// Adds weight files read after the base ones (a trained head on top of base weights);
    /// their tensors take precedence over same-named base tensors.
    pub fn with_extra_weights(mut self, path: impl Into<PathBuf>) -> Self {
        self.weights.paths.push(path.into());
        self
    }

    /// Uses another `config.json` (for example one that adds a classification head).
    pub fn with_config(mut self, path: impl Into<PathBuf>) -> Self {
        self.config = path.into();
        self
    }

    /// Parses the config.
    pub fn read_config(&self) -> Result<Config> {
        Ok(Config::from_file(&self.config)?)
    }
}

/// A BERT model class that can be built from a checkpoint (and carry LoRA adapters).
pub trait Architecture: Sized + NamedLinears + SelfAttentions {
    /// The transformers class name.
    const NAME: &'static str;

    /// Builds the model from `vb`, which resolves names against `checkpoint`.
    fn build(
        config: &Config,
        vb: VarBuilder,
        checkpoint: &Checkpoint,
    ) -> bert_embeddings::Result<Self>;
}

impl Architecture for BertModel {
    const NAME: &'static str = "BertModel";

    /// Loads the pooler when the checkpoint has one (a `BertForMaskedLM` checkpoint does not).
    fn build(
        config: &Config,
        vb: VarBuilder,
        checkpoint: &Checkpoint,
    ) -> bert_embeddings::Result<Self> {
        let has_pooler = checkpoint.resolve("pooler.dense.weight").is_some();
        BertModel::load(config, vb, has_pooler)
    }
}

macro_rules! architecture {
    ($ty:ident) => {
        impl Architecture for $ty {
            const NAME: &'static str = stringify!($ty);

            fn build(
                config: &Config,
                vb: VarBuilder,
                _: &Checkpoint,
            ) -> bert_embeddings::Result<Self> {
                $ty::load(config, vb)
            }
        }
    };
}

architecture!(BertForSequenceClassification);
architecture!(BertForMaskedLM);
architecture!(BertForNextSentencePrediction);
architecture!(BertForPreTraining);

/// A loaded model with its config and what loading left unused.
#[derive(Debug, Clone)]
pub struct Loaded<M> {
    /// The model.
    pub model: M,
    /// Its configuration.
    pub config: Config,
    /// Tensors of the checkpoint the architecture did not use.
    pub report: LoadReport,
    /// The files it was read from.
    pub files: ModelFiles,
}

/// Loads architecture `M` from `files`, converting weights to `dtype` on `device`, for
/// inference. A LoRA adapter among the files is attached and merged into the weights. On the
/// CPU each attention block's query, key and value become one projection
/// ([`BertSelfAttention::fuse_qkv`]) and the linear layers' weights are stored transposed
/// ([`Linear::use_inference_layout`]), the layout the CPU kernel multiplies by in place. On
/// CUDA the projections are fused too, for the GPU attention kernel.
///
/// [`Linear::use_inference_layout`]: bert_embeddings::nn::Linear::use_inference_layout
/// [`BertSelfAttention::fuse_qkv`]: bert_encoder::BertSelfAttention::fuse_qkv
pub fn load<M: Architecture>(
    files: &ModelFiles,
    dtype: DType,
    device: &Device,
) -> Result<Loaded<M>> {
    let config = files.read_config()?;
    let lora = files
        .adapter
        .as_deref()
        .map(crate::lora::LoraConfig::from_dir)
        .transpose()?;
    let checkpoint = Checkpoint::open(&files.weights)?;
    let (model, report) = checkpoint.build(M::NAME, dtype, device, |vb| {
        let mut model = M::build(&config, vb.clone(), &checkpoint)?;
        if let Some(lora) = &lora {
            crate::lora::attach(&mut model, lora, &vb)?;
            crate::lora::merge(&mut model)?;
        }
        if device.is_cpu() {
            // Layout first: fusing then turns query, key and value into views of the fused
            // weight, which a later layout pass would copy back out. Panels last, so none are
            // packed for query, key and value only to be dropped by the fusion (~10 MB for
            // MiniLM, and start-up time).
            let mut linears = Vec::new();
            model.named_linears("", &mut linears);
            for (_, linear) in linears {
                linear.store_transposed()?;
            }
            let mut attentions = Vec::new();
            model.self_attentions(&mut attentions);
            for attention in attentions {
                attention.fuse_qkv()?;
            }
            let mut linears = Vec::new();
            model.named_linears("", &mut linears);
            for (_, linear) in linears {
                linear.pack_for_small_batches()?;
            }
        } else if device.is_cuda() {
            // One QKV matmul, whose packed output the GPU attention kernel reads in place.
            let mut attentions = Vec::new();
            model.self_attentions(&mut attentions);
            for attention in attentions {
                attention.fuse_qkv()?;
            }
        }
        Ok(model)
    })?;
    Ok(Loaded {
        model,
        config,
        report,
        files: files.clone(),
    })
}
