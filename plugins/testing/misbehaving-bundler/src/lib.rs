//! A deliberately wrong bundler for the host's tests. It bundles as `crc-bundler` does and
//! unbundles what `crc-bundler` bundles; its configuration says how it misbehaves.
//!
//! In `unbundle`: `other-point` (the record of another point), `other-start` (another offset),
//! `outside` (a payload range past the end of the bundle), `read-outside` (reads past the end of
//! its buffer, which traps), `huge` (a rebuilt payload of 64 MiB), `panic` (panics, after
//! printing its message to stderr as any Rust guest does), `oom` (allocates until its memory cap
//! stops it), `stderr` (prints a line to stderr, then answers correctly), `flip` (the payload with
//! one byte changed), `longer` (the payload and one byte more), `slow:MS` (spins for MS
//! milliseconds, then answers correctly).
//!
//! In `bundle`: `bundle-panic`, `bundle-oom`, `bundle-stderr` (as above), `expand` or
//! `expand:MIB` (every record padded to [`EXPANDED`] bytes, or MIB MiB; every mode unbundles
//! padded records), and `bundle-slow:MS:POINT` (spins for MS milliseconds on each record of the
//! point named POINT, then bundles it correctly: a leader's replication stalls on it).
//!
//! Anything else answers correctly.

wit_bindgen::generate!({ world: "bundler", path: "../../../schema/wit" });

use std::cell::RefCell;
use std::time::{Duration, Instant};

use goutube::plugins::bundles::{Body, FoundPayload, Span};
use goutube::plugins::checksum;

bundle_format::buffer_source!(Buffer);

/// How long an `expand` bundle is, whatever its payload (within the host's 16 MiB per record).
const EXPANDED: usize = 15 << 20;
/// Ends a padded bundle: `PADDING`, then the padding's length (u32, little-endian) before it.
const PADDING: &[u8; 4] = b"PAD!";

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

fn mode() -> String {
    MODE.with_borrow(Clone::clone)
}

/// Allocates until the host's memory cap refuses (the guest then aborts).
fn exhaust_memory() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1; 16 << 20]);
    }
}

/// Spins for `ms` milliseconds (a guest that computes: the host's deadline interrupts it).
fn spin(ms: u64) {
    let until = Instant::now() + Duration::from_millis(ms);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// The first `len` bytes of a received bundle, as a bundle of its own.
struct Prefix<'a> {
    buffer: &'a Buffer,
    len: u64,
}

impl bundle_format::Source for Prefix<'_> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.buffer.read(offset, len)
    }

    fn crc32c(&self, crc: u32, offset: u64, len: u64) -> u32 {
        self.buffer.crc32c(crc, offset, len)
    }
}

/// The length of the bundle inside `bytes`: all of it, or what comes before its padding.
fn unpadded_len(bytes: &Buffer) -> u64 {
    let total = bytes.len();
    if total < 8 || bytes.read(total - 4, 4) != PADDING {
        return total;
    }
    let pad = u32::from_le_bytes(bytes.read(total - 8, 4).try_into().unwrap());
    total.saturating_sub(8 + u64::from(pad))
}

struct Misbehaving;

impl Guest for Misbehaving {
    fn configure(config: String) -> Result<(), String> {
        MODE.with_borrow_mut(|mode| *mode = config.trim().to_owned());
        Ok(())
    }

    fn bundle(point: String, start: u64, payload: &Buffer) -> Bundled {
        let mut tail = bundle_format::raw_tail(checksum::crc32c, payload, &point, start);
        match mode().as_str() {
            "bundle-panic" => panic!("misbehaving bundler: bundle({point}@{start}) panics"),
            "bundle-oom" => exhaust_memory(),
            "bundle-stderr" => eprintln!("misbehaving bundler: bundling {point}@{start}"),
            slow if slow.starts_with("bundle-slow:") => {
                let (ms, stalled) = slow["bundle-slow:".len()..]
                    .split_once(':')
                    .unwrap_or(("100", ""));
                if point == stalled {
                    spin(ms.parse().unwrap_or(100));
                }
            }
            expand if expand.starts_with("expand") => {
                let size = match expand.strip_prefix("expand:") {
                    Some(mib) => mib.parse::<usize>().unwrap_or(15) << 20,
                    None => EXPANDED,
                };
                let used = payload.len() as usize + tail.len() + 8;
                let pad = size.saturating_sub(used);
                tail.resize(tail.len() + pad, 0);
                tail.extend_from_slice(&(pad as u32).to_le_bytes());
                tail.extend_from_slice(PADDING);
            }
            _ => {}
        }
        Bundled {
            head: Vec::new(),
            body: Body::Payload,
            tail,
        }
    }

    fn unbundle(bytes: &Buffer) -> Result<Unbundled, String> {
        let checked = bundle_format::check(&Prefix {
            buffer: bytes,
            len: unpadded_len(bytes),
        })?;
        let payload = Span {
            offset: 0,
            len: checked.body_len as u64,
        };
        let mut found = Unbundled {
            point: checked.point,
            start: checked.start,
            payload: FoundPayload::Within(payload),
        };
        let mode = mode();
        match mode.as_str() {
            "other-point" => found.point.push_str("-other"),
            "other-start" => found.start += 1,
            "outside" => {
                found.payload = FoundPayload::Within(Span {
                    offset: 1,
                    len: bytes.len(),
                })
            }
            "read-outside" => {
                bytes.read(bytes.len(), 1);
            }
            "huge" => found.payload = FoundPayload::Rebuilt(vec![0; 64 << 20]),
            "panic" => panic!("misbehaving bundler: unbundle({}) panics", found.point),
            "oom" => exhaust_memory(),
            "stderr" => eprintln!("misbehaving bundler: unbundling {}", found.point),
            "flip" => {
                let mut rebuilt = bytes.read(payload.offset, payload.len);
                let middle = rebuilt.len() / 2;
                if let Some(byte) = rebuilt.get_mut(middle) {
                    *byte ^= 0x20;
                }
                found.payload = FoundPayload::Rebuilt(rebuilt);
            }
            "longer" => {
                let mut rebuilt = bytes.read(payload.offset, payload.len);
                rebuilt.push(b'!');
                found.payload = FoundPayload::Rebuilt(rebuilt);
            }
            slow if slow.starts_with("slow:") => spin(slow["slow:".len()..].parse().unwrap_or(100)),
            _ => {}
        }
        Ok(found)
    }
}

export!(Misbehaving);
