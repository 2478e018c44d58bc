//! `bert`: score sentence pairs, rank documents and embed texts with BERT models.
//!
//! Exit codes: 0 success, 2 usage error (from clap), 1 any other failure. Errors go to stderr
//! and name the file, line and cause where there is one. Results go to stdout; progress bars
//! and notes go to stderr, so stdout can be piped.

mod input;

use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bert::{
    device::device_name, parse_dtype, DeviceSpec, Embedder, ModelSource, PairScorer,
    PipelineOptions, Pooling, ScoreMode, Truncation,
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
}

/// Which model, where, and how text is fitted to it.
#[derive(Args)]
struct ModelArgs {
    /// A shipped model name, a model directory, a manifest.json, or hf:ORG/NAME[@REV].
    #[arg(long, default_value = bert::DEFAULT_MODEL)]
    model: String,
    /// auto, cpu, cuda, cuda:N or metal.
    #[arg(long, default_value = "auto")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
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
    fn source(&self) -> Result<ModelSource> {
        Ok(self.model.parse::<ModelSource>()?)
    }

    fn options(&self) -> Result<PipelineOptions> {
        Ok(PipelineOptions {
            device: self.device.parse::<DeviceSpec>()?,
            dtype: parse_dtype(&self.dtype)?,
            max_length: self.max_length,
            truncation: self.truncation.parse::<Truncation>()?,
            error_on_overflow: self.error_on_overflow,
            max_tokens_per_batch: self.batch_tokens,
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
    /// auto (cross-encoder when the model has a trained one-label head), cross or bi.
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
    let scorer = PairScorer::load(&model.source()?, &options, mode)
        .with_context(|| format!("cannot load model {}", model.model))?;
    eprintln!(
        "model: {} | mode: {} | device: {}",
        model.model,
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
    let embedder = Embedder::load(&args.model.source()?, &options)
        .with_context(|| format!("cannot load model {}", args.model.model))?
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(args) => score(args),
        Command::Rank(args) => rank(args),
        Command::Embed(args) => embed(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
