//! The typed error of the model crates.

/// What can go wrong while configuring or running a BERT model.
///
/// Library code never panics on user input: invalid configurations, inputs that do not fit the
/// model (ids past the vocabulary, sequences past the position table) and tensor-backend
/// failures all surface here, with the offending field or value named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `config.json` field is missing a required value, has the wrong type, or is inconsistent
    /// with another field.
    #[error("invalid config field `{field}`: {reason}")]
    Config {
        /// The HF `config.json` field name.
        field: &'static str,
        /// Why the value was rejected.
        reason: String,
    },

    /// `config.json` is not valid JSON (or not a JSON object).
    #[error("config.json is not valid JSON: {0}")]
    ConfigJson(#[from] serde_json::Error),

    /// The inputs given to `forward` do not fit the model.
    #[error("invalid input: {0}")]
    Input(String),

    /// The tensor backend failed (shape mismatch while loading a weight, device error, ...).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl Error {
    /// Shorthand for [`Error::Config`].
    pub fn config(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Config {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`Error::Input`].
    pub fn input(reason: impl Into<String>) -> Self {
        Self::Input(reason.into())
    }
}

/// Result alias of the model crates.
pub type Result<T> = std::result::Result<T, Error>;
