//! `builtin:crc-bundler` (the default bundler): the record framed with a header and a CRC32C
//! (see the `bundle-format` crate); `unbundle` rejects anything damaged. Takes no configuration.

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use bundle_format::Codec;
use goutube::plugins::checksum;

/// CRC32C by the host, with the CPU's CRC instructions.
fn host_crc(crc: u32, bytes: &[u8]) -> u32 {
    checksum::crc32c(crc, bytes)
}

struct CrcBundler;

impl Guest for CrcBundler {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err("crc-bundler takes no configuration".into())
        }
    }

    fn bundle(rec: ReplRecord) -> Vec<u8> {
        let len = rec.payload.len();
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
        if frame.codec != Codec::Raw {
            return Err("crc-bundler reads raw records only".into());
        }
        Ok(ReplRecord {
            point: frame.point,
            start: frame.start,
            payload: frame.body,
        })
    }
}

export!(CrcBundler);
