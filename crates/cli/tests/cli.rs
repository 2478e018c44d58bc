//! The `bert` binary end to end: on a tiny random cross-encoder (no download) and on the real
//! default model (fetched once from its pinned carrier): score, file input in all three formats,
//! rank, embed, selftest, exit codes and error text.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tiny() -> String {
    fixtures().join("tiny-cross-encoder").display().to_string()
}

fn bert(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bert"))
        .args(args)
        .output()
        .expect("bert runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        stdout(out),
        stderr(out)
    );
    stdout(out)
}

fn jsonl(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn score_a_pair_with_the_tiny_cross_encoder() {
    let out = bert(&[
        "score",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "a man is playing",
        "someone is playing",
    ]);
    let score: f32 = ok(&out).trim().parse().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert!(
        stderr(&out).contains("mode: cross-encoder"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn file_input_in_three_formats_streams_results_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        ("a man is playing", "the guitar"),
        ("an onion", "slicing it"),
        ("x", "y"),
    ];
    let tsv = format!(
        "text_a\ttext_b\n{}",
        rows.iter()
            .map(|(a, b)| format!("{a}\t{b}\n"))
            .collect::<String>()
    );
    let csv = rows
        .iter()
        .map(|(a, b)| format!("\"{a}\",\"{b}\"\n"))
        .collect::<String>();
    let jsonl_text = rows
        .iter()
        .map(|(a, b)| format!("{{\"text_a\":\"{a}\",\"text_b\":\"{b}\"}}\n"))
        .collect::<String>();
    let expected: Vec<f64> = rows
        .iter()
        .map(|(a, b)| {
            ok(&bert(&[
                "score",
                "--model",
                &tiny(),
                "--device",
                "cpu",
                a,
                b,
            ]))
            .trim()
            .parse()
            .unwrap()
        })
        .collect();
    for (name, text, first_line) in [
        ("p.tsv", tsv, 2),
        ("p.csv", csv, 1),
        ("p.jsonl", jsonl_text, 1),
    ] {
        let path = write(&dir, name, &text);
        let results = jsonl(&ok(&bert(&[
            "score",
            "--model",
            &tiny(),
            "--device",
            "cpu",
            "--chunk",
            "2",
            "--input",
            &path,
        ])));
        assert_eq!(results.len(), rows.len(), "{name}");
        for (i, (result, score)) in results.iter().zip(&expected).enumerate() {
            assert_eq!(result["line"], first_line + i as u64, "{name}");
            assert!(
                (result["score"].as_f64().unwrap() - score).abs() < 1e-5,
                "{name} row {i}"
            );
        }
    }
}

/// The command failed with exit code 1 and said `needle` on stderr.
fn assert_fails(out: &Output, needle: &str) {
    assert_eq!(out.status.code(), Some(1), "{}", stderr(out));
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

#[test]
fn errors_name_the_file_line_and_cause_with_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.tsv").display().to_string();
    let out = bert(&[
        "score",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--input",
        &missing,
    ]);
    assert_fails(&out, "absent.tsv: No such file");

    let bad = write(
        &dir,
        "bad.jsonl",
        "{\"text_a\": \"a\", \"text_b\": \"b\"}\n{\"text_a\": \"a\"}\n",
    );
    let out = bert(&[
        "score",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--input",
        &bad,
    ]);
    assert_fails(&out, "bad.jsonl:2: missing \"text_b\"");
    // The good row before the bad one was still scored and written.
    let written = jsonl(&stdout(&out));
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["line"], 1);

    for args in [
        vec!["score"],
        vec!["score", "a"],
        vec!["frobnicate"],
        vec!["score", "--input", "x.tsv", "a", "b"],
    ] {
        assert_eq!(bert(&args).status.code(), Some(2), "{args:?}");
    }
    let out = bert(&["score", "--model", "no-such-model", "a", "b"]);
    assert_fails(&out, "no-such-model");
    // An empty text, on the command line or in a file, is an error naming it.
    let out = bert(&["score", "--model", &tiny(), "--device", "cpu", "a man", " "]);
    assert_fails(&out, "input pair 0 text_b: is empty");
    let empty = write(&dir, "empty.tsv", "a man\tsomeone\nx\t\n");
    let out = bert(&[
        "score",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--input",
        &empty,
    ]);
    assert_fails(&out, "empty.tsv:2: text_b is empty");
    let out = bert(&["score", "--model", &tiny(), "--device", "cuda", "a", "b"]);
    assert_fails(&out, "--features cuda");
    let out = bert(&[
        "score",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--mode",
        "bi",
        "--error-on-overflow",
        "--max-length",
        "4",
        "a man is playing",
        "b",
    ]);
    assert_fails(&out, "longer than the limit of 4");
    for command in ["score", "rank", "embed"] {
        assert!(
            ok(&bert(&[command, "--help"])).contains("--model"),
            "{command} --help"
        );
    }
}

#[test]
fn rank_and_embed_with_the_tiny_model() {
    let dir = tempfile::tempdir().unwrap();
    let docs = write(
        &dir,
        "docs.txt",
        "the onion\n\na man is playing the guitar\nsomeone\n",
    );
    let ranked = jsonl(&ok(&bert(&[
        "rank",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--query",
        "a man",
        "--docs",
        &docs,
    ])));
    assert_eq!(ranked.len(), 3);
    assert!(ranked
        .windows(2)
        .all(|w| w[0]["score"].as_f64() >= w[1]["score"].as_f64()));
    let lines: Vec<u64> = ranked.iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert!(lines.contains(&3) && !lines.contains(&2));
    assert_eq!(ranked[0]["rank"], 1);

    let vectors = jsonl(&ok(&bert(&[
        "embed",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--normalize",
        "one",
        "two words",
    ])));
    assert_eq!(vectors.len(), 2);
    let v = vectors[1]["embedding"].as_array().unwrap();
    assert_eq!(v.len(), 32);
    let norm: f64 = v
        .iter()
        .map(|x| x.as_f64().unwrap().powi(2))
        .sum::<f64>()
        .sqrt();
    assert!((norm - 1.0).abs() < 1e-4);
}

/// README command one, on the real default models: the bundled cross-encoder's probability,
/// and with `--mode bi` the base model's cosine.
#[test]
fn default_model_scores_the_guitar_pairs_in_the_right_order() {
    let guitar = "A man is playing a guitar.";
    let (instrument, onion) = (
        "Someone is playing an instrument.",
        "A woman is slicing an onion.",
    );
    let score = |args: &[&str]| -> f32 {
        let out = bert(args);
        ok(&out).trim().parse().unwrap()
    };
    let default = bert(&["score", guitar, instrument]);
    assert!(
        stderr(&default).contains("model: minilm-lee-cross-encoder | mode: cross-encoder"),
        "{}",
        stderr(&default)
    );
    let (p_instrument, p_onion) = (
        ok(&default).trim().parse::<f32>().unwrap(),
        score(&["score", guitar, onion]),
    );
    assert!(
        (0.0..=1.0).contains(&p_instrument) && p_instrument > p_onion + 0.1,
        "instrument {p_instrument} vs onion {p_onion}"
    );

    let (cos_instrument, cos_onion) = (
        score(&["score", "--mode", "bi", guitar, instrument]),
        score(&["score", "--mode", "bi", guitar, onion]),
    );
    assert!(
        cos_instrument > cos_onion + 0.2,
        "instrument {cos_instrument} vs onion {cos_onion}"
    );
    let base = score(&["score", "--model", "all-MiniLM-L6-v2", guitar, instrument]);
    assert_eq!(
        cos_instrument, base,
        "--mode bi without a model is the base's cosine"
    );

    let dir = tempfile::tempdir().unwrap();
    let docs = write(&dir, "docs.jsonl", "{\"text\": \"A woman is slicing an onion.\"}\n{\"text\": \"Someone is playing an instrument.\"}\n");
    let ranked = jsonl(&ok(&bert(&[
        "rank",
        "--query",
        "A man is playing a guitar.",
        "--docs",
        &docs,
        "--top",
        "1",
    ])));
    assert_eq!(ranked.len(), 1);
    assert_eq!(ranked[0]["index"], 1);
    let vectors = jsonl(&ok(&bert(&["embed", "hello"])));
    assert_eq!(vectors[0]["embedding"].as_array().unwrap().len(), 384);
}

#[test]
fn selftest_passes_on_the_cpu_and_names_a_missing_backend() {
    let report = ok(&bert(&["selftest", "--device", "cpu"]));
    assert!(report.starts_with("selftest on cpu:"), "{report}");
    assert_eq!(report.lines().filter(|l| l.ends_with(" ok")).count(), 20);
    assert!(report.contains("all 20 checks passed"), "{report}");
    // Another model with its own reference (how a GPU machine without the real weights runs
    // it): here the same model and fixture, given explicitly.
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/minilm/outputs.safetensors"
    );
    let explicit = ok(&bert(&[
        "selftest",
        "--device",
        "cpu",
        "--model",
        "all-MiniLM-L6-v2",
        "--reference",
        fixture,
    ]));
    assert!(explicit.contains("all 20 checks passed"), "{explicit}");
    let alone = bert(&["selftest", "--model", "all-MiniLM-L6-v2"]);
    assert_eq!(alone.status.code(), Some(2), "{}", stderr(&alone));
    assert!(stderr(&alone).contains("--reference"), "{}", stderr(&alone));
    // A build without the Metal back-end says how to get one.
    if !cfg!(feature = "metal") {
        assert_fails(
            &bert(&["selftest", "--device", "metal"]),
            "rebuild with `--features metal`",
        );
    }
}
