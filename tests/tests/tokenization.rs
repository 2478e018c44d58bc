//! Pair and text tokenization against transformers' tokenizer (tests/fixtures/tokenization.json,
//! from tests/scripts/generate_tokenizer_fixtures.py): accents, CJK, emoji, empty texts, and
//! texts past 512 tokens under each truncation strategy.

use bert::{BertTokenizer, TokenizeOptions, Truncation};
use bert_tests::{fixtures_dir, minilm_files};

fn fixture() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures_dir().join("tokenization.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn tokenizer(truncation: Truncation, error_on_overflow: bool) -> BertTokenizer {
    let path = minilm_files()
        .tokenizer
        .expect("MiniLM ships tokenizer.json");
    BertTokenizer::from_file(
        &path,
        TokenizeOptions {
            max_length: 512,
            truncation,
            error_on_overflow,
        },
    )
    .unwrap()
}

#[test]
fn pairs_match_transformers_under_every_truncation_strategy() {
    let fixture = fixture();
    let cases = fixture["pairs"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let truncation: Truncation = case["truncation"].as_str().unwrap().parse().unwrap();
        let (a, b) = (
            case["text_a"].as_str().unwrap(),
            case["text_b"].as_str().unwrap(),
        );
        let encoded = &tokenizer(truncation, false)
            .encode_pairs(&[(a, b)])
            .unwrap()[0];
        let what = format!(
            "{truncation:?} {:?} / {:?}",
            &a[..a.len().min(30)],
            &b[..b.len().min(30)]
        );
        assert_eq!(encoded.ids, ids(&case["input_ids"]), "input_ids of {what}");
        assert_eq!(
            encoded.type_ids,
            ids(&case["token_type_ids"]),
            "token_type_ids of {what}"
        );
        assert_eq!(
            encoded.truncated,
            encoded.len() == 512 && (a.len() + b.len()) > 2000,
            "truncated flag of {what}"
        );
    }
}

#[test]
fn single_texts_match_transformers_and_baked_padding_is_gone() {
    let fixture = fixture();
    let tokenizer = tokenizer(Truncation::LongestFirst, false);
    for case in fixture["singles"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let encoded = &tokenizer.encode_texts(&[text]).unwrap()[0];
        assert_eq!(encoded.ids, ids(&case["input_ids"]), "{text:?}");
        assert!(encoded.type_ids.iter().all(|&t| t == 0));
    }
    // all-MiniLM-L6-v2's tokenizer.json pads everything to 128: not here.
    assert_eq!(
        tokenizer.encode_texts(&["Hello world!"]).unwrap()[0].len(),
        5
    );
}

#[test]
fn overflow_is_an_error_when_asked_and_impossible_truncation_is_reported() {
    let fixture = fixture();
    let long = fixture["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["truncation"] == "only_first")
        .unwrap();
    let (a, b) = (
        long["text_a"].as_str().unwrap(),
        long["text_b"].as_str().unwrap(),
    );
    let message = tokenizer(Truncation::OnlyFirst, true)
        .encode_pairs(&[("ok", "fine"), (a, b)])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("pair 1") && message.contains("512"),
        "{message}"
    );
    // only_second cannot shorten a pair whose first text alone is too long.
    let message = tokenizer(Truncation::OnlySecond, false)
        .encode_pairs(&[(a, b)])
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("pair 0") && message.contains("OnlySecond"),
        "{message}"
    );
}
