//! The `[http]` section: the gateway's public URL, its signed URLs' keys and lifetime
//! (`docs/http.md`). Here rather than beside the gateway, so that the configuration imports
//! nothing above it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::key::InvalidKey;
use crate::secret::Secret;

/// The `[http]` section of the configuration: the gateway's signed URLs and caching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// The start of the URLs `SignUrl` hands out, as clients reach the gateway (a load balancer's
    /// name, say); default: `http(s)://<bind ip>:<http_port>`.
    pub public_url: Option<String>,
    /// Keys that sign URLs: the first signs, every one verifies (rotation). Prefer
    /// `url_key_files` or `GOUTUBE_HTTP__URL_KEYS`.
    pub url_keys: Vec<Secret>,
    /// Files that hold such keys, in the same order after `url_keys`.
    pub url_key_files: Vec<PathBuf>,
    /// Longest life of a signed URL, in seconds.
    pub max_url_ttl_s: u64,
    /// A point that grew less than this long ago is served with `Cache-Control: no-cache`.
    pub writing_window_ms: u64,
    /// Most connections served at once; more are answered `503` with `Retry-After`.
    pub max_connections: usize,
    /// Longest wait for a request's head, in milliseconds: from a new connection, or from the
    /// end of the last response on a kept-alive one (the idle timeout too).
    pub header_timeout_ms: u64,
    /// Longest a response waits for the client to take a byte, in milliseconds.
    pub send_timeout_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            public_url: None,
            url_keys: Vec::new(),
            url_key_files: Vec::new(),
            max_url_ttl_s: 7 * 24 * 3600,
            writing_window_ms: 60_000,
            max_connections: 4096,
            header_timeout_ms: 10_000,
            send_timeout_ms: 30_000,
        }
    }
}

/// Shortest URL signing key accepted.
pub(crate) const MIN_URL_KEY_LEN: usize = 16;

impl HttpSection {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), InvalidKey> {
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(InvalidKey::new(
                "http.public_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if self.max_connections == 0 {
            return Err(InvalidKey::new(
                "http.max_connections",
                "must be at least 1",
            ));
        }
        if self.header_timeout_ms < 100 {
            return Err(InvalidKey::new(
                "http.header_timeout_ms",
                "must be at least 100",
            ));
        }
        if self.send_timeout_ms < 100 {
            return Err(InvalidKey::new(
                "http.send_timeout_ms",
                "must be at least 100",
            ));
        }
        if self.max_url_ttl_s < 60 {
            return Err(InvalidKey::new("http.max_url_ttl_s", "must be at least 60"));
        }
        if self
            .url_keys
            .iter()
            .any(|key| key.0.len() < MIN_URL_KEY_LEN)
        {
            return Err(InvalidKey::new(
                "http.url_keys",
                format!("every key must be at least {MIN_URL_KEY_LEN} bytes"),
            ));
        }
        self.url_key_bytes().map(|_| ())
    }

    /// The signing keys, `url_keys` then `url_key_files`.
    pub fn url_key_bytes(&self) -> Result<Vec<Vec<u8>>, InvalidKey> {
        let mut keys: Vec<Vec<u8>> = self
            .url_keys
            .iter()
            .map(|key| key.0.as_bytes().to_vec())
            .collect();
        for path in &self.url_key_files {
            let key = crate::secret::read_file(path).map_err(|e| {
                InvalidKey::new("http.url_key_files", format!("{}: {e}", path.display()))
            })?;
            if key.len() < MIN_URL_KEY_LEN {
                return Err(InvalidKey::new(
                    "http.url_key_files",
                    format!(
                        "{} must hold at least {MIN_URL_KEY_LEN} bytes",
                        path.display()
                    ),
                ));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// The longest a signed URL may live (`http.max_url_ttl_s`).
    pub fn max_url_ttl(&self) -> Duration {
        Duration::from_secs(self.max_url_ttl_s)
    }
}
