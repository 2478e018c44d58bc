//! `bert::selftest` on the CPU: every check passes against transformers' fixture, and a moved
//! reference fails exactly the check that reads it (so the checks compare what they name).

use bert::selftest::{run, HALF_COSINE};
use bert::{Device, Tensor};
use bert_tests::{minilm_files, outputs};

#[test]
fn passes_on_the_cpu_and_fails_when_the_reference_moves() {
    let files = minilm_files();
    let expected = outputs("minilm");
    let checks = run(&files, &Device::Cpu, &expected).unwrap();
    assert_eq!(checks.len(), 2 * 10);
    for check in &checks {
        assert!(check.passed(), "{}", check.line());
    }
    // The half-precision checks measure something: not every cosine is exactly 1.
    assert!(checks
        .iter()
        .any(|check| check.value < 1.0 && check.value >= HALF_COSINE));

    // Moving one reference value by 2e-4 must fail exactly the check that reads it.
    let mut moved = expected.clone();
    let pooled = &expected["pair.pooler_output"];
    let bump = (Tensor::ones_like(pooled).unwrap() * 2e-4).unwrap();
    moved.insert("pair.pooler_output".into(), (pooled + bump).unwrap());
    let failed: Vec<_> = run(&files, &Device::Cpu, &moved)
        .unwrap()
        .into_iter()
        .filter(|check| !check.passed())
        .map(|check| check.name)
        .collect();
    assert_eq!(failed, ["pair f32 pooler_output vs transformers"]);
}

#[test]
fn a_reference_without_a_tensor_is_an_error() {
    let mut expected = outputs("minilm");
    expected.remove("single.attention_mask");
    let error = run(&minilm_files(), &Device::Cpu, &expected).unwrap_err();
    assert!(
        error.to_string().contains("single.attention_mask"),
        "{error}"
    );
}
