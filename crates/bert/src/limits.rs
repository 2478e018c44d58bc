//! The bounds this library enforces on what it is given, so oversized input is a clear error
//! instead of memory exhaustion. Each is checked before the work it bounds starts; the table of
//! bad inputs and what each gets is `tests/BAD_INPUT.md`.

/// Longest text accepted, in bytes of UTF-8 (1 MiB). Only the first `max_length` tokens of a
/// text reach the model, but the tokenizer builds offsets and alignments for all of it (about
/// 100 bytes per token), so an unbounded text is an unbounded allocation.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

/// Most padded tokens (sequences x longest sequence) one inference forward pass may take:
/// [`crate::PipelineOptions::max_tokens_per_batch`] is refused above this. At this bound
/// bert-base's feed-forward activation alone is 768 x 4 x 4 bytes x 2^18 = 3 GiB.
pub const MAX_TOKENS_PER_BATCH: usize = 1 << 18;

/// Most tokens (batch size x max_length) one training batch may hold. Training keeps every
/// layer's activations for the backward pass (about 20 hidden-sized tensors a layer): at this
/// bound bert-base holds roughly 12 x 20 x 768 x 4 bytes x 2^16 = 45 GiB. Larger effective
/// batches come from gradient accumulation.
pub const MAX_TRAIN_TOKENS_PER_BATCH: usize = 1 << 16;

/// Largest training or evaluation file, in bytes (1 GiB): such files are read whole into memory
/// (scoring streams its input and has no such bound).
pub const MAX_DATASET_BYTES: u64 = 1 << 30;

/// Why `text` cannot be scored or embedded, if it cannot: over [`MAX_TEXT_BYTES`], holding a
/// NUL byte (binary data read as text), or empty / whitespace-only (there is nothing to encode,
/// and silently scoring `[CLS] [SEP]` hides a data bug) unless `allow_empty`
/// ([`crate::PipelineOptions::allow_empty_texts`]: encode it as transformers does).
pub fn text_problem(text: &str, allow_empty: bool) -> Option<String> {
    if text.len() > MAX_TEXT_BYTES {
        Some(format!(
            "is {} bytes, over the {MAX_TEXT_BYTES}-byte limit (bert::limits::MAX_TEXT_BYTES)",
            text.len()
        ))
    } else if !allow_empty && text.trim().is_empty() {
        Some("is empty (or only whitespace)".into())
    } else {
        text.find('\0')
            .map(|at| format!("has a NUL byte at byte {at} (binary data, not text?)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_problem_is_named_and_good_text_passes() {
        assert_eq!(text_problem("a man plays", false), None);
        assert!(text_problem("", false).unwrap().contains("empty"));
        assert!(text_problem(" \t\n", false).unwrap().contains("empty"));
        assert_eq!(text_problem(" \t\n", true), None);
        let nul = text_problem("ab\0c", true).unwrap();
        assert!(nul.contains("NUL byte at byte 2"), "{nul}");
        let big = "a".repeat(MAX_TEXT_BYTES + 1);
        assert!(text_problem(&big, true).unwrap().contains("1048577 bytes"));
        assert_eq!(text_problem(&"a".repeat(MAX_TEXT_BYTES), false), None);
    }
}
