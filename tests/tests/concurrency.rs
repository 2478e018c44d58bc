//! One model shared by many threads: every caller gets exactly (bit for bit) what a lone caller
//! gets, and 64 concurrent callers all finish (a deadlock fails the test at its deadline instead
//! of hanging the suite).

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bert::{DeviceSpec, Embedder, ModelFiles, PairScorer, PipelineOptions};
use bert_tests::{fixture, minilm_files};

const CALLERS: usize = 64;
const DEADLINE: Duration = Duration::from_secs(300);

fn cpu() -> PipelineOptions {
    PipelineOptions {
        device: DeviceSpec::Cpu,
        // Small batches, so one call runs several forward passes and callers interleave.
        max_tokens_per_batch: 64,
        ..PipelineOptions::default()
    }
}

/// Pair lists of different sizes and lengths: callers' batches pad differently.
fn workloads() -> Vec<Vec<(String, String)>> {
    let words = [
        "a man",
        "is playing",
        "a guitar",
        "someone",
        "an instrument",
        "slicing onions",
    ];
    (0..8)
        .map(|w| {
            (0..(w % 4 + 2))
                .map(|i| {
                    let text = |k: usize| {
                        (0..(i + k + w) % 6 + 1)
                            .map(|j| words[(i * 3 + j + k + w) % words.len()])
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    (text(1), text(2))
                })
                .collect()
        })
        .collect()
}

/// Runs `call(i)` on `CALLERS` threads at once; returns each caller's result in caller order.
fn run_concurrently<T: Send + 'static>(
    call: impl Fn(usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let call = Arc::new(call);
    let barrier = Arc::new(std::sync::Barrier::new(CALLERS));
    let (sender, receiver) = mpsc::channel();
    for caller in 0..CALLERS {
        let (call, barrier, sender) = (Arc::clone(&call), Arc::clone(&barrier), sender.clone());
        std::thread::spawn(move || {
            barrier.wait(); // all start together
            let _ = sender.send((caller, call(caller)));
        });
    }
    drop(sender);
    let start = Instant::now();
    let mut results: Vec<Option<T>> = (0..CALLERS).map(|_| None).collect();
    for _ in 0..CALLERS {
        let left = DEADLINE.saturating_sub(start.elapsed());
        match receiver.recv_timeout(left) {
            Ok((caller, result)) => results[caller] = Some(result),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let done = results.iter().filter(|r| r.is_some()).count();
                panic!("{done} of {CALLERS} callers finished within {DEADLINE:?}: deadlock?")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a caller panicked"),
        }
    }
    results.into_iter().map(Option::unwrap).collect()
}

#[test]
fn sixty_four_callers_share_one_cross_encoder_bit_for_bit() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let scorer = Arc::new(PairScorer::from_files(&files, &cpu(), None).unwrap());
    let workloads = Arc::new(workloads());
    let alone: Vec<Vec<f32>> = workloads
        .iter()
        .map(|w| {
            let pairs: Vec<(&str, &str)> =
                w.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            scorer.score(&pairs).unwrap()
        })
        .collect();
    let shared = Arc::clone(&scorer);
    let jobs = Arc::clone(&workloads);
    let together = run_concurrently(move |caller| {
        let w = &jobs[caller % jobs.len()];
        let pairs: Vec<(&str, &str)> = w.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        shared.score(&pairs).unwrap()
    });
    for (caller, scores) in together.iter().enumerate() {
        let expected = &alone[caller % alone.len()];
        let same_bits = scores
            .iter()
            .zip(expected)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same_bits && scores.len() == expected.len(),
            "caller {caller}: {scores:?} != {expected:?}"
        );
    }
}

#[test]
fn sixty_four_callers_share_one_minilm_embedder_bit_for_bit() {
    let embedder = Arc::new(Embedder::from_files(&minilm_files(), &cpu()).unwrap());
    let workloads = Arc::new(workloads());
    let texts_of =
        |w: &[(String, String)]| -> Vec<String> { w.iter().map(|(a, _)| a.clone()).collect() };
    let alone: Vec<Vec<Vec<f32>>> = workloads
        .iter()
        .map(|w| {
            let texts = texts_of(w);
            embedder
                .embed(&texts.iter().map(String::as_str).collect::<Vec<_>>())
                .unwrap()
        })
        .collect();
    let shared = Arc::clone(&embedder);
    let jobs = Arc::clone(&workloads);
    let together = run_concurrently(move |caller| {
        let texts = texts_of(&jobs[caller % jobs.len()]);
        shared
            .embed(&texts.iter().map(String::as_str).collect::<Vec<_>>())
            .unwrap()
    });
    for (caller, vectors) in together.iter().enumerate() {
        let expected = &alone[caller % alone.len()];
        let bits =
            |v: &Vec<Vec<f32>>| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
        assert_eq!(bits(vectors), bits(expected), "caller {caller}");
    }
}

/// Short passes run their loops on the spinning team when called from outside rayon's pool and
/// on rayon inside it; both, and a one-thread pool, give the same bits (each output element is
/// computed by one thread in the same order whichever thread that is).
#[test]
fn team_rayon_and_one_thread_passes_agree_bit_for_bit() {
    let embedder = Embedder::from_files(&minilm_files(), &cpu()).unwrap();
    let texts = [
        "A man is playing a guitar.",
        "Someone is playing an instrument, loudly, in the street outside.",
        "A woman is slicing onions.",
    ];
    let bits = |v: Vec<Vec<f32>>| -> Vec<u32> { v.iter().flatten().map(|x| x.to_bits()).collect() };
    let on_team = bits(embedder.embed(&texts).unwrap());
    for threads in [2, 1] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let in_pool = bits(pool.install(|| embedder.embed(&texts).unwrap()));
        assert_eq!(in_pool, on_team, "{threads}-thread pool");
    }
}
