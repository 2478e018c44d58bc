//! The bottom of the BERT stack: the [`Config`] mirror of HF's `config.json`, the typed
//! [`Error`], the [`nn`] building blocks every layer uses, and [`BertEmbeddings`].
//!
//! Most users want the `bert` facade crate, which loads checkpoints and re-exports this one.

pub mod config;
#[cfg(all(feature = "cuda", not(bert_no_flash_attention)))]
mod cuda_attention;
#[cfg(feature = "cuda")]
mod cuda_epilogues;
#[cfg(feature = "cuda")]
mod cuda_launch;
pub mod embeddings;
pub mod error;
mod kernels;
pub mod nn;
mod panel_gemm;
pub mod team;
#[cfg(target_arch = "x86_64")]
mod tiled_attention;
mod vector_math;

pub use config::{Config, HiddenAct, PositionEmbeddingType, ProblemType};
pub use embeddings::BertEmbeddings;
pub use error::{Error, Result};
