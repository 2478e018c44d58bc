//! Reading weights: safetensors (single or sharded, memory-mapped) and PyTorch `.bin` files,
//! with tensor names resolved the way transformers does.
//!
//! A model asks for tensors by the path its modules give (`bert.encoder.layer.0...` for a task
//! model, `encoder.layer.0...` for a bare `BertModel`). A checkpoint may store them with or
//! without the `bert.` prefix, or under TF-era LayerNorm names (`gamma`/`beta`); all of these
//! resolve. Every tensor the model needs but the checkpoint lacks is collected, so one error
//! lists them all. Checkpoint tensors no module asked for (the `embeddings.position_ids` buffer,
//! a head the chosen architecture does not have) are reported, not loaded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::error::{Error, Result};

/// Buffers transformers stores beside the weights; never parameters.
const BUFFERS: &[&str] = &["embeddings.position_ids", "bert.embeddings.position_ids"];

/// The weight files of one checkpoint, in load order (later files win on duplicate names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFiles {
    /// `.safetensors` or `.bin` files.
    pub paths: Vec<PathBuf>,
}

impl WeightFiles {
    /// Finds the weights in a model directory the way `from_pretrained` does: `model.safetensors`,
    /// then `model.safetensors.index.json` (shards), then `pytorch_model.bin`, then
    /// `pytorch_model.bin.index.json`.
    pub fn find_in(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Ok(Self {
                paths: vec![single],
            });
        }
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            return Self::from_index(&index);
        }
        let bin = dir.join("pytorch_model.bin");
        if bin.is_file() {
            return Ok(Self { paths: vec![bin] });
        }
        let bin_index = dir.join("pytorch_model.bin.index.json");
        if bin_index.is_file() {
            return Self::from_index(&bin_index);
        }
        Err(Error::checkpoint(
            dir,
            "no weights found: expected model.safetensors, model.safetensors.index.json, \
             pytorch_model.bin or pytorch_model.bin.index.json",
        ))
    }

    /// The shard files named by a `*.index.json` (`{"weight_map": {tensor: file}}`).
    pub fn from_index(index: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::checkpoint(index, format!("invalid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::checkpoint(index, "no \"weight_map\" object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards = BTreeSet::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::checkpoint(
                    index,
                    format!("weight_map entry {tensor:?} is not a file name"),
                )
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::checkpoint(
                    index,
                    format!("shard name {file:?} leaves the directory"),
                ));
            }
            shards.insert(file.to_string());
        }
        let paths: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            return Err(Error::checkpoint(
                index,
                format!("shard {} is missing", missing.display()),
            ));
        }
        Ok(Self { paths })
    }
}

/// Where a tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    store: usize,
    shape: Vec<usize>,
}

enum Store {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

/// An open set of weight files: names, shapes, and lazy loading.
pub struct Checkpoint {
    stores: Vec<Store>,
    entries: HashMap<String, Entry>,
    /// How the checkpoint is named in errors (its first file's directory or file).
    origin: PathBuf,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("origin", &self.origin)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens weight files: `.safetensors` are memory-mapped, `.bin` (PyTorch zip) read lazily.
    pub fn open(files: &WeightFiles) -> Result<Self> {
        let origin = files
            .paths
            .first()
            .cloned()
            .ok_or_else(|| Error::checkpoint(".", "no weight files given"))?;
        let mut stores = Vec::new();
        let mut entries = HashMap::new();
        for path in &files.paths {
            let index = stores.len();
            let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
            let store = if is_safetensors {
                // SAFETY: the map is read-only; like every mmap reader we rely on the file not
                // being truncated while the model loads.
                let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| {
                    Error::checkpoint(path, format!("not a readable safetensors file: {e}"))
                })?;
                for (name, view) in st.tensors() {
                    entries.insert(
                        name,
                        Entry {
                            store: index,
                            shape: view.shape().to_vec(),
                        },
                    );
                }
                Store::Safetensors(st)
            } else {
                let pth = PthTensors::new(path, None).map_err(|e| {
                    Error::checkpoint(path, format!("not a readable PyTorch checkpoint: {e}"))
                })?;
                for (name, info) in pth.tensor_infos() {
                    entries.insert(
                        name.clone(),
                        Entry {
                            store: index,
                            shape: info.layout.shape().dims().to_vec(),
                        },
                    );
                }
                Store::Pth(pth)
            };
            stores.push(store);
        }
        Ok(Self {
            stores,
            entries,
            origin,
        })
    }

    /// Where the checkpoint was read from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// Every tensor name stored, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<_> = self.entries.keys().cloned().collect();
        names.sort();
        names
    }

    /// The stored shape of `name`, if present (exact name, no resolution).
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// Maps a name a module asks for to the stored name: exact, with or without the `bert.`
    /// prefix, under PEFT's `base_model.model.` (preferred: an adapter's trained copy), and
    /// TF-era `gamma`/`beta` for LayerNorm `weight`/`bias`.
    pub fn resolve(&self, name: &str) -> Option<String> {
        let mut candidates = vec![name.to_string()];
        match name.strip_prefix("bert.") {
            Some(bare) => candidates.push(bare.to_string()),
            None => candidates.push(format!("bert.{name}")),
        }
        // PEFT saves under its wrapper's prefix; an adapter's copy of a module (the head it
        // trained) comes before the base's.
        let wrapped: Vec<String> = candidates
            .iter()
            .map(|c| format!("{}{c}", crate::lora::PEFT_PREFIX))
            .collect();
        candidates.splice(0..0, wrapped);
        for i in 0..candidates.len() {
            let candidate = candidates[i].clone();
            if candidate.contains("LayerNorm.") {
                if let Some(stem) = candidate.strip_suffix(".weight") {
                    candidates.push(format!("{stem}.gamma"));
                }
                if let Some(stem) = candidate.strip_suffix(".bias") {
                    candidates.push(format!("{stem}.beta"));
                }
            }
        }
        candidates
            .into_iter()
            .find(|c| self.entries.contains_key(c))
    }

    /// Reads a stored weight (by its stored name, see [`Checkpoint::resolve`]) as `dtype` on
    /// `device`. Its stored shape is checked against `expected` before anything is read, and it
    /// must be floating point.
    pub fn load_weight(
        &self,
        stored: &str,
        expected: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self
            .entries
            .get(stored)
            .ok_or_else(|| Error::checkpoint(&self.origin, format!("no tensor {stored}")))?;
        if let Some(shape) = expected {
            if entry.shape.as_slice() != shape.dims() {
                return Err(Error::checkpoint(
                    &self.origin,
                    format!(
                        "tensor {stored} has shape {:?} but the config implies {:?}",
                        entry.shape,
                        shape.dims()
                    ),
                ));
            }
        }
        let tensor = self.load_raw(stored, device)?;
        if !tensor.dtype().is_float() {
            return Err(Error::checkpoint(
                &self.origin,
                format!(
                    "tensor {stored} has dtype {:?}; model weights must be floating point",
                    tensor.dtype()
                ),
            ));
        }
        Ok(tensor.to_dtype(dtype)?)
    }

    fn load_raw(&self, stored: &str, device: &Device) -> candle_core::Result<Tensor> {
        let entry = &self.entries[stored];
        match &self.stores[entry.store] {
            Store::Safetensors(st) => st.load(stored, device),
            Store::Pth(pth) => pth
                .get(stored)?
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor {stored} vanished")))?
                .to_device(device),
        }
    }

    /// Builds a model from this checkpoint: `build` receives a [`VarBuilder`] whose tensors are
    /// converted to `dtype` on `device`. Returns the model and what was left unused, or an
    /// [`Error::MissingTensors`] naming every tensor the model needed but did not find.
    pub fn build<M>(
        &self,
        architecture: &'static str,
        dtype: DType,
        device: &Device,
        build: impl FnOnce(VarBuilder) -> bert_embeddings::Result<M>,
    ) -> Result<(M, LoadReport)> {
        let backend = Recorder {
            checkpoint: self,
            used: Mutex::new(BTreeSet::new()),
            missing: Mutex::new(BTreeSet::new()),
        };
        let vb = VarBuilder::from_backend(Box::new(&backend), dtype, device.clone());
        let built = build(vb);
        let missing = into_inner(backend.missing);
        if !missing.is_empty() {
            return Err(Error::MissingTensors {
                path: self.origin.clone(),
                architecture,
                names: missing.into_iter().collect(),
            });
        }
        let model = built?;
        let used = into_inner(backend.used);
        let unused = self
            .names()
            .into_iter()
            .filter(|name| !used.contains(name) && !BUFFERS.contains(&name.as_str()))
            .collect();
        Ok((model, LoadReport { unused }))
    }
}

fn into_inner(set: Mutex<BTreeSet<String>>) -> BTreeSet<String> {
    set.into_inner()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What loading left over.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Checkpoint tensors the architecture does not use (HF's "weights not used" warning),
    /// buffers such as `embeddings.position_ids` excluded.
    pub unused: Vec<String>,
}

/// A [`SimpleBackend`] that resolves names, checks shapes, and records what was used and what
/// was missing. A missing tensor yields zeros so construction goes on and every missing name
/// is collected before the error.
struct Recorder<'a> {
    checkpoint: &'a Checkpoint,
    used: Mutex<BTreeSet<String>>,
    missing: Mutex<BTreeSet<String>>,
}

impl Recorder<'_> {
    fn fetch(
        &self,
        name: &str,
        shape: Option<&Shape>,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(stored) = self.checkpoint.resolve(name) else {
            self.missing
                .lock()
                .map_err(poisoned)?
                .insert(name.to_string());
            return match shape {
                Some(shape) => Tensor::zeros(shape, dtype, device),
                None => Err(candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                }),
            };
        };
        let tensor = self
            .checkpoint
            .load_weight(&stored, shape, dtype, device)
            .map_err(candle_core::Error::wrap)?;
        self.used.lock().map_err(poisoned)?.insert(stored);
        Ok(tensor)
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> candle_core::Error {
    candle_core::Error::Msg("weight loader lock poisoned".into())
}

impl SimpleBackend for &Recorder<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(&s), dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.resolve(name).is_some()
    }
}
