//! `builtin:lz4-bundler`: like `crc-bundler`, with the payload compressed with LZ4 (block format)
//! when that makes it smaller. Configuration: empty, or `min_size = N` (records below N bytes are
//! sent uncompressed; default 512).

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use std::cell::Cell;

use bundle_format::Codec;

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
        let payload = &rec.payload;
        if payload.len() >= MIN_SIZE.get() {
            let compressed = lz4_flex::block::compress(payload);
            if compressed.len() < payload.len() {
                return bundle_format::encode(
                    &rec.point,
                    rec.start,
                    Codec::Lz4,
                    payload.len(),
                    &compressed,
                );
            }
        }
        bundle_format::encode(&rec.point, rec.start, Codec::Raw, payload.len(), payload)
    }

    fn unbundle(bytes: Vec<u8>) -> Result<ReplRecord, String> {
        let frame = bundle_format::decode(&bytes)?;
        let payload = match frame.codec {
            Codec::Raw => frame.body.to_vec(),
            Codec::Lz4 => {
                let payload = lz4_flex::block::decompress(frame.body, frame.payload_len)
                    .map_err(|e| format!("lz4: {e}"))?;
                if payload.len() != frame.payload_len {
                    return Err("decompressed length differs from the header".into());
                }
                payload
            }
        };
        Ok(ReplRecord {
            point: frame.point.to_owned(),
            start: frame.start,
            payload,
        })
    }
}

export!(Lz4Bundler);
