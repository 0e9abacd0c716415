//! `builtin:crc-bundler` (the default bundler): the record framed with a header and a CRC32C
//! (see the `bundle-format` crate); `unbundle` rejects anything damaged. Takes no configuration.

wit_bindgen::generate!({ world: "bundler", path: "../../schema/wit" });

use bundle_format::Codec;

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
        let payload = &rec.payload;
        bundle_format::encode(&rec.point, rec.start, Codec::Raw, payload.len(), payload)
    }

    fn unbundle(bytes: Vec<u8>) -> Result<ReplRecord, String> {
        let frame = bundle_format::decode(&bytes)?;
        if frame.codec != Codec::Raw {
            return Err("crc-bundler reads raw records only".into());
        }
        Ok(ReplRecord {
            point: frame.point.to_owned(),
            start: frame.start,
            payload: frame.body.to_vec(),
        })
    }
}

export!(CrcBundler);
