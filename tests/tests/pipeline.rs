//! The pair scorer and embedder: HF parity of embeddings and cross-encoder probabilities on the
//! fixture texts, batching invariance, modes, and sharing one model between threads.

use std::sync::Arc;

use bert::{
    cosine_similarity, load, BertForSequenceClassification, BertInputs, BertTokenizer, DType,
    Device, Embedder, ForwardOptions, ModelFiles, ModelSource, PairScorer, PipelineOptions,
    Pooling, ScoreMode, Tensor, TokenizeOptions,
};
use bert_tests::{assert_close, fixture, minilm_classifier_files, minilm_files, outputs};

/// CPU, encoding empty texts as transformers does: the fixtures hold some, on purpose.
fn cpu() -> PipelineOptions {
    PipelineOptions {
        device: bert::DeviceSpec::Cpu,
        allow_empty_texts: true,
        ..PipelineOptions::default()
    }
}

fn texts() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("minilm").join("texts.json")).unwrap())
        .unwrap()
}

/// The fixture's sentence pairs, borrowed from its JSON.
fn pair_texts(texts: &serde_json::Value) -> Vec<(&str, &str)> {
    texts["pair"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap(), p[1].as_str().unwrap()))
        .collect()
}

/// Mean pooling of transformers' last hidden states over real tokens.
fn reference_mean_pool(prefix: &str) -> Tensor {
    let out = outputs("minilm");
    let hidden = &out[&format!("{prefix}.last_hidden_state")];
    let mask = out[&format!("{prefix}.attention_mask")]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    hidden
        .broadcast_mul(&mask)
        .unwrap()
        .sum(1)
        .unwrap()
        .broadcast_div(&mask.sum(1).unwrap())
        .unwrap()
}

#[test]
fn embeddings_match_mean_pooled_transformers_states() {
    let texts = texts();
    let singles: Vec<&str> = texts["single"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let embedder = Embedder::from_files(&minilm_files(), &cpu()).unwrap();
    let ours = Tensor::new(embedder.embed(&singles).unwrap(), &Device::Cpu).unwrap();
    assert_close(
        "mean-pooled embeddings",
        &ours,
        &reference_mean_pool("single"),
        5e-5,
    );

    let normalized = embedder
        .clone()
        .with_normalize(true)
        .embed(&singles)
        .unwrap();
    for v in &normalized {
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "norm {norm}");
    }
    let cls = embedder
        .with_pooling(Pooling::Cls)
        .embed(&singles[..1])
        .unwrap();
    let reference = outputs("minilm")["single.last_hidden_state"]
        .get(0)
        .unwrap()
        .get(0)
        .unwrap();
    assert_close(
        "CLS pooling",
        &Tensor::new(cls[0].as_slice(), &Device::Cpu).unwrap(),
        &reference,
        5e-5,
    );
}

/// Scores the fixture's pairs in one batch, checks guitar/instrument above guitar/onion and
/// that each pair scored alone gives its batched score; returns the batched scores.
fn score_fixture_pairs(scorer: &PairScorer, texts: &serde_json::Value) -> Vec<f32> {
    let pairs = pair_texts(texts);
    let scores = scorer.score(&pairs).unwrap();
    assert!(
        scores[0] > scores[1],
        "guitar/instrument {} vs guitar/onion {}",
        scores[0],
        scores[1]
    );
    assert_each_pair_scores_as_alone(scorer, &pairs, &scores);
    scores
}

/// Each of `pairs` scored alone gives its score in `batched` (within 1e-5).
fn assert_each_pair_scores_as_alone(scorer: &PairScorer, pairs: &[(&str, &str)], batched: &[f32]) {
    for (pair, batched) in pairs.iter().zip(batched) {
        let alone = scorer.score(&[*pair]).unwrap()[0];
        assert!(
            (alone - batched).abs() < 1e-5,
            "{pair:?}: {alone} vs {batched}"
        );
    }
}

#[test]
fn default_model_scores_by_cosine_and_ranks_sensibly() {
    let scorer = PairScorer::load(
        &bert::DEFAULT_MODEL.parse::<ModelSource>().unwrap(),
        &cpu(),
        None,
    )
    .unwrap();
    assert_eq!(scorer.mode(), ScoreMode::BiEncoder);
    let texts = texts();
    let pairs = pair_texts(&texts);
    let scores = score_fixture_pairs(&scorer, &texts);
    assert!(scores.iter().all(|s| (-1.0..=1.0).contains(s)));

    let tiny_batches = PairScorer::from_files(
        &minilm_files(),
        &PipelineOptions {
            max_tokens_per_batch: 1,
            ..cpu()
        },
        None,
    )
    .unwrap();
    let again = tiny_batches.score(&pairs).unwrap();
    for (a, b) in again.iter().zip(&scores) {
        assert!((a - b).abs() < 1e-5);
    }

    let ranking = scorer
        .rank(
            "Someone is playing an instrument.",
            &[
                "A woman is slicing an onion.",
                "A man is playing a guitar.",
                "The stock market fell.",
                "A man is playing a guitar.",
            ],
        )
        .unwrap();
    assert_eq!(ranking[0].index, 1);
    assert!(ranking.windows(2).all(|w| w[0].score >= w[1].score));
    // A repeated document gets the same score; ties keep input order.
    assert_eq!((ranking[1].index, ranking[1].score), (3, ranking[0].score));

    // Pairs that share texts (which the bi-encoder embeds once) score as each pair alone.
    let (guitar, instrument, onion) = (pairs[0].0, pairs[0].1, pairs[1].1);
    let shared = scorer
        .score(&[
            (guitar, instrument),
            (guitar, onion),
            (instrument, guitar),
            (onion, onion),
        ])
        .unwrap();
    assert_eq!(shared[0], shared[2], "the cosine is symmetric");
    assert!((shared[3] - 1.0).abs() < 1e-6, "a text against itself");
    assert_each_pair_scores_as_alone(&scorer, &[(guitar, instrument), (guitar, onion)], &shared);
}

/// The bundled cross-encoder: unpacked from the library, verified, loaded on the pinned base
/// as a cross-encoder, and scoring batches as it scores single pairs.
#[test]
fn bundled_cross_encoder_loads_on_its_base_and_scores() {
    let source = bert::LEE_CROSS_ENCODER.parse::<ModelSource>().unwrap();
    let files = source.fetch().unwrap();
    assert!(files.adapter.is_some(), "the bundled model is an adapter");
    let scorer = PairScorer::from_files(&files, &cpu(), None).unwrap();
    assert_eq!(scorer.mode(), ScoreMode::CrossEncoder);
    let texts = texts();
    let scores = score_fixture_pairs(&scorer, &texts);
    assert!(scores.iter().all(|s| (0.0..=1.0).contains(s)));

    // In a cache of its own (others may be reading the shared one): the unpacked copy is
    // reused, and a damaged one is replaced, never trusted.
    let manifest = bert::Manifest::builtin(bert::LEE_CROSS_ENCODER).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let dir = bert::source::fetch_manifest(&manifest, cache.path()).unwrap();
    assert_eq!(
        bert::source::fetch_manifest(&manifest, cache.path()).unwrap(),
        dir
    );
    let weights = dir.join(bert::lora::ADAPTER_WEIGHTS);
    std::fs::write(&weights, b"damaged").unwrap();
    assert_eq!(
        bert::source::fetch_manifest(&manifest, cache.path()).unwrap(),
        dir
    );
    assert_eq!(
        std::fs::read(&weights).unwrap(),
        manifest.bundled_file(bert::lora::ADAPTER_WEIGHTS).unwrap()
    );
}

/// With no model named, pair scoring uses the bundled cross-encoder; bi-encoder scoring uses
/// the base model, not the cross-encoder's fine-tuned encoder.
#[test]
fn default_scorer_is_the_bundled_cross_encoder_and_bi_mode_uses_the_base() {
    let texts = texts();
    let pairs = pair_texts(&texts);
    let default = PairScorer::load_default(&cpu(), None).unwrap();
    assert_eq!(default.mode(), ScoreMode::CrossEncoder);
    let bundled = PairScorer::load(
        &bert::LEE_CROSS_ENCODER.parse::<ModelSource>().unwrap(),
        &cpu(),
        None,
    )
    .unwrap();
    assert_eq!(
        default.score(&pairs).unwrap(),
        bundled.score(&pairs).unwrap()
    );

    let bi = PairScorer::load_default(&cpu(), Some(ScoreMode::BiEncoder)).unwrap();
    assert_eq!(bi.mode(), ScoreMode::BiEncoder);
    let base = PairScorer::from_files(&minilm_files(), &cpu(), None).unwrap();
    assert_eq!(bi.score(&pairs).unwrap(), base.score(&pairs).unwrap());
}

#[test]
fn untrained_heads_are_never_used_as_similarity() {
    // MiniLM has pooler weights but no trained classifier: cross mode is refused.
    let message = PairScorer::from_files(&minilm_files(), &cpu(), Some(ScoreMode::CrossEncoder))
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("BertForSequenceClassification"),
        "{message}"
    );
    // A three-label classifier is not a pair probability either.
    let files = minilm_classifier_files(3);
    let message = PairScorer::from_files(&files, &cpu(), Some(ScoreMode::CrossEncoder))
        .unwrap_err()
        .to_string();
    assert!(message.contains("3 labels"), "{message}");
}

/// The one-label classifier of the fixtures, scored through the pipeline, equals
/// sigmoid(transformers' logits) on the same token ids.
#[test]
fn cross_encoder_probabilities_match_transformers_logits() {
    let files = minilm_classifier_files(1);
    let scorer = PairScorer::from_files(&files, &cpu(), None).unwrap();
    assert_eq!(scorer.mode(), ScoreMode::CrossEncoder);
    let texts = texts();
    let pairs = pair_texts(&texts);
    let ours = Tensor::new(scorer.score(&pairs).unwrap(), &Device::Cpu).unwrap();
    let reference = candle_nn::ops::sigmoid(&outputs("minilm")["classifier1.logits"])
        .unwrap()
        .squeeze(1)
        .unwrap();
    assert_close("cross-encoder probabilities", &ours, &reference, 1e-5);
}

#[test]
fn tiny_cross_encoder_pipeline_equals_the_model_it_wraps() {
    let files = ModelFiles::from_dir(fixture("tiny-cross-encoder")).unwrap();
    let scorer = PairScorer::from_files(&files, &cpu(), None).unwrap();
    assert_eq!(scorer.mode(), ScoreMode::CrossEncoder);
    let pairs = [
        ("a man is playing a guitar", "someone is playing"),
        ("the onion", ""),
    ];
    let scores = scorer.score(&pairs).unwrap();

    let model = load::<BertForSequenceClassification>(&files, DType::F32, &Device::Cpu)
        .unwrap()
        .model;
    let tokenizer =
        BertTokenizer::from_file(files.tokenizer.as_ref().unwrap(), TokenizeOptions::new(64))
            .unwrap();
    for (pair, score) in pairs.iter().zip(scores) {
        let encoded = &tokenizer.encode_pairs(&[*pair]).unwrap()[0];
        let ids = Tensor::new(encoded.ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let types = Tensor::new(encoded.type_ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logit = model
            .forward(
                &BertInputs::new(&ids).with_token_type_ids(&types),
                &ForwardOptions::inference(),
            )
            .unwrap()
            .logits
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let expected = 1.0 / (1.0 + (-logit).exp());
        assert!(
            (score - expected).abs() < 1e-6,
            "{pair:?}: {score} vs {expected}"
        );
    }
}

#[test]
fn one_scorer_serves_many_threads_with_identical_results() {
    let scorer = Arc::new(PairScorer::from_files(&minilm_files(), &cpu(), None).unwrap());
    let pairs = [
        (
            "A man is playing a guitar.",
            "Someone is playing an instrument.",
        ),
        ("A cat.", "A dog."),
    ];
    let expected = scorer.score(&pairs).unwrap();
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let scorer = Arc::clone(&scorer);
            std::thread::spawn(move || scorer.score(&pairs).unwrap())
        })
        .collect();
    for handle in handles {
        assert_eq!(handle.join().unwrap(), expected);
    }
    assert!(cosine_similarity(&[1.0, 0.0], &[0.0, 1.0]).abs() < 1e-7);
}
