//! Labelled pairs for training and evaluation, and how they are batched.

use std::path::Path;

use bert::bert_embeddings::nn::SplitMix64;
use bert::{read_pair_records, PairFormat};

use crate::error::{Error, Result};
use crate::loss::Loss;

/// One labelled pair.
#[derive(Debug, Clone, PartialEq)]
pub struct LabeledPair {
    /// 1-based line in its file.
    pub line: u64,
    /// First text.
    pub text_a: String,
    /// Second text.
    pub text_b: String,
    /// A float in [0, 1] (similarity, binary) or a class index.
    pub label: f32,
}

impl LabeledPair {
    /// The two texts.
    pub fn texts(&self) -> (&str, &str) {
        (&self.text_a, &self.text_b)
    }
}

/// What to do with a row that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BadRows {
    /// Stop at the first bad row with its error.
    #[default]
    Fail,
    /// Leave bad rows out and report each.
    Skip,
}

/// A data file's usable pairs and the rows left out.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    /// The usable pairs, in file order.
    pub pairs: Vec<LabeledPair>,
    /// Every skipped row's error (file, line, cause).
    pub skipped: Vec<String>,
}

/// Reads labelled pairs (TSV, CSV or JSONL with `text_a`, `text_b`, `label`), checking each label
/// against `loss` (`[0, 1]` for BCE, a class index below `num_labels` for cross-entropy); empty,
/// oversized and NUL-holding texts are refused by [`read_pair_records`] (see [`bert::limits`]).
pub fn read_dataset(
    path: &Path,
    format: Option<PairFormat>,
    loss: Loss,
    num_labels: usize,
    policy: BadRows,
) -> Result<Dataset> {
    let format = match format {
        Some(format) => format,
        None => PairFormat::from_path(path)?,
    };
    let size = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if size > bert::limits::MAX_DATASET_BYTES {
        return Err(Error::Setting(format!(
            "{}: {size} bytes, over the bound of {} for a training or evaluation file \
             (bert::limits::MAX_DATASET_BYTES; it is read whole into memory)",
            path.display(),
            bert::limits::MAX_DATASET_BYTES
        )));
    }
    let mut dataset = Dataset::default();
    for record in read_pair_records(path, format)? {
        let checked = record.map_err(Error::from).and_then(|r| {
            let bad = |reason: String| Error::Data {
                path: path.to_path_buf(),
                line: r.line,
                reason,
            };
            let raw = r
                .label
                .as_deref()
                .ok_or_else(|| bad("missing label".into()))?;
            let label: f32 = raw
                .trim()
                .parse()
                .map_err(|_| bad(format!("label {raw:?} is not a number")))?;
            if !label.is_finite() {
                return Err(bad(format!("label {raw} is not finite")));
            }
            match loss {
                Loss::BceWithLogits if !(0.0..=1.0).contains(&label) => {
                    return Err(bad(format!("label {label} is outside [0, 1]")));
                }
                Loss::CrossEntropy
                    if label.fract() != 0.0 || label < 0.0 || label as usize >= num_labels =>
                {
                    return Err(bad(format!(
                        "label {label} is not a class index below {num_labels}"
                    )));
                }
                _ => {}
            }
            Ok(LabeledPair {
                line: r.line,
                text_a: r.text_a,
                text_b: r.text_b,
                label,
            })
        });
        match (checked, policy) {
            (Ok(pair), _) => dataset.pairs.push(pair),
            (Err(e), BadRows::Skip)
                if matches!(
                    e,
                    Error::Data { .. } | Error::Load(bert::Error::Data { .. })
                ) =>
            {
                dataset.skipped.push(e.to_string())
            }
            (Err(e), _) => return Err(e),
        }
    }
    if dataset.pairs.is_empty() {
        return Err(Error::Setting(format!(
            "{}: no usable pairs",
            path.display()
        )));
    }
    Ok(dataset)
}

/// How an epoch's pairs are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Batching {
    /// Groups of 50 batches sorted by length, so each batch pads little (faster).
    #[default]
    LengthBuckets,
    /// A plain seeded shuffle, as a PyTorch `DataLoader(shuffle=True)` (and so
    /// `CrossEncoder.fit`) draws batches: every batch a uniform sample.
    Uniform,
}

/// The training batches of one epoch: a seeded shuffle, then (with
/// [`Batching::LengthBuckets`]) length buckets and the batch order shuffled again. Depends only
/// on `(seed, epoch)`, so a resumed run sees the same batches.
pub fn epoch_batches(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    batching: Batching,
) -> Vec<Vec<usize>> {
    let batch_size = batch_size.max(1);
    let mut rng = SplitMix64(seed.wrapping_mul(0x9E37_79B9).wrapping_add(epoch));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    shuffle(&mut order, &mut rng);
    if batching == Batching::Uniform {
        return order.chunks(batch_size).map(<[usize]>::to_vec).collect();
    }
    let mut batches = Vec::new();
    for group in order.chunks(batch_size * 50) {
        let mut group = group.to_vec();
        group.sort_by_key(|&i| lengths[i]);
        batches.extend(group.chunks(batch_size).map(<[usize]>::to_vec));
    }
    shuffle(&mut batches, &mut rng);
    batches
}

fn shuffle<T>(items: &mut [T], rng: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        items.swap(i, rng.below(i + 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_cover_everything_once_and_follow_the_seed() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50 + 3).collect();
        let a = epoch_batches(&lengths, 16, 1, 0, Batching::LengthBuckets);
        let mut seen: Vec<usize> = a.iter().flatten().copied().collect();
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert!(a.iter().all(|b| b.len() <= 16));
        assert_eq!(
            a,
            epoch_batches(&lengths, 16, 1, 0, Batching::LengthBuckets)
        );
        assert_ne!(
            a,
            epoch_batches(&lengths, 16, 1, 1, Batching::LengthBuckets)
        );
        assert_ne!(
            a,
            epoch_batches(&lengths, 16, 2, 0, Batching::LengthBuckets)
        );
    }

    #[test]
    fn uniform_batches_cover_everything_in_shuffled_order() {
        let lengths: Vec<usize> = (0..103).map(|i| (i * 37) % 50 + 3).collect();
        let uniform = epoch_batches(&lengths, 16, 1, 0, Batching::Uniform);
        let mut seen: Vec<usize> = uniform.iter().flatten().copied().collect();
        assert_ne!(seen, (0..103).collect::<Vec<_>>(), "shuffled");
        seen.sort();
        assert_eq!(seen, (0..103).collect::<Vec<_>>());
        assert_eq!(uniform.len(), 7);
        assert!(uniform[..6].iter().all(|b| b.len() == 16));
        assert_eq!(
            uniform,
            epoch_batches(&lengths, 16, 1, 0, Batching::Uniform)
        );
        // Buckets pad less: the spread of lengths within a batch is smaller.
        let spread = |batches: &[Vec<usize>]| -> usize {
            batches
                .iter()
                .map(|b| {
                    let l: Vec<usize> = b.iter().map(|&i| lengths[i]).collect();
                    l.iter().max().unwrap() - l.iter().min().unwrap()
                })
                .sum()
        };
        let buckets = epoch_batches(&lengths, 16, 1, 0, Batching::LengthBuckets);
        assert!(spread(&buckets) < spread(&uniform));
    }

    #[test]
    fn bad_labels_are_reported_with_their_line_or_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.tsv");
        std::fs::write(
            &path,
            "text_a\ttext_b\tlabel\na\tb\t0.5\nc\td\tnan\ne\t\t1\ng\th\tx\ni\tj\t1.5\nk\tl\n",
        )
        .unwrap();
        let message = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("d.tsv:3") && message.contains("not finite"),
            "{message}"
        );
        let data = read_dataset(&path, None, Loss::BceWithLogits, 1, BadRows::Skip).unwrap();
        assert_eq!(data.pairs.len(), 1);
        let skipped = data.skipped.join("\n");
        for needle in [
            ":3: label nan is not finite",
            ":4: text_b is empty",
            ":5: label \"x\" is not a number",
            ":6: label 1.5 is outside [0, 1]",
            ":7: expected",
        ] {
            assert!(skipped.contains(needle), "{needle} not in\n{skipped}");
        }
        let classes = dir.path().join("c.jsonl");
        std::fs::write(
            &classes,
            "{\"text_a\": \"a\", \"text_b\": \"b\", \"label\": 3}\n",
        )
        .unwrap();
        let message = read_dataset(&classes, None, Loss::CrossEntropy, 3, BadRows::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("c.jsonl:1") && message.contains("class index below 3"),
            "{message}"
        );
    }
}
