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
    let dir = tempfile::tempdir().unwrap();
    let model = tiny();
    let train = write_data(dir.path(), "train.tsv", 48, 0)
        .display()
        .to_string();
    let eval = write_data(dir.path(), "eval.tsv", 16, 3)
        .display()
        .to_string();
    let whole = dir.path().join("whole").display().to_string();
    let expected = report(&run(&finetune_args(&model, &train, &eval, &whole)));
    assert_eq!(expected["steps"], 36);

    let killed = dir.path().join("killed");
    let killed_str = killed.display().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bert"))
        .args(finetune_args(&model, &train, &eval, &killed_str))
        .env("BERT_FINETUNE_TEST_STEP_DELAY_MS", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while saved_step(&killed) < 8 {
        assert!(
            Instant::now() < deadline,
            "no checkpoint at step 8 within a minute"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let interrupted_at = saved_step(&killed);
    assert!(
        (8..36).contains(&interrupted_at),
        "killed at step {interrupted_at}"
    );

    let mut args = finetune_args(&model, &train, &eval, &killed_str);
    args.push("--resume");
    let resumed = report(&run(&args));
    assert_eq!(resumed["steps"], expected["steps"]);
    assert_eq!(
        resumed["final"], expected["final"],
        "resumed final metrics differ"
    );
    assert_eq!(resumed["best"], expected["best"]);
    // Nothing half-written is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&killed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') || n.ends_with(".previous"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
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
        strip(&dir.path().join("whole").join("metrics.jsonl"))
    );
}

#[test]
fn finetune_writes_an_hf_checkpoint_that_eval_and_score_load() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny();
    let train = write_data(dir.path(), "train.tsv", 24, 0)
        .display()
        .to_string();
    let eval = write_data(dir.path(), "eval.tsv", 8, 1)
        .display()
        .to_string();
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
