//! `builtin:crc-bundler` (the default bundler): the payload framed with a tail holding the point,
//! the offset and a CRC32C (see the `bundle-format` crate); `unbundle` rejects anything damaged.
//! The payload never enters the component: its CRC is computed by the host where it lies, on both
//! sides. Takes no configuration.

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use bundle_format::Codec;
use goutube::plugins::bundles::{Body, FoundPayload, Span};
use goutube::plugins::checksum;

/// CRC32C by the host, with the CPU's CRC instructions.
fn host_crc(crc: u32, bytes: &[u8]) -> u32 {
    checksum::crc32c(crc, bytes)
}

bundle_format::buffer_source!(Buffer);

struct CrcBundler;

impl Guest for CrcBundler {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("crc-bundler takes no configuration".into())
        }
    }

    fn bundle(point: String, start: u64, payload: &Buffer) -> Bundled {
        Bundled {
            head: Vec::new(),
            body: Body::Payload,
            tail: bundle_format::raw_tail(host_crc, payload, &point, start),
        }
    }

    fn unbundle(bytes: &Buffer) -> Result<Unbundled, String> {
        let checked = bundle_format::check(bytes)?;
        if checked.codec != Codec::Raw {
            return Err("crc-bundler reads raw records only".into());
        }
        Ok(Unbundled {
            point: checked.point,
            start: checked.start,
            payload: FoundPayload::Within(Span {
                offset: 0,
                len: checked.body_len as u64,
            }),
        })
    }
}

export!(CrcBundler);
