//! `bert-bench`: timings of this project's model, printed as one JSON object per measurement,
//! for the side-by-side benchmark scripts in `crates/bench/scripts/` (which run the peers in
//! the same invocation and write the tables).
//!
//! `train-step`: forward + backward + clipping + AdamW of a one-label pair classifier on a
//! fixed random batch (every position a real token), the work of one `bert finetune` step.

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
    },
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
        } => train_step(&model, batch, seq, warmup, steps, lora),
    }
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

fn train_step(
    model: &str,
    batch: usize,
    seq: usize,
    warmup: usize,
    steps: usize,
    lora: Option<usize>,
) -> Result<()> {
    let device = Device::Cpu;
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
    let model = load_trainable(&files, &config, trainable, DType::F32, &device, 0)?;
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
    let input_ids = Tensor::from_vec(ids, (batch, seq), &device)?;
    let token_type_ids = Tensor::from_vec(types, (batch, seq), &device)?;
    let attention_mask = Tensor::ones((batch, seq), DType::U32, &device)?;
    let labels = Tensor::from_vec(
        (0..batch).map(|i| (i % 2) as f32).collect::<Vec<_>>(),
        batch,
        &device,
    )?;
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
        let logits = model
            .model
            .forward(&inputs, &ForwardOptions::training())?
            .logits;
        let loss = loss_kind.compute(&logits, &labels)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let norm = grad_norm(&grads, &vars)?;
        optimizer.step_scaled(&grads, 2e-5, clip_scale(norm, 1.0))?;
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

fn model_name(model: &bert_finetune::TrainableClassifier) -> String {
    format!(
        "{}x{}",
        model.config.num_hidden_layers, model.config.hidden_size
    )
}
