//! Checkpoints in transformers' layout (`config.json`, `model.safetensors`, tokenizer files), plus
//! the training state that makes `--resume` continue exactly (optimizer moments, step, epoch,
//! position in the epoch, best metric). Every checkpoint directory is written beside its final
//! place, flushed to disk, and renamed into place, so a crash leaves either the old or the new
//! checkpoint, never half of one. Each records the sha256 of its files (`checksums.json`, written
//! last); the `last` checkpoint keeps its predecessor as `last.previous`, and a resume that finds
//! `last` damaged (a bad disk, a file edited by hand) falls back to it with a warning.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use bert::lora::{ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use bert::{Config, LoraConfig, ModelFiles};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::trainable::{save_weights, sync_file};

/// The sha256 of every other file of a checkpoint, by file name; written last.
pub const CHECKSUMS: &str = "checksums.json";

/// Tokenizer and vocabulary files copied from the base model, when it has them.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
];

/// Where a run stands, saved with every `last` checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Optimizer steps taken.
    pub step: u64,
    /// The epoch the next batch belongs to.
    pub epoch: u64,
    /// Index of the next batch within that epoch.
    pub next_batch: usize,
    /// The run's seed.
    pub seed: u64,
    /// Best evaluation score so far (the primary metric), if any.
    pub best_score: Option<f64>,
    /// The step that reached it.
    pub best_step: Option<u64>,
    /// The settings and data fingerprints the run started with (`run_settings` in the trainer);
    /// a resume must match them. Absent in checkpoints written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<serde_json::Value>,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    /// Every weight of the model (`model.safetensors`).
    Full(&'a HashMap<String, Tensor>),
    /// A LoRA adapter in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`
    /// with PEFT's names), applied on top of the base model its config names.
    Adapter(&'a LoraConfig, &'a HashMap<String, Tensor>),
}

/// Writes an HF `BertForSequenceClassification` checkpoint (or a PEFT adapter for one, with
/// the classifier's `config.json` beside it) to `dir`, replacing it atomically, with the
/// training state when given (`trainer_state.json`, `optimizer.safetensors`; the replaced
/// checkpoint is then kept as [`previous_of`] `dir`, the fallback of [`resumable`]). On failure
/// (a full disk, say) `dir` is untouched and nothing half-written is left.
pub fn write_model(
    dir: &Path,
    config: &Config,
    weights: Weights,
    base: &ModelFiles,
    state: Option<(&TrainingState, &HashMap<String, Tensor>)>,
) -> Result<()> {
    let staging = staging_dir(dir)?;
    let written = write_files(&staging, config, weights, base, state);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&staging);
        return Err(e);
    }
    replace_dir(&staging, dir, state.is_some())
}

fn write_files(
    staging: &Path,
    config: &Config,
    weights: Weights,
    base: &ModelFiles,
    state: Option<(&TrainingState, &HashMap<String, Tensor>)>,
) -> Result<()> {
    test_hook_full_disk(staging)?;
    let mut config = config.clone();
    config.architectures = vec!["BertForSequenceClassification".into()];
    write_synced(
        &staging.join("config.json"),
        config.to_json_string().as_bytes(),
    )?;
    match weights {
        Weights::Full(tensors) => save_weights(tensors, staging, "model.safetensors")?,
        Weights::Adapter(lora, tensors) => {
            write_synced(
                &staging.join(ADAPTER_CONFIG),
                lora.to_json_string().as_bytes(),
            )?;
            save_weights(tensors, staging, ADAPTER_WEIGHTS)?;
        }
    }
    for name in TOKENIZER_FILES {
        let source = base.dir.join(name);
        if source.is_file() {
            let bytes = fs::read(&source).map_err(|e| Error::io(&source, e))?;
            write_synced(&staging.join(name), &bytes)?;
        }
    }
    if let Some((state, optimizer)) = state {
        let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Setting(e.to_string()))?;
        write_synced(&staging.join("trainer_state.json"), &json)?;
        save_weights(optimizer, staging, "optimizer.safetensors")?;
    }
    let mut sums = std::collections::BTreeMap::new();
    for entry in fs::read_dir(staging).map_err(|e| Error::io(staging, e))? {
        let path = entry.map_err(|e| Error::io(staging, e))?.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        sums.insert(name.into_owned(), bert::source::sha256_file(&path)?);
    }
    let json = serde_json::to_vec_pretty(&sums).map_err(|e| Error::Setting(e.to_string()))?;
    write_synced(&staging.join(CHECKSUMS), &json)
}

/// Why `dir` is not the checkpoint its `checksums.json` describes, if it is not. A checkpoint
/// written before checksums existed passes.
pub fn verify(dir: &Path) -> std::result::Result<(), String> {
    let path = dir.join(CHECKSUMS);
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(());
    };
    let sums: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| format!("{CHECKSUMS} is unreadable: {e}"))?;
    for (name, expected) in &sums {
        let actual = bert::source::sha256_file(&dir.join(name)).map_err(|e| e.to_string())?;
        if &actual != expected {
            return Err(format!("{name} does not match its sha256 in {CHECKSUMS}"));
        }
    }
    Ok(())
}

/// Test hook: `BERT_FINETUNE_TEST_FULL_DISK_AT_WRITE=N` makes this process's Nth checkpoint
/// write fail as a full disk does (ENOSPC), so the tests can show what a full disk leaves.
fn test_hook_full_disk(staging: &Path) -> Result<()> {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let write = WRITES.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
    let fail_at = std::env::var("BERT_FINETUNE_TEST_FULL_DISK_AT_WRITE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok());
    if fail_at == Some(write) {
        const ENOSPC: i32 = 28;
        return Err(Error::io(
            staging.join("model.safetensors"),
            std::io::Error::from_raw_os_error(ENOSPC),
        ));
    }
    Ok(())
}

/// Reads the training state of a `last` checkpoint.
pub fn read_state(dir: &Path, device: &Device) -> Result<(TrainingState, HashMap<String, Tensor>)> {
    let path = dir.join("trainer_state.json");
    let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let state = serde_json::from_str(&text)
        .map_err(|e| Error::Setting(format!("{}: {e}", path.display())))?;
    let optimizer = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok((state, optimizer))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
    sync_file(path)
}

fn staging_dir(dir: &Path) -> Result<PathBuf> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = parent.join(format!(".{name}.staging-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    Ok(staging)
}

/// Puts `staging` at `dir`: the old `dir` is moved to `dir.previous` first, then (unless
/// `keep_previous`) removed once the new one is in place.
fn replace_dir(staging: &Path, dir: &Path, keep_previous: bool) -> Result<()> {
    let previous = previous_of(dir);
    if dir.exists() {
        if previous.exists() {
            fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
        }
        fs::rename(dir, &previous).map_err(|e| Error::io(dir, e))?;
    }
    fs::rename(staging, dir).map_err(|e| Error::io(dir, e))?;
    if let Some(parent) = dir.parent() {
        // Make the renames durable.
        let _ = fs::File::open(parent).and_then(|d| d.sync_all());
    }
    if previous.exists() && !keep_previous {
        fs::remove_dir_all(&previous).map_err(|e| Error::io(&previous, e))?;
    }
    Ok(())
}

/// Removes staging directories a killed run left in `out` (`.NAME.staging-PID`).
pub fn remove_stale_staging(out: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(out) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && name.contains(".staging-") && entry.path().is_dir() {
            fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

/// What a run leaves in its output directory: checkpoints, logs and the final model's files
/// (with the tokenizer files).
const RUN_OUTPUTS: &[&str] = &[
    "last",
    "last.previous",
    "best",
    "best.previous",
    "metrics.jsonl",
    "training_curve.svg",
    "config.json",
    "model.safetensors",
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
];

/// Makes `out` ready for a run from the model in `base_dir`. Refuses the base model's own
/// directory (the final model would overwrite it), and a directory holding another run's
/// checkpoints, log or model unless the run resumes it or `overwrite` asks to replace it; then
/// that run's outputs are removed first, so none of them is taken for the new run's.
pub fn prepare_out_dir(out: &Path, base_dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    if resume && overwrite {
        return Err(Error::Setting(
            "--resume continues the run in the output directory and --overwrite replaces it: \
             choose one"
                .into(),
        ));
    }
    let same = |a: &Path, b: &Path| match (fs::canonicalize(a), fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same(out, base_dir) {
        return Err(Error::Setting(format!(
            "the output directory {} is the base model's: choose another --out",
            out.display()
        )));
    }
    let found: Vec<&str> = RUN_OUTPUTS
        .iter()
        .chain(TOKENIZER_FILES)
        .copied()
        .filter(|name| out.join(name).exists())
        .collect();
    if found.is_empty() || resume {
        return Ok(());
    }
    if !overwrite {
        return Err(Error::Setting(format!(
            "{} already holds a run ({}): pass --resume to continue it, --overwrite to replace \
             it, or choose another --out",
            out.display(),
            found.join(", ")
        )));
    }
    for name in found {
        let path = out.join(name);
        let removed = if path.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| Error::io(&path, e))?;
    }
    Ok(())
}

/// `dir` + `.previous`: where the replaced checkpoint waits until the new one is in place.
pub fn previous_of(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!("{name}.previous"))
}

/// The checkpoint to resume from: `dir` when it is whole and matches its checksums, else the
/// previous one (kept beside it; also where a crash between the two renames that replace a
/// checkpoint leaves it). The second value is a warning naming what was wrong with `dir`
/// when the previous one is used instead.
pub fn resumable(dir: &Path) -> Option<(PathBuf, Option<String>)> {
    let mut problem = None;
    for candidate in [dir.to_path_buf(), previous_of(dir)] {
        let complete = candidate.join("trainer_state.json").is_file()
            && (candidate.join("model.safetensors").is_file()
                || candidate.join(ADAPTER_WEIGHTS).is_file());
        if !complete {
            continue;
        }
        match verify(&candidate) {
            Ok(()) => {
                let warning = problem.map(|p: String| {
                    format!(
                        "{} is damaged ({p}); resuming from the checkpoint before it, {}",
                        dir.display(),
                        candidate.display()
                    )
                });
                return Some((candidate, warning));
            }
            Err(reason) => problem = Some(reason),
        }
    }
    None
}

/// Exports `files` (a base with a LoRA adapter, see [`ModelFiles::with_adapter`]) as a plain
/// `BertForSequenceClassification` checkpoint in `out`: every adapter merged into its layer's
/// weight (`W + scaling * B A`, in f32), the head the adapter saved, the classifier's config
/// and the base's tokenizer files. Written atomically, like every checkpoint here.
pub fn merge_adapter(files: &ModelFiles, out: &Path) -> Result<()> {
    let dir = files.adapter.as_deref().ok_or_else(|| {
        Error::Setting(format!(
            "{}: not a LoRA adapter (no {ADAPTER_CONFIG}); nothing to merge",
            files.dir.display()
        ))
    })?;
    let lora = LoraConfig::from_dir(dir)?;
    let config = files.read_config()?;
    let model = crate::trainable::load_trainable(
        files,
        &config,
        crate::trainable::Trainable::Lora(Box::new(lora)),
        candle_core::DType::F32,
        &Device::Cpu,
        0,
    )?;
    // Everything must come from the files: a weight made up here would be a silent random head.
    if let Some(fresh) = model.params.iter().find(|p| p.fresh) {
        return Err(Error::Setting(format!(
            "{}: the adapter lacks {} (its head or an adapter weight); refusing to merge a \
             randomly initialised one",
            dir.display(),
            fresh.name
        )));
    }
    let tensors = model.tensors()?;
    write_model(out, &config, Weights::Full(&tensors), files, None)
}
