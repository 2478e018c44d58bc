//! The facade's typed error.

use std::path::PathBuf;

/// Everything that can fail while finding, fetching, loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model itself rejected its configuration or inputs.
    #[error(transparent)]
    Model(#[from] bert_embeddings::Error),

    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error (shown in the message, not chained, so it prints once).
        cause: std::io::Error,
    },

    /// A checkpoint directory or file set is incomplete or malformed.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The directory or file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// Tensors the architecture needs are not in the checkpoint.
    #[error("checkpoint {path} lacks {} tensor(s) that {architecture} needs: {}", .names.len(), .names.join(", "))]
    MissingTensors {
        /// The checkpoint.
        path: PathBuf,
        /// The model class being loaded.
        architecture: &'static str,
        /// Every missing tensor name (as the model asks for it).
        names: Vec<String>,
    },

    /// A model specification could not be understood.
    #[error("unknown model {spec:?}: {reason}")]
    UnknownModel {
        /// What the user asked for.
        spec: String,
        /// Why it is not a model source, and what would be.
        reason: String,
    },

    /// A download or a model source failed.
    #[error("fetching {what}: {reason}")]
    Fetch {
        /// What was being fetched.
        what: String,
        /// Why it failed.
        reason: String,
    },

    /// A fetched file does not have its pinned sha256.
    #[error("{path}: sha256 is {actual}, expected {expected} (corrupted or tampered download)")]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The pinned digest.
        expected: String,
        /// The digest of what was fetched.
        actual: String,
    },

    /// A device or dtype could not be chosen or opened.
    #[error("device: {0}")]
    Device(String),

    /// A row of a data file is unusable.
    #[error("{path}:{line}: {reason}")]
    Data {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },

    /// A text given to a pipeline cannot be encoded (see [`crate::limits::text_problem`]).
    #[error("input {item}: {reason}")]
    Input {
        /// Which text: `text 3`, `pair 0 text_b`, `query`, ...
        item: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An option value is not one of the accepted ones.
    #[error("invalid option: {0}")]
    InvalidOption(String),

    /// Text could not be tokenized, or does not fit the model.
    #[error("tokenization: {0}")]
    Tokenize(String),

    /// A self-check could not run: its reference lacks a tensor, or the model an output.
    #[error("selftest: {0}")]
    SelfTest(String),

    /// The tensor backend failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn checkpoint(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Checkpoint {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn fetch(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Fetch {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Result alias of the facade.
pub type Result<T> = std::result::Result<T, Error>;
