//! A configuration key whose value cannot be used: what a section's own check returns, naming
//! the key as written. A leaf, so that the sections living beside their owners (`[cluster]`,
//! `[http]`) name their faults in one type without importing the configuration that holds them.

/// A key whose value is out of its range, or does not fit with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct InvalidKey {
    /// The key, as written.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

impl InvalidKey {
    /// `key` is invalid because of `message`.
    pub fn new(key: &'static str, message: impl Into<String>) -> Self {
        InvalidKey {
            key,
            message: message.into(),
        }
    }
}
