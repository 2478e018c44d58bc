//! `bert finetune` / `bert eval` end to end on the tiny random cross-encoder (no download):
//! outputs in transformers' layout, metrics log and curve, bad rows, and SIGKILL + --resume
//! reproducing the uninterrupted run's final metrics exactly.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tiny() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tiny-cross-encoder")
        .display()
        .to_string()
}

/// Deterministic labelled pairs over the tiny vocabulary: label 1 when the texts are equal.
fn write_data(dir: &Path, name: &str, rows: usize, salt: usize) -> PathBuf {
    let words = [
        "the",
        "a",
        "man",
        "woman",
        "is",
        "playing",
        "guitar",
        "someone",
        "an",
        "instrument",
        "slicing",
        "onion",
    ];
    let mut text = String::from("text_a\ttext_b\tlabel\n");
    for i in 0..rows {
        let pick = |k: usize| words[(i * 7 + k * 5 + salt) % words.len()];
        let a = format!("{} {} {}", pick(1), pick(2), pick(i % 3 + 3));
        let (b, label) = if i % 2 == 0 {
            (a.clone(), 1)
        } else {
            (format!("{} {}", pick(4), pick(6)), 0)
        };
        text.push_str(&format!("{a}\t{b}\t{label}\n"));
    }
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A temporary directory with training and evaluation files of (rows, salt), and the paths
/// of the tiny model and both files.
fn workspace(
    train: (usize, usize),
    eval: (usize, usize),
) -> (tempfile::TempDir, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str, (rows, salt): (usize, usize)| {
        write_data(dir.path(), name, rows, salt)
            .display()
            .to_string()
    };
    let (train, eval) = (path("train.tsv", train), path("eval.tsv", eval));
    (dir, tiny(), train, eval)
}

fn finetune_args<'a>(model: &'a str, train: &'a str, eval: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "finetune",
        "--model",
        model,
        "--train",
        train,
        "--eval",
        eval,
        "--out",
        out,
        "--epochs",
        "3",
        "--batch-size",
        "4",
        "--eval-steps",
        "4",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--seed",
        "7",
    ]
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bert"))
        .args(args)
        .output()
        .unwrap()
}

fn run_owned(args: &[String]) -> Output {
    run(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn saved_step(out: &Path) -> u64 {
    std::fs::read_to_string(out.join("last").join("trainer_state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["step"].as_u64())
        .unwrap_or(0)
}

#[test]
fn sigkill_then_resume_reproduces_the_uninterrupted_run() {
    kill_and_resume(&[], Damage::None);
}

#[test]
fn sigkill_then_resume_reproduces_the_uninterrupted_lora_run() {
    // Adapter dropout on, so the resumed run must also restore the dropout stream.
    kill_and_resume(
        &["--lora", "4", "--lora-alpha", "16", "--lora-dropout", "0.1"],
        Damage::None,
    );
}

#[test]
fn damaged_last_checkpoint_falls_back_to_the_previous_one() {
    kill_and_resume(&[], Damage::LastWeights);
}

#[test]
fn full_disk_while_writing_a_checkpoint_keeps_the_last_one() {
    let (dir, model, train, eval) = workspace((48, 0), (16, 3));
    let whole = dir.path().join("whole").display().to_string();
    let expected = report(&run(&finetune_args(&model, &train, &eval, &whole)));
    let out = dir.path().join("full");
    let out_str = out.display().to_string();
    // The third checkpoint write fails as a full disk does: after step 4's best/ and last/.
    let failed = Command::new(env!("CARGO_BIN_EXE_bert"))
        .args(finetune_args(&model, &train, &eval, &out_str))
        .env("BERT_FINETUNE_TEST_FULL_DISK_AT_WRITE", "3")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert_eq!(failed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert_eq!(saved_step(&out), 4, "the last good checkpoint is step 4's");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".staging-"))
        .collect();
    assert!(leftovers.is_empty(), "half-written: {leftovers:?}");
    // With space again, the run resumes from it and ends as the uninterrupted one.
    let mut args = finetune_args(&model, &train, &eval, &out_str);
    args.push("--resume");
    let resumed = report(&run(&args));
    assert_eq!(resumed["final"], expected["final"]);
    assert_eq!(resumed["best"], expected["best"]);
}

#[test]
fn resume_refuses_a_run_with_other_settings_or_data() {
    let (dir, model, train, eval) = workspace((24, 0), (8, 3));
    let out = dir.path().join("run").display().to_string();
    let finished = report(&run(&finetune_args(&model, &train, &eval, &out)));
    let resume_with = |train: &str, lr: &str| {
        let mut args = finetune_args(&model, train, &eval, &out);
        let at = args.iter().position(|a| *a == "--lr").unwrap() + 1;
        args[at] = lr;
        args.push("--resume");
        run(&args)
    };
    let refused = |out: &Output| {
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("belongs to a run with other settings or data"),
            "{stderr}"
        );
        stderr
    };

    // Another learning rate: the schedule would not be the run's.
    let stderr = refused(&resume_with(&train, "2e-3"));
    assert!(
        stderr.contains("lr: 0.001 in the checkpoint, 0.002 now"),
        "{stderr}"
    );
    assert!(!stderr.contains("train_data"), "{stderr}");
    // Other training data, same length: the batches would index other pairs.
    let other = write_data(dir.path(), "other.tsv", 24, 1)
        .display()
        .to_string();
    let stderr = refused(&resume_with(&other, "1e-3"));
    assert!(
        stderr.contains("train_data: \"24 pairs, sha256 "),
        "{stderr}"
    );
    assert!(!stderr.contains("lr:"), "{stderr}");
    // The run's own settings and data resume (it had finished: nothing left to train).
    let resumed = report(&resume_with(&train, "1e-3"));
    assert_eq!(resumed["steps"], finished["steps"]);
    assert_eq!(resumed["final"], finished["final"]);
}

#[test]
fn an_output_directory_holding_a_run_is_refused_unless_resumed_or_overwritten() {
    let (dir, tiny_model, train, eval) = workspace((24, 0), (8, 3));
    // A copy of the base model, so that a failing guard cannot overwrite the fixture.
    let base = dir.path().join("base");
    std::fs::create_dir(&base).unwrap();
    for entry in std::fs::read_dir(&tiny_model).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, base.join(path.file_name().unwrap())).unwrap();
    }
    let model = base.display().to_string();
    let out = dir.path().join("run");
    let out_str = out.display().to_string();
    report(&run(&finetune_args(&model, &train, &eval, &out_str)));
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    let refused = |out: &Output, expected: &str| {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    };

    // A second run into the same directory: refused, the first run's files untouched.
    refused(
        &run(&finetune_args(&model, &train, &eval, &out_str)),
        "already holds a run (last, last.previous, best, metrics.jsonl, training_curve.svg, \
         config.json, model.safetensors, tokenizer.json): pass --resume to continue it, \
         --overwrite to replace it",
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    // --overwrite replaces it: a LoRA run leaves none of the whole model's files behind.
    let mut args = finetune_args(&model, &train, &eval, &out_str);
    args.extend(["--overwrite", "--lora", "4"]);
    report(&run(&args));
    assert!(!out.join("model.safetensors").exists());
    assert!(out.join("adapter_model.safetensors").exists());
    // Both flags at once is a usage error.
    args.push("--resume");
    assert_eq!(run(&args).status.code(), Some(2));
    // The base model's own directory is never an output.
    refused(
        &run(&finetune_args(&model, &train, &eval, &model)),
        "is the base model's: choose another --out",
    );
    assert_eq!(
        std::fs::read(base.join("model.safetensors")).unwrap(),
        std::fs::read(Path::new(&tiny_model).join("model.safetensors")).unwrap()
    );
}

/// What to do to the checkpoint a killed run left before resuming it.
#[derive(Clone, Copy, PartialEq)]
enum Damage {
    None,
    /// Flip a byte of `last/`'s weights: the resume must notice and use `last.previous`.
    LastWeights,
}

/// Runs the recipe (plus `extra` flags) uninterrupted, then again killed with SIGKILL at a
/// random point after a random checkpoint and resumed; both must end with the same metrics,
/// best step and log.
fn kill_and_resume(extra: &[&str], damage: Damage) {
    let (dir, model, train, eval) = workspace((48, 0), (16, 3));
    let whole = dir.path().join("whole").display().to_string();
    let args_for = |out: &'_ str| -> Vec<String> {
        finetune_args(&model, &train, &eval, out)
            .into_iter()
            .chain(extra.iter().copied())
            .map(String::from)
            .collect()
    };
    let expected = report(&run_owned(&args_for(&whole)));
    assert_eq!(expected["steps"], 36);

    // Where to kill: after the checkpoint of a random step (every 4th is checkpointed;
    // at least 8 so that a previous checkpoint exists; at most 28, so the run cannot finish first),
    // plus a random 0-249 ms into what follows.
    let random = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let target = 8 + 4 * (random % 6);
    let extra_ms = (random >> 8) % 250;
    let context = format!("killed after the step-{target} checkpoint + {extra_ms} ms");

    let killed = dir.path().join("killed");
    let killed_str = killed.display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bert"))
        .args(args_for(&killed_str))
        .env("BERT_FINETUNE_TEST_STEP_DELAY_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while saved_step(&killed) < target {
        assert!(
            Instant::now() < deadline,
            "{context}: no checkpoint within a minute"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "{context}: the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(extra_ms));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let interrupted_at = saved_step(&killed);
    assert!(
        (8..36).contains(&interrupted_at),
        "{context}: saved step {interrupted_at}"
    );
    if damage == Damage::LastWeights {
        let weights = killed.join("last").join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(&weights, bytes).unwrap();
    }

    let mut args = args_for(&killed_str);
    args.push("--resume".into());
    let resumed_out = run_owned(&args);
    let resumed = report(&resumed_out);
    let stderr = String::from_utf8_lossy(&resumed_out.stderr);
    if damage == Damage::LastWeights {
        assert!(
            stderr.contains("is damaged (model.safetensors does not match its sha256")
                && stderr.contains("last.previous"),
            "{context}: {stderr}"
        );
    } else {
        assert!(!stderr.contains("damaged"), "{context}: {stderr}");
    }
    assert_eq!(resumed["steps"], expected["steps"], "{context}");
    assert_eq!(
        resumed["final"], expected["final"],
        "{context}: resumed final metrics differ"
    );
    assert_eq!(resumed["best"], expected["best"], "{context}");
    // Nothing half-written is left behind; only last/'s kept predecessor.
    let leftovers: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || (n.ends_with(".previous") && n != "last.previous"))
        .collect();
    assert!(leftovers.is_empty(), "{context}: {leftovers:?}");
    // The logs agree line for line too (throughput aside).
    let strip = |path: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("pairs_per_s");
                v
            })
            .collect()
    };
    assert_eq!(
        strip(&killed.join("metrics.jsonl")),
        strip(&dir.path().join("whole").join("metrics.jsonl")),
        "{context}"
    );
}

#[test]
fn finetune_writes_an_hf_checkpoint_that_eval_and_score_load() {
    let (dir, model, train, eval) = workspace((24, 0), (8, 1));
    let out = dir.path().join("out");
    let out_str = out.display().to_string();
    let summary = report(&run(&finetune_args(&model, &train, &eval, &out_str)));
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "metrics.jsonl",
        "training_curve.svg",
        "best/model.safetensors",
        "last/trainer_state.json",
        "last/optimizer.safetensors",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["0"], "LABEL_0");
    assert!(std::fs::read_to_string(out.join("training_curve.svg"))
        .unwrap()
        .contains("<polyline"));

    let evaluated = report(&run(&[
        "eval", "--model", &out_str, "--data", &eval, "--device", "cpu",
    ]));
    assert_eq!(evaluated["metrics"], summary["final"]);
    let score = run(&[
        "score", "--model", &out_str, "--device", "cpu", "the man", "the man",
    ]);
    assert!(String::from_utf8_lossy(&score.stderr).contains("cross-encoder"));

    // Bad rows: fail names the line; skip reports and goes on.
    let bad = dir.path().join("bad.tsv");
    std::fs::write(
        &bad,
        "text_a\ttext_b\tlabel\nthe man\tthe man\t1\nthe\tman\tNaN\na\tb\t2\n",
    )
    .unwrap();
    let bad_str = bad.display().to_string();
    let failed = run(&[
        "eval", "--model", &out_str, "--data", &bad_str, "--device", "cpu",
    ]);
    assert_eq!(failed.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("bad.tsv:3: label NaN is not finite"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    let skipped = run(&[
        "eval",
        "--model",
        &out_str,
        "--data",
        &bad_str,
        "--device",
        "cpu",
        "--bad-rows",
        "skip",
    ]);
    assert_eq!(report(&skipped)["skipped"], 2);
}

#[test]
fn finetune_with_lora_writes_a_peft_adapter_that_scores_and_merges() {
    let (dir, model, train, eval) = workspace((24, 0), (8, 1));
    let out = dir.path().join("out");
    let out_str = out.display().to_string();
    let mut args = finetune_args(&model, &train, &eval, &out_str);
    args.extend(["--lora", "4", "--lora-alpha", "16"]);
    let summary = report(&run(&args));
    for file in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.json",
        "tokenizer.json",
        "best/adapter_model.safetensors",
        "last/trainer_state.json",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    assert!(
        !out.join("model.safetensors").exists(),
        "an adapter run saves no whole model"
    );
    let adapter: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(adapter["r"], 4);
    assert_eq!(adapter["lora_alpha"], 16.0);
    assert_eq!(adapter["task_type"], "SEQ_CLS");
    let base = std::fs::canonicalize(&model).unwrap();
    assert_eq!(
        adapter["base_model_name_or_path"],
        base.display().to_string()
    );
    let names: Vec<String> = candle_core::safetensors::load(
        out.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap()
    .into_keys()
    .collect();
    assert_eq!(names.len(), 28, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("base_model.model.")
        && (n.contains(".lora_A.") || n.contains(".lora_B.") || n.contains(".classifier."))));

    // eval and score load the adapter through its base; merge makes a plain checkpoint that
    // scores the same.
    let evaluated = report(&run(&[
        "eval", "--model", &out_str, "--data", &eval, "--device", "cpu",
    ]));
    assert_eq!(evaluated["metrics"], summary["final"]);
    let merged = dir.path().join("merged").display().to_string();
    let merge = run(&["merge", "--model", &out_str, "--out", &merged]);
    assert!(
        merge.status.success(),
        "{}",
        String::from_utf8_lossy(&merge.stderr)
    );
    let score = |model: &str| -> f64 {
        let out = run(&[
            "score",
            "--model",
            model,
            "--device",
            "cpu",
            "the man",
            "a man is playing",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let (adapted, plain, untrained) = (score(&out_str), score(&merged), score(&model));
    assert!((adapted - plain).abs() < 1e-5, "{adapted} vs {plain}");
    assert!(
        (adapted - untrained).abs() > 1e-6,
        "training changed nothing"
    );

    // Merging a whole model is refused with a reason.
    let refused = run(&[
        "merge",
        "--model",
        &merged,
        "--out",
        &dir.path().join("again").display().to_string(),
    ]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a LoRA adapter"));
}

#[test]
fn bf16_compute_trains_f32_weights_like_an_f32_run() {
    let (dir, model, train, eval) = workspace((24, 0), (8, 1));
    let mut finals = Vec::new();
    for compute in [None, Some("bf16")] {
        let out = dir
            .path()
            .join(format!("out-{}", compute.unwrap_or("f32")))
            .display()
            .to_string();
        let mut args = finetune_args(&model, &train, &eval, &out);
        if let Some(dtype) = compute {
            args.extend(["--compute-dtype", dtype]);
        }
        let summary = report(&run(&args));
        // The saved weights are the f32 master copy.
        let weights = candle_core::safetensors::load(
            Path::new(&out).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        assert!(weights
            .values()
            .all(|t| t.dtype() == candle_core::DType::F32));
        finals.push(summary["final"].clone());
    }
    println!("final metrics, f32 / bf16 compute: {finals:?}");
    let pearson = |v: &serde_json::Value| v["pearson"].as_f64().unwrap();
    assert_ne!(finals[0], finals[1], "bf16 compute changed nothing");
    assert_eq!(finals[0]["accuracy"], finals[1]["accuracy"], "{finals:?}");
    assert!(
        (pearson(&finals[0]) - pearson(&finals[1])).abs() < 0.02,
        "{finals:?}"
    );
}
