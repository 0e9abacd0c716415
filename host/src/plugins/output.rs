//! What a plugin says: its `log` import and whatever it prints to stdout or stderr (a Rust
//! guest's panic message, an `eprintln!`, an allocation failure).
//!
//! A guest's stdout and stderr are [`Output`] streams kept in the host: writes never block, never
//! fail and never touch the calling thread's async runtime; at most [`MAX_KEPT`] bytes per call
//! are kept and the rest is counted. After each call the plugin's [`Voice`] turns what was kept
//! into `tracing` lines attributed to the plugin, rate-limited per plugin (a burst of
//! [`BURST`] lines, then [`PER_SECOND`] a second); lines over the rate are counted in
//! `goutube_plugin_output_suppressed_total` and the next line says how many were left out.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::metrics;

/// Bytes of one stream a call may leave for the log; the rest is dropped and counted.
pub const MAX_KEPT: usize = 16 * 1024;
/// Lines a plugin may log at once before the rate applies.
pub const BURST: f64 = 100.0;
/// Lines a plugin may log per second, sustained.
pub const PER_SECOND: f64 = 20.0;
/// Lines of stderr a failure's message quotes (a Rust guest's panic takes three).
const LAST_WORDS: usize = 3;

/// How loud a line is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// `trace`.
    Trace,
    /// `debug`.
    Debug,
    /// `info`.
    Info,
    /// `warn`.
    Warn,
    /// `error`.
    Error,
}

/// One of a guest's output streams, captured in the host.
#[derive(Clone, Default)]
pub struct Output {
    captured: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: u64,
}

impl Output {
    /// What was printed since the last take: the complete and unfinished lines, and how many
    /// bytes did not fit.
    pub fn take(&self) -> Printed {
        let mut captured = self.captured.lock().expect("poisoned");
        let bytes = std::mem::take(&mut captured.bytes);
        let dropped = std::mem::take(&mut captured.dropped);
        let text = String::from_utf8_lossy(&bytes);
        let lines = text
            .lines()
            .map(str::trim_end)
            .filter(|line| !line.is_empty())
            .map(printable)
            .collect();
        Printed { lines, dropped }
    }

    fn keep(&self, bytes: &[u8]) {
        let mut captured = self.captured.lock().expect("poisoned");
        let room = MAX_KEPT.saturating_sub(captured.bytes.len());
        let kept = bytes.len().min(room);
        captured.bytes.extend_from_slice(&bytes[..kept]);
        captured.dropped += (bytes.len() - kept) as u64;
    }
}

/// What a stream held after a call.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Printed {
    /// The complete lines, in order.
    pub lines: Vec<String>,
    /// Bytes over [`MAX_KEPT`], not kept.
    pub dropped: u64,
}

/// `line`, its control characters escaped (a plugin must not write terminal escapes into the
/// node's log), cut to [`crate::text::MAX_TEXT`] bytes.
fn printable(line: &str) -> String {
    crate::text::bounded(&crate::text::escaped(line))
}

impl IsTerminal for Output {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Output {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for Output {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always ready: what does not fit is dropped, never waited for.
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Output {
    async fn ready(&mut self) {}
}

impl AsyncWrite for Output {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.keep(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The log lines of one plugin (all its instances), under one rate limit.
pub struct Voice {
    /// The plugin, as its lines name it: `bundler (builtin:crc-bundler)`.
    plugin: Arc<str>,
    /// Its kind (`authorizer`, `bundler`, `placement`): the metric label.
    kind: &'static str,
    bucket: Mutex<Bucket>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl Voice {
    /// The voice of `plugin`, a plugin of `kind` (`authorizer`, `bundler`, `placement`).
    pub fn new(plugin: Arc<str>, kind: &'static str) -> Self {
        Self {
            plugin,
            kind,
            bucket: Mutex::new(Bucket {
                tokens: BURST,
                at: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// The plugin it speaks for.
    pub fn plugin(&self) -> &Arc<str> {
        &self.plugin
    }

    /// Logs `message` from the plugin at `level`, if its rate allows.
    pub fn say(&self, level: Level, stream: &'static str, message: &str) {
        let suppressed = {
            let mut bucket = self.bucket.lock().expect("poisoned");
            let now = Instant::now();
            let refill = now.duration_since(bucket.at).as_secs_f64() * PER_SECOND;
            bucket.tokens = (bucket.tokens + refill).min(BURST);
            bucket.at = now;
            if bucket.tokens < 1.0 {
                bucket.suppressed += 1;
                ::metrics::counter!(metrics::PLUGIN_OUTPUT_SUPPRESSED, "plugin" => self.kind)
                    .increment(1);
                return;
            }
            bucket.tokens -= 1.0;
            std::mem::take(&mut bucket.suppressed)
        };
        ::metrics::counter!(metrics::PLUGIN_OUTPUT_LINES, "plugin" => self.kind, "stream" => stream)
            .increment(1);
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(plugin, stream, suppressed, "{message}"),
            Level::Debug => tracing::debug!(plugin, stream, suppressed, "{message}"),
            Level::Info => tracing::info!(plugin, stream, suppressed, "{message}"),
            Level::Warn => tracing::warn!(plugin, stream, suppressed, "{message}"),
            Level::Error => tracing::error!(plugin, stream, suppressed, "{message}"),
        }
    }

    /// Logs what a call printed: stderr as warnings, stdout as information. Returns the last
    /// lines of stderr (a panic message says what went wrong), if any.
    pub fn printed(&self, stdout: Printed, stderr: Printed) -> Option<String> {
        self.say_all(&stdout, "stdout", Level::Info);
        self.say_all(&stderr, "stderr", Level::Warn);
        let last = &stderr.lines[stderr.lines.len().saturating_sub(LAST_WORDS)..];
        (!last.is_empty()).then(|| crate::text::bounded(&last.join(" | ")))
    }

    fn say_all(&self, printed: &Printed, stream: &'static str, level: Level) {
        for line in &printed.lines {
            self.say(level, stream, line);
        }
        if printed.dropped > 0 {
            let note = format!(
                "({} more bytes of {stream} in this call were not kept)",
                printed.dropped
            );
            self.say(Level::Warn, stream, &note);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_a_bounded_amount_per_call_and_splits_lines() {
        let mut output = Output::default();
        output
            .write(Bytes::from_static(b"first line\nsecond\n\npartial"))
            .unwrap();
        let printed = output.take();
        assert_eq!(printed.lines, ["first line", "second", "partial"]);
        assert_eq!(printed.dropped, 0);
        assert_eq!(output.take(), Printed::default());

        output
            .write(Bytes::from(vec![b'x'; MAX_KEPT + 10]))
            .unwrap();
        let printed = output.take();
        assert_eq!(printed.dropped, 10);
        assert_eq!(printed.lines.len(), 1);
        assert!(printed.lines[0].len() <= crate::text::MAX_TEXT + "…".len());

        output
            .write(Bytes::from_static(b"\x1b[2Jcleared\x07"))
            .unwrap();
        assert_eq!(output.take().lines, ["\\u{1b}[2Jcleared\\u{7}"]);
    }

    #[test]
    fn a_voice_stops_at_its_burst_and_counts_the_rest() {
        let voice = Voice::new("bundler (test)".into(), "bundler");
        for i in 0..(BURST as usize + 25) {
            voice.say(Level::Info, "stdout", &format!("line {i}"));
        }
        let bucket = voice.bucket.lock().unwrap();
        assert!(
            (24..=26).contains(&bucket.suppressed),
            "{}",
            bucket.suppressed
        );
    }
}
