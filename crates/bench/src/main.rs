//! `bert-bench`: timings of this project's model, printed as one JSON object per measurement,
//! for the side-by-side benchmark scripts in `crates/bench/scripts/` (which run the peers in
//! the same invocation and write the tables).
//!
//! `train-step`: forward + backward + clipping + AdamW of a one-label pair classifier on a
//! fixed random batch (every position a real token), the work of one `bert finetune` step.
//!
//! `infer`: the encoder's forward pass (token ids to last hidden states, inference mode) on a
//! fixed batch, by this project's `BertModel` or by candle-transformers' (`--peer`, the same
//! weights): the inference half of `crates/bench/scripts/compare_inference.py`.
//!
//! `fma-peak`: the CPU's measured f32 multiply-add peak ([`peak`]), for reading the tables as
//! fractions of the arithmetic limit.

mod peak;

use std::time::Instant;

use anyhow::{Context, Result};
use bert::bert_embeddings::nn::{seed_dropout, SplitMix64};
use bert::{BertInputs, DType, Device, ForwardOptions, ModelSource};
use bert_finetune::{
    clip_scale, grad_norm, head_config, load_trainable, AdamW, AdamWConfig, Loss, Trainable,
};
use candle_core::Tensor;
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "bert-bench",
    about = "Timings of this project's BERT, as JSON lines."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Time training steps (forward, backward, clipping, AdamW) of a pair classifier.
    TrainStep {
        /// Base model (any model source).
        #[arg(long, default_value = bert::DEFAULT_MODEL)]
        model: String,
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Timed steps; the median is reported.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Train LoRA adapters of this rank instead of every weight.
        #[arg(long)]
        lora: Option<usize>,
        /// cpu, cuda, cuda:N or metal (each phase is timed to the device's end).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Mixed precision: compute in bf16 or f16 over the f32 weights.
        #[arg(long)]
        compute_dtype: Option<String>,
    },
    /// Time the encoder's forward pass (inference) on a fixed batch.
    Infer(InferArgs),
    /// Measure the CPU's f32 fused multiply-add peak (GFLOP/s), the tables' roofline.
    FmaPeak {
        /// Threads running at once (one per core measured).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Repeats; the best is reported.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Loop steps per thread and repeat (12 vector multiply-adds each).
        #[arg(long, default_value_t = 50_000_000)]
        steps: u64,
    },
}

#[derive(clap::Args)]
struct InferArgs {
    /// Model (any model source).
    #[arg(long, default_value = bert::DEFAULT_MODEL)]
    model: String,
    /// Batch sizes: every one is run with every --seq, one JSON line each.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    batch: Vec<usize>,
    /// Sequence lengths (tokens per row, padding included).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    seq: Vec<usize>,
    /// Untimed passes first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed passes; each one's seconds are printed, and their median.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Which implementation runs: ours (bert-rs) or candle-transformers' BertModel.
    #[arg(long, value_enum, default_value = "bert-rs")]
    implementation: Implementation,
    /// cpu, cuda, cuda:N or metal (a GPU pass is timed to its end: the device is synchronised).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Pad half of each batch (the odd rows) by a quarter: their last seq/4 positions are
    /// padding (masked), as in a batch of mixed lengths.
    #[arg(long)]
    padded: bool,
    /// Ours only: run padded batches padding-free (`ForwardOptions::skip_padding`: the layers
    /// see the real tokens only).
    #[arg(long)]
    skip_padding: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Implementation {
    BertRs,
    CandleTransformers,
}

fn main() -> Result<()> {
    bert::allocator::tune_allocator();
    match Cli::parse().command {
        Command::TrainStep {
            model,
            batch,
            seq,
            warmup,
            steps,
            lora,
            device,
            compute_dtype,
        } => {
            let device = device.parse::<bert::DeviceSpec>()?.open()?;
            let compute_dtype = compute_dtype
                .as_deref()
                .map(bert::parse_dtype)
                .transpose()?;
            let shape = StepShape {
                batch,
                seq,
                warmup,
                steps,
            };
            train_step(&model, shape, lora, &device, compute_dtype)
        }
        Command::Infer(args) => infer(&args),
        Command::FmaPeak {
            threads,
            repeats,
            steps,
        } => peak::fma_peak(threads, repeats, steps),
    }
}

/// The benchmark batch, the same in every implementation (`compare_inference.py` and
/// `compare_gpu.py` build it with the same formula): `[CLS]` word pieces `[SEP]`, one segment;
/// with `padded`, the odd rows end early (`[SEP]` at 3/4 of the row, then `[PAD]` = 0).
/// Returns the ids and the 0/1 attention mask.
fn benchmark_batch(batch: usize, seq: usize, padded: bool) -> (Vec<u32>, Vec<u32>) {
    let length = |i: usize| {
        if padded && i % 2 == 1 {
            seq - seq / 4
        } else {
            seq
        }
    };
    let ids = (0..batch)
        .flat_map(|i| {
            (0..seq).map(move |j| match j {
                0 => 101,
                _ if j == length(i) - 1 => 102,
                _ if j >= length(i) => 0,
                _ => 1000 + ((i * 131 + j * 7919) % 28000) as u32,
            })
        })
        .collect();
    let mask = (0..batch)
        .flat_map(|i| (0..seq).map(move |j| u32::from(j < length(i))))
        .collect();
    (ids, mask)
}

/// One forward pass of an implementation: ids, token types, mask to last hidden states.
type Forward = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>>;

fn infer(args: &InferArgs) -> Result<()> {
    let device = args.device.parse::<bert::DeviceSpec>()?.open()?;
    let dtype = bert::parse_dtype(&args.dtype)?;
    let load_start = Instant::now();
    let files = args
        .model
        .parse::<ModelSource>()?
        .fetch()
        .with_context(|| format!("cannot load {}", args.model))?;
    // Each implementation as a user would call it: ours through its loader (which keeps the
    // pooler; its cost is one 1-row dense per sequence), the peer through candle-nn's
    // memory-mapped VarBuilder.
    let forward: Forward = match args.implementation {
        Implementation::BertRs => {
            let model = bert::load::<bert::BertModel>(&files, dtype, &device)?.model;
            let options = if args.skip_padding {
                ForwardOptions::inference().with_skip_padding()
            } else {
                ForwardOptions::inference()
            };
            Box::new(move |ids, types, mask| {
                let inputs = BertInputs::new(ids)
                    .with_attention_mask(mask)
                    .with_token_type_ids(types);
                Ok(model.forward(&inputs, &options)?.last_hidden_state)
            })
        }
        Implementation::CandleTransformers => {
            anyhow::ensure!(
                !args.skip_padding,
                "--skip-padding is ours: candle-transformers' BertModel runs every position"
            );
            use candle_transformers::models::bert as peer;
            let config: peer::Config =
                serde_json::from_str(&std::fs::read_to_string(&files.config)?)?;
            let paths = &files.weights.paths;
            if paths
                .iter()
                .any(|p| p.extension().is_none_or(|e| e != "safetensors"))
            {
                anyhow::bail!("the candle-transformers peer reads safetensors weights only");
            }
            // SAFETY: the weight files are not modified while mapped (as candle's examples).
            let vb =
                unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(paths, dtype, &device)? };
            let model = peer::BertModel::load(vb, &config)?;
            Box::new(move |ids, types, mask| Ok(model.forward(ids, types, Some(mask))?))
        }
    };
    let load_s = load_start.elapsed().as_secs_f64();
    for &batch in &args.batch {
        for &seq in &args.seq {
            infer_cell(args, &forward, &device, batch, seq, load_s)?;
        }
    }
    Ok(())
}

/// Times one (batch, seq) cell and prints its JSON line.
fn infer_cell(
    args: &InferArgs,
    forward: &Forward,
    device: &Device,
    batch: usize,
    seq: usize,
    load_s: f64,
) -> Result<()> {
    anyhow::ensure!(batch > 0 && seq >= 4, "--batch must be >= 1 and --seq >= 4");
    let (ids, mask) = benchmark_batch(batch, seq, args.padded);
    let real_tokens: u32 = mask.iter().sum();
    let input_ids = Tensor::from_vec(ids, (batch, seq), device)?;
    let attention_mask = Tensor::from_vec(mask, (batch, seq), device)?;
    let token_type_ids = input_ids.zeros_like()?;
    let mut times = Vec::with_capacity(args.runs);
    let mut hidden = None;
    for run in 0..args.warmup + args.runs {
        let start = Instant::now();
        let out = forward(&input_ids, &token_type_ids, &attention_mask)?;
        // GPU work is queued: the pass ends when the device is done with it.
        device.synchronize()?;
        if run >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
        hidden = Some(out);
    }
    // What the scripts compare across implementations: they must all compute the same states.
    // The mean |h| is over real tokens: padded positions hold nothing anyone reads (zeros
    // when padding is skipped, something else in every other implementation).
    let hidden = hidden
        .context("--warmup + --runs must be at least 1")?
        .to_dtype(DType::F32)?;
    let first_token: Vec<f32> = hidden.get(0)?.get(0)?.narrow(0, 0, 8)?.to_vec1()?;
    let real = bert::compare::real_tokens(&hidden, &attention_mask)?;
    let mean_abs =
        real.abs()?.sum_all()?.to_scalar::<f32>()? / (real_tokens as f32 * hidden.dim(2)? as f32);
    let median_s = median(times.clone());
    println!(
        "{}",
        json!({
            "impl": match args.implementation {
                Implementation::BertRs => "bert-rs",
                Implementation::CandleTransformers => "candle-transformers",
            },
            "bench": "infer",
            "device": args.device,
            "dtype": args.dtype,
            "batch": batch,
            "seq": seq,
            "padded": args.padded,
            "skip_padding": args.skip_padding,
            "real_tokens": real_tokens,
            "threads": candle_core::utils::get_num_threads(),
            "load_s": load_s,
            "runs_s": times,
            "median_s": median_s,
            "seq_per_s": batch as f64 / median_s,
            "real_tokens_per_s": real_tokens as f64 / median_s,
            "first_token": first_token,
            "mean_abs": mean_abs,
            "peak_rss_mb": peak_rss_mb(),
        })
    );
    Ok(())
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// The batch shape and step counts of `train-step`.
struct StepShape {
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
}

fn train_step(
    model: &str,
    shape: StepShape,
    lora: Option<usize>,
    device: &Device,
    compute_dtype: Option<DType>,
) -> Result<()> {
    let StepShape {
        batch,
        seq,
        warmup,
        steps,
    } = shape;
    let files = model
        .parse::<ModelSource>()?
        .fetch()
        .with_context(|| format!("cannot load {model}"))?;
    let config = head_config(&files.read_config()?, 1);
    let trainable = match lora {
        Some(r) => Trainable::Lora(Box::new(bert::LoraConfig::new(
            r,
            2.0 * r as f64,
            0.1,
            &["query", "key", "value", "dense"],
        ))),
        None => Trainable::All,
    };
    let model = load_trainable(&files, &config, trainable, DType::F32, device, 0)?;
    let mut rng = SplitMix64(1);
    // [CLS] random word pieces [SEP] ... [SEP], with sentence B from the middle on.
    let vocab = config.vocab_size as u64;
    let mut ids = Vec::with_capacity(batch * seq);
    let mut types = Vec::with_capacity(batch * seq);
    for _ in 0..batch {
        for j in 0..seq {
            let id = match j {
                0 => 101,
                _ if j == seq / 2 || j == seq - 1 => 102,
                _ => 1000 + (rng.next_u64() % (vocab - 1000)) as u32,
            };
            ids.push(id);
            types.push(u32::from(j > seq / 2));
        }
    }
    let input_ids = Tensor::from_vec(ids, (batch, seq), device)?;
    let token_type_ids = Tensor::from_vec(types, (batch, seq), device)?;
    let attention_mask = Tensor::ones((batch, seq), DType::U32, device)?;
    let labels = Tensor::from_vec(
        (0..batch).map(|i| (i % 2) as f32).collect::<Vec<_>>(),
        batch,
        device,
    )?;
    let options = ForwardOptions {
        compute_dtype,
        ..ForwardOptions::training()
    };
    let inputs = BertInputs::new(&input_ids)
        .with_attention_mask(&attention_mask)
        .with_token_type_ids(&token_type_ids);
    let loss_kind = Loss::for_config(&config);
    let mut optimizer = AdamW::new(&model.params, AdamWConfig::default())?;
    let vars: Vec<&candle_core::Var> = model.params.iter().filter_map(|p| p.var.as_ref()).collect();

    let (mut forward, mut backward, mut update, mut total) = (vec![], vec![], vec![], vec![]);
    for step in 0..warmup + steps {
        seed_dropout(step as u64);
        let t0 = Instant::now();
        let logits = model.model.forward(&inputs, &options)?.logits;
        let loss = loss_kind.compute(&logits, &labels)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        device.synchronize()?;
        let t2 = Instant::now();
        let norm = grad_norm(&grads, &vars)?;
        optimizer.step_scaled(&grads, 2e-5, clip_scale(norm, 1.0))?;
        device.synchronize()?;
        let t3 = Instant::now();
        if step >= warmup {
            forward.push((t1 - t0).as_secs_f64());
            backward.push((t2 - t1).as_secs_f64());
            update.push((t3 - t2).as_secs_f64());
            total.push((t3 - t0).as_secs_f64());
        }
    }
    let step_s = median(total);
    println!(
        "{}",
        json!({
            "impl": "bert-rs",
            "bench": "train-step",
            "device": format!("{:?}", device.location()),
            "compute_dtype": compute_dtype.map(|d| format!("{d:?}").to_lowercase()),
            "model": model_name(&model),
            "batch": batch,
            "seq": seq,
            "lora": lora,
            "steps": steps,
            "median_step_s": step_s,
            "median_forward_s": median(forward),
            "median_backward_s": median(backward),
            "median_update_s": median(update),
            "pairs_per_s": batch as f64 / step_s,
        })
    );
    Ok(())
}

/// This process's peak resident set (VmHWM), in MiB; None where /proc is not there.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn model_name(model: &bert_finetune::TrainableClassifier) -> String {
    format!(
        "{}x{}",
        model.config.num_hidden_layers, model.config.hidden_size
    )
}
