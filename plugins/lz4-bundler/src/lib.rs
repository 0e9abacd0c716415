//! `builtin:lz4-bundler`: like `crc-bundler`, with the payload compressed with LZ4 (block format)
//! when that makes it smaller. It transforms the payload, so it reads it into the component (and,
//! on receipt, the compressed body); a record that does not compress travels untouched, as with
//! `crc-bundler`. Configuration: empty, or `min_size = N` (records below N bytes are sent
//! uncompressed; default 512).

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use std::cell::Cell;

use bundle_format::Codec;
use goutube::plugins::bundles::{Body, FoundPayload, Span};
use goutube::plugins::checksum;

/// CRC32C by the host, with the CPU's CRC instructions.
fn host_crc(crc: u32, bytes: &[u8]) -> u32 {
    checksum::crc32c(crc, bytes)
}

bundle_format::buffer_source!(Buffer);

thread_local! {
    static MIN_SIZE: Cell<usize> = const { Cell::new(512) };
}

struct Lz4Bundler;

impl Guest for Lz4Bundler {
    fn configure(config: String) -> Result<(), String> {
        for line in config
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("expected key = value, got {line:?}"))?;
            match key.trim() {
                "min_size" => {
                    let n = value.trim().parse().map_err(|e| format!("min_size: {e}"))?;
                    MIN_SIZE.set(n);
                }
                other => return Err(format!("unknown key {other:?} (known: min_size)")),
            }
        }
        Ok(())
    }

    fn bundle(point: String, start: u64, payload: &Buffer) -> Bundled {
        let len = payload.len() as usize;
        if len >= MIN_SIZE.get() {
            let compressed = lz4_flex::block::compress(&payload.read(0, len as u64));
            if compressed.len() < len {
                let body_crc = host_crc(0, &compressed);
                let tail = bundle_format::tail(
                    host_crc,
                    body_crc,
                    &point,
                    start,
                    Codec::Lz4,
                    len,
                    compressed.len(),
                );
                return Bundled {
                    head: Vec::new(),
                    body: Body::Replaced(compressed),
                    tail,
                };
            }
        }
        Bundled {
            head: Vec::new(),
            body: Body::Payload,
            tail: bundle_format::raw_tail(host_crc, payload, &point, start),
        }
    }

    fn unbundle(bytes: &Buffer) -> Result<Unbundled, String> {
        let checked = bundle_format::check(bytes)?;
        let payload = match checked.codec {
            Codec::Raw => FoundPayload::Within(Span {
                offset: 0,
                len: checked.body_len as u64,
            }),
            Codec::Lz4 => {
                let body = bytes.read(0, checked.body_len as u64);
                let payload = lz4_flex::block::decompress(&body, checked.payload_len)
                    .map_err(|e| format!("lz4: {e}"))?;
                if payload.len() != checked.payload_len {
                    return Err("decompressed length differs from the trailer".into());
                }
                FoundPayload::Rebuilt(payload)
            }
        };
        Ok(Unbundled {
            point: checked.point,
            start: checked.start,
            payload,
        })
    }
}

export!(Lz4Bundler);
