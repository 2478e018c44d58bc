//! The training loop: batches, dropout seeding, gradient accumulation, clipping, AdamW with the
//! linear schedule, evaluation, best and last checkpoints, resume, logs and the curve.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bert::bert_embeddings::nn::seed_dropout;
use bert::{
    BertTokenizer, Config, DType, Device, ForwardOptions, ModelFiles, TokenizeOptions, Truncation,
};
use candle_core::backprop::GradStore;
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::checkpoint::{
    prepare_out_dir, previous_of, read_state, remove_stale_staging, resumable, write_model,
    TrainingState, Weights,
};
use crate::data::{epoch_batches, Batching, Dataset, LabeledPair};
use crate::error::{Error, Result};
use crate::loss::Loss;
use crate::metrics::{binary_metrics, pearson, spearman};
use crate::optim::{clip_scale, grad_norm, linear_schedule, AdamW, AdamWConfig};
use crate::plot::write_curve;
use crate::trainable::{load_trainable, Trainable, TrainableClassifier};

/// The recipe. Defaults follow sentence-transformers' `CrossEncoder.fit`.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Passes over the training data.
    pub epochs: u64,
    /// Pairs per batch.
    pub batch_size: usize,
    /// Batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Fraction of steps spent warming up.
    pub warmup_ratio: f64,
    /// AdamW weight decay (not on biases and LayerNorm weights).
    pub weight_decay: f64,
    /// Gradient clipping by global norm.
    pub max_grad_norm: f64,
    /// Seed of shuffling, dropout and head initialisation.
    pub seed: u64,
    /// Evaluate (and checkpoint) every this many steps; `None`: after every epoch.
    pub eval_steps: Option<u64>,
    /// Token limit per pair.
    pub max_length: Option<usize>,
    /// How pairs are grouped into batches.
    pub batching: Batching,
    /// Which text of a pair is shortened.
    pub truncation: Truncation,
    /// Which weights train (all, the head, or LoRA adapters; an adapter's
    /// `base_model_name_or_path` defaults to the base directory's absolute path).
    pub trainable: Trainable,
    /// Number of labels of the head.
    pub num_labels: usize,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// Dtype of the model's weights (the master weights the optimiser updates), and of its
    /// arithmetic unless `compute_dtype` says otherwise.
    pub dtype: DType,
    /// Mixed precision: the forward and backward passes compute in this dtype (bf16 or f16)
    /// over weights kept in `dtype` (f32); see `ForwardOptions::compute_dtype`.
    pub compute_dtype: Option<DType>,
    /// Continue from `OUT/last` exactly where it stopped; refused when this recipe or the data
    /// differ from what the run started with.
    pub resume: bool,
    /// Replace the run an output directory already holds (else such a directory is refused
    /// unless `resume`).
    pub overwrite: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 16,
            grad_accum: 1,
            lr: 2e-5,
            warmup_ratio: 0.1,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
            seed: 42,
            eval_steps: None,
            max_length: None,
            batching: Batching::LengthBuckets,
            truncation: Truncation::LongestFirst,
            trainable: Trainable::All,
            num_labels: 1,
            progress: true,
            dtype: DType::F32,
            compute_dtype: None,
            resume: false,
            overwrite: false,
        }
    }
}

/// Evaluation results.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalMetrics {
    /// Pearson correlation of scores and labels.
    pub pearson: f64,
    /// Spearman correlation of scores and labels.
    pub spearman: f64,
    /// With binary labels: best-threshold accuracy.
    pub accuracy: Option<f64>,
    /// With binary labels: best-threshold F1.
    pub f1: Option<f64>,
    /// With binary labels: average precision.
    pub average_precision: Option<f64>,
    /// The metric that picks the best checkpoint: average precision for binary labels,
    /// Spearman otherwise.
    pub primary: f64,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps taken.
    pub steps: u64,
    /// Metrics of the final model on the evaluation data, if any.
    pub final_metrics: Option<EvalMetrics>,
    /// Best primary metric and its step.
    pub best: Option<(f64, u64)>,
    /// Training throughput (pairs per second, evaluation excluded).
    pub pairs_per_second: f64,
    /// Where the final model is (the best checkpoint when evaluating, else the last).
    pub model_dir: PathBuf,
}

/// Scores `pairs` with `model` (inference mode) and computes the metrics against their labels.
pub fn evaluate(
    model: &bert::BertForSequenceClassification,
    tokenizer: &BertTokenizer,
    pairs: &[LabeledPair],
    device: &Device,
) -> Result<EvalMetrics> {
    let scores = predict(model, tokenizer, pairs, device)?;
    let labels: Vec<f64> = pairs.iter().map(|p| p.label as f64).collect();
    Ok(metrics_of(&scores, &labels))
}

/// The model's probability (sigmoid of the logit) for each pair, in order.
pub fn predict(
    model: &bert::BertForSequenceClassification,
    tokenizer: &BertTokenizer,
    pairs: &[LabeledPair],
    device: &Device,
) -> Result<Vec<f64>> {
    let mut scores = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(32) {
        let texts: Vec<(&str, &str)> = chunk.iter().map(LabeledPair::texts).collect();
        let batch = tokenizer.pair_batch(&texts, device)?;
        let probs = model
            .probabilities(&batch.inputs())?
            .to_dtype(DType::F32)?
            .detach();
        // One label: the probability; several: the probability of the last class.
        let last = probs.dim(1)? - 1;
        scores.extend(
            probs
                .narrow(1, last, 1)?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from),
        );
    }
    Ok(scores)
}

fn metrics_of(scores: &[f64], labels: &[f64]) -> EvalMetrics {
    let binary = labels.iter().all(|&l| l == 0.0 || l == 1.0) && labels.contains(&1.0);
    let (p, s) = (pearson(scores, labels), spearman(scores, labels));
    if binary {
        let flags: Vec<bool> = labels.iter().map(|&l| l == 1.0).collect();
        let m = binary_metrics(scores, &flags);
        EvalMetrics {
            pearson: p,
            spearman: s,
            accuracy: Some(m.accuracy),
            f1: Some(m.f1),
            average_precision: Some(m.average_precision),
            primary: m.average_precision,
        }
    } else {
        EvalMetrics {
            pearson: p,
            spearman: s,
            accuracy: None,
            f1: None,
            average_precision: None,
            primary: s,
        }
    }
}

/// The configuration of the classifier trained from a base whose config is `base`: a base that
/// is already a classifier with `num_labels` outputs keeps its head settings; otherwise the head
/// is new, with `num_labels` generic labels and no `problem_type` (so a one-label head trains
/// with BCE, as `CrossEncoder.fit` does).
pub fn head_config(base: &Config, num_labels: usize) -> Config {
    let mut config = base.clone();
    let is_classifier = config
        .architectures
        .iter()
        .any(|a| a == "BertForSequenceClassification");
    if config.num_labels != num_labels || !is_classifier {
        config.num_labels = num_labels;
        config.id2label = (0..num_labels).map(|i| (i, format!("LABEL_{i}"))).collect();
        config.label2id = config
            .id2label
            .iter()
            .map(|(i, n)| (n.clone(), *i))
            .collect();
        config.problem_type = None;
    }
    config.architectures = vec!["BertForSequenceClassification".into()];
    config
}

/// Trains a pair classifier from `base` on `train`, evaluating on `eval`, writing into `out`:
/// `last/` (with training state), `best/` (best evaluation), `metrics.jsonl`,
/// `training_curve.svg`, and the final model's files in `out` itself. With `resume`, continues
/// from `out/last` exactly where it stopped.
pub fn train(
    base: &ModelFiles,
    train: &Dataset,
    eval: Option<&Dataset>,
    out: &Path,
    cfg: &TrainConfig,
    device: &Device,
) -> Result<TrainSummary> {
    if cfg.batch_size == 0 || cfg.grad_accum == 0 || cfg.epochs == 0 {
        return Err(Error::Setting(
            "epochs, batch size and gradient accumulation must be at least 1".into(),
        ));
    }
    if !(0.0..1.0).contains(&cfg.warmup_ratio) || cfg.lr <= 0.0 {
        return Err(Error::Setting(
            "warm-up ratio must be in [0, 1) and the learning rate positive".into(),
        ));
    }
    let (dtype, resume) = (cfg.dtype, cfg.resume);
    prepare_out_dir(out, &base.dir, resume, cfg.overwrite)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    remove_stale_staging(out)?;
    let last_dir = out.join("last");
    let best_dir = out.join("best");

    // Resume from our own last checkpoint (its weights and optimizer state), else start from base.
    let resume_from = if resume {
        let (dir, warning) = resumable(&last_dir).ok_or_else(|| {
            Error::Setting(format!(
                "--resume: no whole checkpoint to resume in {} (or {})",
                last_dir.display(),
                previous_of(&last_dir).display()
            ))
        })?;
        if let Some(warning) = warning {
            eprintln!("warning: {warning}");
        }
        Some(dir)
    } else {
        None
    };
    let (model_files, mut config) = match &resume_from {
        Some(dir) => {
            let is_adapter = bert::lora::is_adapter_dir(dir);
            if is_adapter != matches!(cfg.trainable, Trainable::Lora(_)) {
                return Err(Error::Setting(format!(
                    "--resume: {} holds {}, but this run trains {}",
                    dir.display(),
                    if is_adapter {
                        "a LoRA adapter"
                    } else {
                        "a whole model"
                    },
                    if is_adapter {
                        "the whole model"
                    } else {
                        "LoRA adapters"
                    },
                )));
            }
            let files = checkpoint_files(base, dir)?;
            let config = files.read_config()?;
            (files, config)
        }
        None => {
            let config = head_config(&base.read_config()?, cfg.num_labels);
            (base.clone(), config)
        }
    };
    config.architectures = vec!["BertForSequenceClassification".into()];
    let loss_kind = Loss::for_config(&config);
    // Checked before the model loads: a batch that cannot fit is known from the config alone.
    let max_length = cfg
        .max_length
        .unwrap_or(config.max_position_embeddings)
        .min(config.max_position_embeddings);
    let batch_tokens = cfg.batch_size.saturating_mul(max_length);
    if batch_tokens > bert::limits::MAX_TRAIN_TOKENS_PER_BATCH {
        return Err(Error::Setting(format!(
            "a batch of {} pairs x {max_length} tokens is {batch_tokens} tokens, over the bound of \
             {} (bert::limits::MAX_TRAIN_TOKENS_PER_BATCH); use a smaller batch with \
             gradient accumulation",
            cfg.batch_size,
            bert::limits::MAX_TRAIN_TOKENS_PER_BATCH
        )));
    }
    let options = ForwardOptions {
        compute_dtype: cfg.compute_dtype,
        ..ForwardOptions::training()
    };
    let model = load_trainable(
        &model_files,
        &config,
        cfg.trainable.clone(),
        dtype,
        device,
        cfg.seed,
    )?;
    // What an adapter checkpoint records as its base.
    let saved_lora = model.lora.clone().map(|mut lora| {
        if lora.base_model_name_or_path.is_none() {
            let dir = std::fs::canonicalize(&base.dir).unwrap_or_else(|_| base.dir.clone());
            lora.base_model_name_or_path = Some(dir.to_string_lossy().into_owned());
        }
        lora
    });
    let save = |dir: &Path,
                model: &TrainableClassifier,
                state: Option<(&TrainingState, &std::collections::HashMap<String, Tensor>)>|
     -> Result<()> {
        match &saved_lora {
            Some(lora) => {
                let tensors = model.adapter_tensors();
                write_model(dir, &config, Weights::Adapter(lora, &tensors), base, state)
            }
            None => {
                let tensors = model.tensors()?;
                write_model(dir, &config, Weights::Full(&tensors), base, state)
            }
        }
    };
    let tokenizer_path = base
        .tokenizer
        .as_ref()
        .ok_or_else(|| Error::Setting(format!("{}: no tokenizer.json", base.dir.display())))?;
    let tokenizer = BertTokenizer::from_file(
        tokenizer_path,
        TokenizeOptions {
            max_length,
            truncation: cfg.truncation,
            error_on_overflow: false,
        },
    )?;

    let mut optimizer = AdamW::new(
        &model.params,
        AdamWConfig {
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            ..AdamWConfig::default()
        },
    )?;
    let settings = run_settings(cfg, max_length, config.num_labels, train, eval);
    let mut state = TrainingState {
        step: 0,
        epoch: 0,
        next_batch: 0,
        seed: cfg.seed,
        best_score: None,
        best_step: None,
        run: Some(settings.clone()),
    };
    if let Some(dir) = &resume_from {
        let (saved, moments) = read_state(dir, device)?;
        if saved.seed != cfg.seed {
            return Err(Error::Setting(format!(
                "--resume with seed {} but the run used {}",
                cfg.seed, saved.seed
            )));
        }
        check_same_run(dir, saved.run.as_ref(), &settings)?;
        optimizer.restore(&moments, saved.step)?;
        state = TrainingState {
            run: Some(settings),
            ..saved
        };
    }

    // Token lengths decide the length buckets; computing them once is cheap.
    let encoded_lengths: Vec<usize> = tokenizer
        .encode_pairs(
            &train
                .pairs
                .iter()
                .map(|p| (p.text_a.as_str(), p.text_b.as_str()))
                .collect::<Vec<_>>(),
        )?
        .iter()
        .map(|e| e.len())
        .collect();
    let batches_per_epoch = encoded_lengths.len().div_ceil(cfg.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(cfg.grad_accum) as u64;
    let total_steps = steps_per_epoch * cfg.epochs;
    let warmup = (total_steps as f64 * cfg.warmup_ratio).ceil() as u64;

    let metrics_path = out.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, state.step, resume_from.is_some())?;
    let bar = progress_bar(cfg.progress, total_steps, state.step);
    let vars: Vec<&candle_core::Var> = model
        .vars()
        .into_iter()
        .filter_map(|p| p.var.as_ref())
        .collect();
    let mut trained_pairs = 0usize;
    let mut train_time = 0f64;

    let evaluate_now = |model: &TrainableClassifier| -> Result<Option<EvalMetrics>> {
        eval.map(|data| evaluate(&model.model, &tokenizer, &data.pairs, device))
            .transpose()
    };

    while state.epoch < cfg.epochs {
        let batches = epoch_batches(
            &encoded_lengths,
            cfg.batch_size,
            cfg.seed,
            state.epoch,
            cfg.batching,
        );
        while state.next_batch < batches.len() {
            let started = Instant::now();
            let group: Vec<&Vec<usize>> = batches[state.next_batch..]
                .iter()
                .take(cfg.grad_accum)
                .collect();
            let mut accumulated: Option<GradStore> = None;
            let mut step_loss = 0f64;
            for (micro, batch) in group.iter().enumerate() {
                seed_dropout(mix(cfg.seed, state.step, micro as u64));
                let pairs: Vec<&LabeledPair> = batch.iter().map(|&i| &train.pairs[i]).collect();
                let loss = batch_loss(&model, &tokenizer, &pairs, loss_kind, &options, device)?;
                let value = loss.to_scalar::<f32>()?;
                if !value.is_finite() {
                    return Err(Error::NonFinite {
                        step: state.step + 1,
                        batch: state.next_batch + micro,
                        loss: value,
                    });
                }
                step_loss += value as f64 / group.len() as f64;
                let grads = (loss / group.len() as f64)?.backward()?;
                accumulated = Some(match accumulated {
                    None => grads,
                    Some(mut total) => {
                        for var in &vars {
                            if let Some(g) = grads.get(var.as_tensor()) {
                                let sum = match total.remove(var.as_tensor()) {
                                    Some(t) => (t + g)?,
                                    None => g.clone(),
                                };
                                total.insert(var.as_tensor(), sum);
                            }
                        }
                        total
                    }
                });
                trained_pairs += pairs.len();
            }
            let grads = accumulated.expect("a step has at least one batch");
            let grad_norm = grad_norm(&grads, &vars)?;
            let lr = linear_schedule(cfg.lr, warmup, total_steps, state.step);
            optimizer.step_scaled(&grads, lr, clip_scale(grad_norm, cfg.max_grad_norm))?;
            drop(grads);
            state.step += 1;
            state.next_batch += group.len();
            train_time += started.elapsed().as_secs_f64();
            let throughput = trained_pairs as f64 / train_time.max(1e-9);
            log.write(json!({"step": state.step, "epoch": state.epoch, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "pairs_per_s": throughput}))?;
            bar.set_position(state.step);
            bar.set_message(format!(
                "loss {step_loss:.4} lr {lr:.2e} {throughput:.1} pairs/s"
            ));
            test_hook_delay();

            let epoch_done = state.next_batch >= batches.len();
            if epoch_done {
                state.epoch += 1;
                state.next_batch = 0;
            }
            let due = match cfg.eval_steps {
                Some(every) => {
                    state.step.is_multiple_of(every) || (epoch_done && state.epoch == cfg.epochs)
                }
                None => epoch_done,
            };
            if due {
                let metrics = evaluate_now(&model)?;
                if let Some(m) = &metrics {
                    log.write(json!({"step": state.step, "epoch": state.epoch, "eval": m}))?;
                    if state.best_score.is_none_or(|best| m.primary > best) {
                        state.best_score = Some(m.primary);
                        state.best_step = Some(state.step);
                        save(&best_dir, &model, None)?;
                    }
                }
                save(&last_dir, &model, Some((&state, &optimizer.state()?)))?;
            }
            if epoch_done {
                break;
            }
        }
    }
    bar.finish_and_clear();

    // The final model: the best checkpoint when there was evaluation, else the last weights.
    let final_dir = if state.best_step.is_some() {
        best_dir.clone()
    } else {
        last_dir.clone()
    };
    publish_final(&final_dir, out)?;
    let final_files = checkpoint_files(base, out)?;
    let final_model =
        bert::load::<bert::BertForSequenceClassification>(&final_files, dtype, device)?.model;
    let final_metrics = eval
        .map(|data| evaluate(&final_model, &tokenizer, &data.pairs, device))
        .transpose()?;
    if let Some(m) = &final_metrics {
        log.write(json!({"step": state.step, "final": m}))?;
    }
    write_curve(&metrics_path, &out.join("training_curve.svg"))?;
    Ok(TrainSummary {
        steps: state.step,
        final_metrics,
        best: state.best_score.zip(state.best_step),
        pairs_per_second: trained_pairs as f64 / train_time.max(1e-9),
        model_dir: out.to_path_buf(),
    })
}

/// Everything besides the seed that decides a run's course: the schedule's and optimiser's
/// settings, how batches are made, what trains, and fingerprints of the training and evaluation
/// data. Saved in the training state, so that `--resume` continues only the run the checkpoint
/// began (other settings or data would silently make a different run).
fn run_settings(
    cfg: &TrainConfig,
    max_length: usize,
    num_labels: usize,
    train: &Dataset,
    eval: Option<&Dataset>,
) -> serde_json::Value {
    let trainable = match &cfg.trainable {
        Trainable::All => json!("all"),
        Trainable::HeadOnly => json!("head"),
        Trainable::Lora(lora) => json!({"lora": {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "lora_dropout": lora.lora_dropout,
            "target_modules": lora.target_modules,
            "modules_to_save": lora.modules_to_save,
            "use_rslora": lora.use_rslora,
        }}),
    };
    json!({
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "lr": cfg.lr,
        "warmup_ratio": cfg.warmup_ratio,
        "weight_decay": cfg.weight_decay,
        "max_grad_norm": cfg.max_grad_norm,
        "eval_steps": cfg.eval_steps,
        "max_length": max_length,
        "batching": match cfg.batching {
            Batching::LengthBuckets => "length_buckets",
            Batching::Uniform => "uniform",
        },
        "truncation": match cfg.truncation {
            Truncation::LongestFirst => "longest_first",
            Truncation::OnlyFirst => "only_first",
            Truncation::OnlySecond => "only_second",
        },
        "trainable": trainable,
        "num_labels": num_labels,
        "dtype": cfg.dtype.as_str(),
        "compute_dtype": cfg.compute_dtype.map(|d| d.as_str()),
        "train_data": data_fingerprint(train),
        "eval_data": eval.map(data_fingerprint),
    })
}

/// `N pairs, sha256 H` of a dataset's usable pairs (texts and labels, in order): the same file
/// read with the same bad-row policy gives the same fingerprint.
fn data_fingerprint(data: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for pair in &data.pairs {
        // Unit and record separators cannot be confused with text: rows never run together.
        hasher.update(pair.text_a.as_bytes());
        hasher.update([0x1f]);
        hasher.update(pair.text_b.as_bytes());
        hasher.update([0x1f]);
        hasher.update(pair.label.to_le_bytes());
        hasher.update([0x1e]);
    }
    let digest = bert::source::to_hex(&hasher.finalize());
    format!("{} pairs, sha256 {digest}", data.pairs.len())
}

/// Refuses to resume the checkpoint in `dir` with settings or data other than its run's, naming
/// each difference. A checkpoint from before the settings were recorded resumes with a warning.
fn check_same_run(
    dir: &Path,
    saved: Option<&serde_json::Value>,
    now: &serde_json::Value,
) -> Result<()> {
    let Some(saved) = saved else {
        eprintln!(
            "warning: {} records no run settings (written by an older version): cannot check \
             that this run's settings and data are the ones it started with",
            dir.display()
        );
        return Ok(());
    };
    let differences: Vec<String> = now
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, value)| saved.get(key.as_str()) != Some(value))
        .map(|(key, value)| {
            let before = saved.get(key.as_str()).unwrap_or(&serde_json::Value::Null);
            format!("{key}: {before} in the checkpoint, {value} now")
        })
        .collect();
    if differences.is_empty() {
        return Ok(());
    }
    Err(Error::Setting(format!(
        "--resume: {} belongs to a run with other settings or data ({}); resume with the run's \
         own, or start a new run from its weights with --model",
        dir.display(),
        differences.join("; ")
    )))
}

/// The files of a checkpoint this harness wrote: a whole model, or an adapter on `base`.
fn checkpoint_files(base: &ModelFiles, dir: &Path) -> Result<ModelFiles> {
    Ok(if bert::lora::is_adapter_dir(dir) {
        base.clone().with_adapter(dir)?
    } else {
        ModelFiles::from_dir(dir)?
    })
}

/// Copies a checkpoint's model files (not its training state) into `out`, each through a
/// temporary file and a rename, so `out` itself is a loadable model directory.
fn publish_final(from: &Path, out: &Path) -> Result<()> {
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        // The training state stays in last/; the checksums describe the checkpoint directory.
        if !path.is_file()
            || matches!(
                name,
                "trainer_state.json" | "optimizer.safetensors" | crate::checkpoint::CHECKSUMS
            )
        {
            continue;
        }
        let tmp = out.join(format!(".{name}.tmp"));
        std::fs::copy(&path, &tmp).map_err(|e| Error::io(&tmp, e))?;
        crate::trainable::sync_file(&tmp)?;
        std::fs::rename(&tmp, out.join(name)).map_err(|e| Error::io(out, e))?;
    }
    Ok(())
}

/// Mean loss of one batch in training mode (dropout on).
fn batch_loss(
    model: &TrainableClassifier,
    tokenizer: &BertTokenizer,
    pairs: &[&LabeledPair],
    loss: Loss,
    options: &ForwardOptions,
    device: &Device,
) -> Result<Tensor> {
    let texts: Vec<(&str, &str)> = pairs.iter().map(|p| p.texts()).collect();
    let batch = tokenizer.pair_batch(&texts, device)?;
    let logits = model.model.forward(&batch.inputs(), options)?.logits;
    let labels = Tensor::new(pairs.iter().map(|p| p.label).collect::<Vec<f32>>(), device)?;
    loss.compute(&logits, &labels)
}

/// A dropout seed for (run seed, step, micro-batch).
fn mix(seed: u64, step: u64, micro: u64) -> u64 {
    let mut rng = bert::bert_embeddings::nn::SplitMix64(
        seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ micro.rotate_left(32),
    );
    rng.next_u64()
}

/// `BERT_FINETUNE_TEST_STEP_DELAY_MS`: a pause after every step, so the kill-and-resume test can
/// interrupt a run of a tiny model between checkpoints. Unset in normal use.
fn test_hook_delay() {
    if let Some(ms) = std::env::var("BERT_FINETUNE_TEST_STEP_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

fn progress_bar(show: bool, total: u64, position: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} training [{bar:30}] {pos}/{len} steps {msg} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_position(position);
    bar
}

/// `metrics.jsonl`, one JSON object per line. On resume, lines past the resumed step are
/// dropped (they belong to the interrupted tail that is about to be redone).
struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    fn open(path: &Path, step: u64, resume: bool) -> Result<Self> {
        if resume && path.is_file() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= step)
                        && !line.contains("\"final\"")
                })
                .map(|line| format!("{line}\n"))
                .collect();
            std::fs::write(path, kept).map_err(|e| Error::io(path, e))?;
        } else {
            std::fs::write(path, "").map_err(|e| Error::io(path, e))?;
        }
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| Error::io(path, e))?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}").map_err(|e| Error::io(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_new_head_gets_generic_labels_and_an_existing_one_is_kept() {
        let base = Config::from_json_value(
            json!({"architectures": ["BertModel"], "problem_type": "regression"}),
        )
        .unwrap();
        let head = head_config(&base, 1);
        assert_eq!(head.num_labels, 1);
        assert_eq!(head.problem_type, None);
        assert_eq!(head.architectures, vec!["BertForSequenceClassification"]);
        assert_eq!(Loss::for_config(&head), Loss::BceWithLogits);

        let classifier = Config::from_json_value(json!({
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "a", "1": "b", "2": "c"},
            "problem_type": "multi_label_classification"
        }))
        .unwrap();
        let kept = head_config(&classifier, 3);
        assert_eq!(kept.id2label[&2], "c");
        assert_eq!(Loss::for_config(&kept), Loss::BceWithLogits);
        assert_eq!(head_config(&classifier, 2).problem_type, None);
    }
}
