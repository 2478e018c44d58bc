//! The hub source with HF_HUB_OFFLINE: a cached model loads, a missing one is a clear error at
//! once; online with the hub unreachable, a clear error at once too. (One test per binary: it
//! sets process-wide environment variables.)

use std::time::{Duration, Instant};

use bert::{load, BertModel, DType, Device, ModelSource};
use bert_tests::fixture;

#[test]
fn offline_hub_reads_the_cache_and_fails_fast_on_a_miss() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub").join("models--acme--tiny-bert");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), commit).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixture("tiny-absolute-gelu").join(file),
            snapshot.join(file),
        )
        .unwrap();
    }
    std::env::set_var("HF_HOME", home.path());
    std::env::set_var("HF_HUB_OFFLINE", "1");

    for spec in ["hf:acme/tiny-bert", &format!("hf:acme/tiny-bert@{commit}")] {
        let files = spec.parse::<ModelSource>().unwrap().fetch().unwrap();
        assert_eq!(files.dir, snapshot);
        load::<BertModel>(&files, DType::F32, &Device::Cpu).unwrap();
    }

    let start = Instant::now();
    let message = "hf:acme/absent"
        .parse::<ModelSource>()
        .unwrap()
        .fetch()
        .unwrap_err()
        .to_string();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert!(
        message.contains("HF_HUB_OFFLINE") && message.contains("hf:acme/absent"),
        "{message}"
    );
    let message = "hf:acme/tiny-bert@v2"
        .parse::<ModelSource>()
        .unwrap()
        .fetch()
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("revision v2 is not in the hub cache"),
        "{message}"
    );

    // Online, with the hub's host refusing connections (port 9 on the loopback: nothing
    // listens there): a Fetch error at once, naming the host and the ways out.
    std::env::remove_var("HF_HUB_OFFLINE");
    std::env::set_var("HF_ENDPOINT", "http://127.0.0.1:9");
    let start = Instant::now();
    let error = "hf:acme/absent"
        .parse::<ModelSource>()
        .unwrap()
        .fetch()
        .unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(error, bert::Error::Fetch { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.contains("the hub (127.0.0.1:9) is unreachable")
            && message.contains("HF_HUB_OFFLINE=1"),
        "{message}"
    );
}
