//! The harness's typed error.

use std::path::PathBuf;

/// What can go wrong while training or evaluating.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running the model failed.
    #[error(transparent)]
    Load(#[from] bert::Error),

    /// A file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause (shown in the message, not chained, so it prints once).
        cause: std::io::Error,
    },

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

    /// Training settings that cannot work.
    #[error("invalid training setting: {0}")]
    Setting(String),

    /// The loss became NaN or infinite.
    #[error("loss is {loss} at step {step} (batch {batch}); training stopped, the last good checkpoint is kept")]
    NonFinite {
        /// Optimiser step.
        step: u64,
        /// Batch index within the epoch.
        batch: usize,
        /// The loss value.
        loss: f32,
    },

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
}

impl From<bert::ModelError> for Error {
    fn from(e: bert::ModelError) -> Self {
        Self::Load(bert::Error::Model(e))
    }
}

/// Result alias of the harness.
pub type Result<T> = std::result::Result<T, Error>;
