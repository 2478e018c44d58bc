//! `bert`: score sentence pairs, rank documents and embed texts with BERT models.
//!
//! Exit codes: 0 success, 2 usage error (from clap), 1 any other failure. Errors go to stderr
//! and name the file, line and cause where there is one. Results go to stdout; progress bars
//! and notes go to stderr, so stdout can be piped.

mod input;
mod selftest;

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bert::{
    default_scorer_model, device::device_name, parse_dtype, DeviceSpec, Embedder, ModelSource,
    PairScorer, PipelineOptions, Pooling, ScoreMode, Truncation,
};
use bert::{BertTokenizer, DType, TokenizeOptions};
use bert_finetune::{
    evaluate, head_config, merge_adapter, read_dataset, train, BadRows, Batching, Dataset, Loss,
    TrainConfig, Trainable,
};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use input::{read_pairs, read_texts, Format};

#[derive(Parser)]
#[command(
    name = "bert",
    version,
    about = "BERT on candle: score sentence pairs, rank documents, embed texts."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score how similar two texts are (or every pair of a TSV/CSV/JSONL file).
    Score(ScoreArgs),
    /// Rank documents (one per line, or JSONL with "text") by similarity to a query.
    Rank(RankArgs),
    /// Embed texts; writes one JSON line per text with its vector.
    Embed(EmbedArgs),
    /// Fine-tune a pair classifier (cross-encoder) on labelled pairs.
    Finetune(FinetuneArgs),
    /// Evaluate a pair classifier on labelled pairs; prints the metrics as JSON.
    Eval(EvalArgs),
    /// Merge a LoRA adapter into its base model and write a plain checkpoint.
    Merge(MergeArgs),
    /// Check this build on a device: all-MiniLM-L6-v2 against HF transformers' outputs (f32),
    /// f16 and bf16 against f32, each text alone against its padded batch; exits 1 on a failure.
    Selftest(SelftestArgs),
}

#[derive(Args)]
struct SelftestArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Check this model (any model source) instead of all-MiniLM-L6-v2; needs --reference.
    #[arg(long, requires = "reference")]
    model: Option<String>,
    /// transformers' outputs for --model on the fixture's inputs (safetensors with the names
    /// of tests/fixtures/minilm/outputs.safetensors, as tests/scripts/gpu/random_checkpoints.py
    /// writes them); for machines that cannot fetch all-MiniLM-L6-v2.
    #[arg(long, requires = "model")]
    reference: Option<PathBuf>,
}

#[derive(Args)]
struct MergeArgs {
    /// The adapter directory (PEFT layout: adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    model: String,
    /// Where the merged BertForSequenceClassification checkpoint goes.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct FinetuneArgs {
    /// Training pairs: TSV, CSV or JSONL with text_a, text_b, label.
    #[arg(long)]
    train: PathBuf,
    /// Evaluation pairs (same formats); evaluated every epoch (or --eval-steps) and at the end.
    #[arg(long)]
    eval: Option<PathBuf>,
    /// Base model: a shipped name, a directory, a manifest.json, or hf:ORG/NAME[@REV].
    #[arg(long, default_value = bert::DEFAULT_MODEL)]
    model: String,
    /// Output directory: the final model, best/ and last/ checkpoints, metrics.jsonl, training_curve.svg.
    #[arg(long)]
    out: PathBuf,
    /// Passes over the training data.
    #[arg(long, default_value_t = 1)]
    epochs: u64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-5)]
    lr: f64,
    /// Pairs per batch.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Fraction of steps spent warming up.
    #[arg(long, default_value_t = 0.1)]
    warmup_ratio: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Evaluate and checkpoint every N steps (default: every epoch).
    #[arg(long)]
    eval_steps: Option<u64>,
    /// Seed of shuffling, dropout and head initialisation.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Outputs of the head (1: a pair probability trained with BCE).
    #[arg(long, default_value_t = 1)]
    num_labels: usize,
    /// Train only the pooler and classifier.
    #[arg(long, conflicts_with = "lora")]
    freeze_encoder: bool,
    /// Train LoRA adapters of this rank (and the classifier) instead of every weight; the
    /// checkpoints are PEFT adapters on the base model (`bert merge` makes a plain one).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    lora: Option<u64>,
    /// LoRA alpha: adapter updates are scaled by alpha / rank (PEFT's default, 8).
    #[arg(long, default_value_t = 8.0, requires = "lora")]
    lora_alpha: f64,
    /// Dropout on the adapters' inputs while training (PEFT's default, 0).
    #[arg(long, default_value_t = 0.0, requires = "lora")]
    lora_dropout: f64,
    /// Comma-separated names of the linear layers that get adapters (matched as the end of a
    /// layer's path, as PEFT does): attention and feed-forward by default.
    #[arg(
        long,
        default_value = "query,key,value,dense",
        value_delimiter = ',',
        requires = "lora"
    )]
    lora_targets: Vec<String>,
    /// Continue from OUT/last exactly where it stopped (the run's own settings and data: others
    /// are refused, naming each difference).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Replace the run OUT already holds (its checkpoints, log and model); without it such an
    /// OUT is refused unless --resume.
    #[arg(long)]
    overwrite: bool,
    /// Draw batches as a uniform shuffle (as CrossEncoder.fit's DataLoader does) instead of
    /// grouping pairs of similar length (less padding, faster).
    #[arg(long)]
    uniform_batches: bool,
    /// Mixed precision: compute in bf16 or f16 while the weights (--dtype, f32) stay the
    /// master copy the optimiser updates; for GPUs' tensor cores.
    #[arg(long)]
    compute_dtype: Option<String>,
    #[command(flatten)]
    rows: RowArgs,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// A fine-tuned pair classifier (a directory, or any model source).
    #[arg(long)]
    model: String,
    /// Labelled pairs: TSV, CSV or JSONL with text_a, text_b, label.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    rows: RowArgs,
    #[command(flatten)]
    run: RunArgs,
}

/// Where and in which dtype a model runs.
#[derive(Args)]
struct RunArgs {
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

impl RunArgs {
    fn device(&self) -> Result<bert::Device> {
        Ok(self.device.parse::<DeviceSpec>()?.open()?)
    }

    fn dtype(&self) -> Result<DType> {
        Ok(parse_dtype(&self.dtype)?)
    }
}

/// How labelled pair files are read.
#[derive(Args)]
struct RowArgs {
    /// skip or fail on unusable rows.
    #[arg(long, default_value = "fail")]
    bad_rows: String,
    /// Token limit per pair (default: the model's positions).
    #[arg(long)]
    max_length: Option<usize>,
}

fn bad_rows(policy: &str) -> Result<BadRows> {
    match policy {
        "fail" => Ok(BadRows::Fail),
        "skip" => Ok(BadRows::Skip),
        other => anyhow::bail!("--bad-rows {other:?}: expected skip or fail"),
    }
}

fn read_labelled(
    path: &std::path::Path,
    loss: Loss,
    num_labels: usize,
    policy: BadRows,
) -> Result<Dataset> {
    let data = read_dataset(path, None, loss, num_labels, policy)?;
    for skipped in &data.skipped {
        eprintln!("skipped {skipped}");
    }
    Ok(data)
}

fn finetune(args: FinetuneArgs) -> Result<()> {
    let device = args.run.device()?;
    let dtype = args.run.dtype()?;
    let base = args
        .model
        .parse::<ModelSource>()?
        .fetch()
        .with_context(|| format!("cannot load model {}", args.model))?;
    // The loss the trainer will use decides which labels are valid.
    let loss = Loss::for_config(&head_config(&base.read_config()?, args.num_labels));
    let policy = bad_rows(&args.rows.bad_rows)?;
    let train_data = read_labelled(&args.train, loss, args.num_labels, policy)?;
    let eval_data = args
        .eval
        .as_deref()
        .map(|p| read_labelled(p, loss, args.num_labels, policy))
        .transpose()?;
    let cfg = TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        lr: args.lr,
        warmup_ratio: args.warmup_ratio,
        weight_decay: args.weight_decay,
        seed: args.seed,
        eval_steps: args.eval_steps,
        max_length: args.rows.max_length,
        batching: if args.uniform_batches {
            Batching::Uniform
        } else {
            Batching::LengthBuckets
        },
        trainable: trainable_of(&args)?,
        num_labels: args.num_labels,
        dtype,
        compute_dtype: args.compute_dtype.as_deref().map(parse_dtype).transpose()?,
        resume: args.resume,
        overwrite: args.overwrite,
        ..TrainConfig::default()
    };
    eprintln!(
        "fine-tuning {} on {} pairs ({} eval) | loss {loss:?} | device {}",
        args.model,
        train_data.pairs.len(),
        eval_data.as_ref().map_or(0, |d| d.pairs.len()),
        device_name(&device)
    );
    let summary = train(
        &base,
        &train_data,
        eval_data.as_ref(),
        &args.out,
        &cfg,
        &device,
    )?;
    let report = json!({
        "steps": summary.steps,
        "pairs_per_s": summary.pairs_per_second,
        "best": summary.best.map(|(score, step)| json!({"score": score, "step": step})),
        "final": summary.final_metrics,
        "model": summary.model_dir,
    });
    println!("{report}");
    Ok(())
}

/// Which weights `finetune` trains, from its flags.
fn trainable_of(args: &FinetuneArgs) -> Result<Trainable> {
    let Some(rank) = args.lora else {
        return Ok(if args.freeze_encoder {
            Trainable::HeadOnly
        } else {
            Trainable::All
        });
    };
    let targets: Vec<&str> = args.lora_targets.iter().map(String::as_str).collect();
    let mut lora =
        bert::LoraConfig::new(rank as usize, args.lora_alpha, args.lora_dropout, &targets);
    // The adapter names its base as the user did, so it loads wherever that name resolves; a
    // directory is recorded as an absolute path.
    lora.base_model_name_or_path = Some(match std::fs::canonicalize(&args.model) {
        Ok(dir) if dir.is_dir() => dir.to_string_lossy().into_owned(),
        _ => args.model.clone(),
    });
    lora.validate()
        .map_err(|e| anyhow::anyhow!("--lora: {e}"))?;
    Ok(Trainable::Lora(Box::new(lora)))
}

fn merge(args: MergeArgs) -> Result<()> {
    let files = args
        .model
        .parse::<ModelSource>()?
        .fetch()
        .with_context(|| format!("cannot load adapter {}", args.model))?;
    merge_adapter(&files, &args.out)?;
    eprintln!("merged {} into {}", args.model, args.out.display());
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = args.run.device()?;
    let files = args.model.parse::<ModelSource>()?.fetch()?;
    let config = files.read_config()?;
    let data = read_labelled(
        &args.data,
        Loss::for_config(&config),
        config.num_labels,
        bad_rows(&args.rows.bad_rows)?,
    )?;
    let model =
        bert::load::<bert::BertForSequenceClassification>(&files, args.run.dtype()?, &device)?
            .model;
    let path = files
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{}: no tokenizer.json", files.dir.display()))?;
    let max_length = args
        .rows
        .max_length
        .unwrap_or(config.max_position_embeddings);
    let tokenizer = BertTokenizer::from_file(path, TokenizeOptions::new(max_length))?;
    let metrics = evaluate(&model, &tokenizer, &data.pairs, &device)?;
    println!(
        "{}",
        json!({"pairs": data.pairs.len(), "skipped": data.skipped.len(), "metrics": metrics})
    );
    Ok(())
}

/// Which model, where, and how text is fitted to it.
#[derive(Args)]
struct ModelArgs {
    /// A shipped model name, a model directory, a manifest.json, or hf:ORG/NAME[@REV]. Default:
    /// score and rank use the bundled cross-encoder (minilm-lee-cross-encoder; with --mode bi,
    /// all-MiniLM-L6-v2), embed uses all-MiniLM-L6-v2.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    run: RunArgs,
    /// Token limit per sequence (default: the model's position limit).
    #[arg(long)]
    max_length: Option<usize>,
    /// longest_first, only_first or only_second.
    #[arg(long, default_value = "longest_first")]
    truncation: String,
    /// Fail on over-long input instead of truncating it.
    #[arg(long)]
    error_on_overflow: bool,
    /// Cap on padded tokens per forward pass.
    #[arg(long, default_value_t = 8192)]
    batch_tokens: usize,
}

impl ModelArgs {
    /// The named model, or `default` when none is named.
    fn name<'a>(&'a self, default: &'a str) -> &'a str {
        self.model.as_deref().unwrap_or(default)
    }

    fn options(&self) -> Result<PipelineOptions> {
        Ok(PipelineOptions {
            device: self.run.device.parse::<DeviceSpec>()?,
            dtype: self.run.dtype()?,
            max_length: self.max_length,
            truncation: self.truncation.parse::<Truncation>()?,
            error_on_overflow: self.error_on_overflow,
            max_tokens_per_batch: self.batch_tokens,
            // Pair files refuse empty texts too (with their line); see tests/BAD_INPUT.md.
            allow_empty_texts: false,
        })
    }
}

#[derive(Args)]
struct ScoreArgs {
    /// First text.
    #[arg(required_unless_present = "input", conflicts_with = "input")]
    text_a: Option<String>,
    /// Second text.
    #[arg(required_unless_present = "input", conflicts_with = "input")]
    text_b: Option<String>,
    /// Score every pair of this file; one JSON line per row, in input order.
    #[arg(long)]
    input: Option<PathBuf>,
    /// Format of --input (default: from the extension).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// auto (cross-encoder when the model has a trained one-label head), cross or bi (cosine of
    /// mean-pooled embeddings).
    #[arg(long, default_value = "auto")]
    mode: String,
    /// Pairs per chunk when streaming a file.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..))]
    chunk: u64,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct RankArgs {
    /// The query.
    #[arg(long)]
    query: String,
    /// Documents: one per line, or JSONL with a "text" field.
    #[arg(long)]
    docs: PathBuf,
    /// Print only the best K.
    #[arg(long)]
    top: Option<usize>,
    /// auto, cross or bi.
    #[arg(long, default_value = "auto")]
    mode: String,
    #[command(flatten)]
    model: ModelArgs,
}

#[derive(Args)]
struct EmbedArgs {
    /// Texts to embed.
    #[arg(required_unless_present = "input", conflicts_with = "input")]
    texts: Vec<String>,
    /// Embed every text of this file (one per line, or JSONL with "text").
    #[arg(long)]
    input: Option<PathBuf>,
    /// mean or cls.
    #[arg(long, default_value = "mean")]
    pooling: String,
    /// Scale vectors to unit length.
    #[arg(long)]
    normalize: bool,
    #[command(flatten)]
    model: ModelArgs,
}

fn parse_mode(mode: &str) -> Result<Option<ScoreMode>> {
    Ok(match mode {
        "auto" => None,
        other => Some(other.parse::<ScoreMode>()?),
    })
}

fn load_scorer(model: &ModelArgs, mode: &str) -> Result<PairScorer> {
    let options = model.options()?;
    let mode = parse_mode(mode)?;
    let name = model.name(default_scorer_model(mode));
    let scorer = PairScorer::load(&name.parse::<ModelSource>()?, &options, mode)
        .with_context(|| format!("cannot load model {name}"))?;
    eprintln!(
        "model: {name} | mode: {} | device: {}",
        scorer.mode().describe(),
        device_name(scorer.device())
    );
    Ok(scorer)
}

fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    let bar = match total {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{spinner} {msg} [{bar:30}] {pos}/{len} ({per_sec}, eta {eta})"
    } else {
        "{spinner} {msg} {pos} ({per_sec})"
    };
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

fn score(args: ScoreArgs) -> Result<()> {
    let scorer = load_scorer(&args.model, &args.mode)?;
    let stdout = std::io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let Some(path) = &args.input else {
        let (a, b) = (
            args.text_a.unwrap_or_default(),
            args.text_b.unwrap_or_default(),
        );
        let score = scorer.score(&[(&a, &b)])?[0];
        writeln!(out, "{score:.6}")?;
        return Ok(out.flush()?);
    };
    let bar = progress(None, "scoring");
    let mut rows = read_pairs(path, args.format)?;
    let mut chunk = Vec::with_capacity(args.chunk as usize);
    loop {
        // A bad row ends the run, but only after every good row before it is scored and written.
        let mut failure = None;
        while chunk.len() < args.chunk as usize {
            match rows.next() {
                Some(Ok(row)) => chunk.push(row),
                Some(Err(e)) => {
                    failure = Some(e);
                    break;
                }
                None => break,
            }
        }
        if !chunk.is_empty() {
            let pairs: Vec<(&str, &str)> = chunk
                .iter()
                .map(|r| (r.text_a.as_str(), r.text_b.as_str()))
                .collect();
            let scores = scorer.score(&pairs).with_context(|| {
                format!(
                    "{}:{}-{}",
                    path.display(),
                    chunk[0].line,
                    chunk[chunk.len() - 1].line
                )
            })?;
            for (row, score) in chunk.iter().zip(scores) {
                writeln!(out, "{}", json!({"line": row.line, "score": score}))?;
            }
            out.flush()?;
            bar.inc(chunk.len() as u64);
        }
        if let Some(e) = failure {
            bar.finish_and_clear();
            return Err(e);
        }
        if chunk.len() < args.chunk as usize {
            break;
        }
        chunk.clear();
    }
    bar.finish_and_clear();
    Ok(())
}

fn rank(args: RankArgs) -> Result<()> {
    let docs = read_texts(&args.docs)?;
    let scorer = load_scorer(&args.model, &args.mode)?;
    let texts: Vec<&str> = docs.iter().map(|d| d.text.as_str()).collect();
    let ranked = scorer.rank(&args.query, &texts)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (position, r) in ranked
        .iter()
        .take(args.top.unwrap_or(usize::MAX))
        .enumerate()
    {
        let doc = &docs[r.index];
        writeln!(
            out,
            "{}",
            json!({"rank": position + 1, "index": r.index, "line": doc.line, "score": r.score, "text": doc.text})
        )?;
    }
    Ok(out.flush()?)
}

fn embed(args: EmbedArgs) -> Result<()> {
    let rows: Vec<String> = match &args.input {
        Some(path) => read_texts(path)?.into_iter().map(|r| r.text).collect(),
        None => args.texts.clone(),
    };
    let options = args.model.options()?;
    let name = args.model.name(bert::DEFAULT_MODEL);
    let embedder = Embedder::load(&name.parse::<ModelSource>()?, &options)
        .with_context(|| format!("cannot load model {name}"))?
        .with_pooling(args.pooling.parse::<Pooling>()?)
        .with_normalize(args.normalize);
    let bar = progress(Some(rows.len() as u64), "embedding");
    let mut out = BufWriter::new(std::io::stdout().lock());
    for (chunk_index, chunk) in rows.chunks(256).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for (i, vector) in embedder.embed(&texts)?.into_iter().enumerate() {
            writeln!(
                out,
                "{}",
                json!({"index": chunk_index * 256 + i, "embedding": vector})
            )?;
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out.flush()?)
}

fn run_selftest(args: SelftestArgs) -> Result<()> {
    let device = args.device.parse::<DeviceSpec>()?.open()?;
    let (model, expected, origin) = match (&args.model, &args.reference) {
        (Some(model), Some(reference)) => (
            model.as_str(),
            candle_core::safetensors::load(reference, &bert::Device::Cpu)
                .with_context(|| format!("reading {}", reference.display()))?,
            reference.display().to_string(),
        ),
        _ => (
            bert::DEFAULT_MODEL,
            selftest::fixture()?,
            "tests/fixtures/minilm".to_string(),
        ),
    };
    let files = model.parse::<ModelSource>()?.fetch()?;
    println!(
        "selftest on {}: {model} against HF transformers' outputs ({origin})",
        device_name(&device)
    );
    let mut checks = bert::selftest::run(&files, &device, &expected)?;
    // Training's optimiser too, where it can differ from the CPU's (its own CUDA kernel).
    if !device.is_cpu() {
        checks.push(bert::selftest::Check {
            name: "AdamW, 3 updates, vs the CPU".into(),
            value: bert_finetune::device_agreement(&device)?,
            limit: bert::selftest::Limit::AtMost(1e-6),
        });
    }
    for check in &checks {
        println!("  {}", check.line());
    }
    let failed = checks.iter().filter(|check| !check.passed()).count();
    anyhow::ensure!(failed == 0, "{failed} of {} checks failed", checks.len());
    println!("all {} checks passed", checks.len());
    Ok(())
}

fn main() -> ExitCode {
    bert::allocator::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(args) => score(args),
        Command::Rank(args) => rank(args),
        Command::Embed(args) => embed(args),
        Command::Finetune(args) => finetune(args),
        Command::Eval(args) => eval(args),
        Command::Merge(args) => merge(args),
        Command::Selftest(args) => run_selftest(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
