//! Fine-tuning BERT pair classifiers (cross-encoders): trainable models built from checkpoints,
//! stable losses, AdamW with the usual weight-decay groups, the linear warm-up schedule,
//! gradient clipping and accumulation, labelled-pair data, evaluation metrics, and checkpoints
//! in transformers' layout; LoRA adapters in PEFT's.

pub mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda_adamw;
pub mod data;
pub mod error;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod trainable;
pub mod trainer;

pub use checkpoint::{merge_adapter, write_model, Weights};
pub use data::{epoch_batches, read_dataset, BadRows, Batching, Dataset, LabeledPair};
pub use error::{Error, Result};
pub use loss::Loss;
pub use optim::{
    clip_grad_norm, clip_scale, device_agreement, grad_norm, linear_schedule, AdamW, AdamWConfig,
};
pub use trainable::{load_trainable, Param, Trainable, TrainableClassifier};
pub use trainer::{evaluate, head_config, predict, train, EvalMetrics, TrainConfig, TrainSummary};
