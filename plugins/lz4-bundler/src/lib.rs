//! `builtin:lz4-bundler`: like `crc-bundler`, with the payload compressed with LZ4 (block format)
//! when that makes it smaller. Configuration: empty, or `min_size = N` (records below N bytes are
//! sent uncompressed; default 512).

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use std::cell::Cell;

use bundle_format::Codec;
use goutube::plugins::checksum;

/// CRC32C by the host, with the CPU's CRC instructions.
fn host_crc(crc: u32, bytes: &[u8]) -> u32 {
    checksum::crc32c(crc, bytes)
}

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

    fn bundle(rec: ReplRecord) -> Vec<u8> {
        let len = rec.payload.len();
        if len >= MIN_SIZE.get() {
            let compressed = lz4_flex::block::compress(&rec.payload);
            if compressed.len() < len {
                return bundle_format::encode(
                    host_crc,
                    &rec.point,
                    rec.start,
                    Codec::Lz4,
                    len,
                    compressed,
                );
            }
        }
        bundle_format::encode(
            host_crc,
            &rec.point,
            rec.start,
            Codec::Raw,
            len,
            rec.payload,
        )
    }

    fn unbundle(bytes: Vec<u8>) -> Result<ReplRecord, String> {
        let frame = bundle_format::decode(host_crc, bytes)?;
        let payload = match frame.codec {
            Codec::Raw => frame.body,
            Codec::Lz4 => {
                let payload = lz4_flex::block::decompress(&frame.body, frame.payload_len)
                    .map_err(|e| format!("lz4: {e}"))?;
                if payload.len() != frame.payload_len {
                    return Err("decompressed length differs from the trailer".into());
                }
                payload
            }
        };
        Ok(ReplRecord {
            point: frame.point,
            start: frame.start,
            payload,
        })
    }
}

export!(Lz4Bundler);
