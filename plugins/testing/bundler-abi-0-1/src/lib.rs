//! A bundler built against the previous contract, `goutube:plugins@0.1.0` (its WIT is kept in
//! `wit/`): the host must refuse to load it, naming the version.

wit_bindgen::generate!({ world: "bundler", path: "wit" });

struct Old;

impl Guest for Old {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn bundle(rec: ReplRecord) -> Vec<u8> {
        let crc = goutube::plugins::checksum::crc32c(0, &rec.payload);
        let mut out = rec.payload;
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    fn unbundle(bytes: Vec<u8>) -> Result<ReplRecord, String> {
        Err(format!(
            "{} bytes: this bundler only exists to be refused",
            bytes.len()
        ))
    }
}

export!(Old);
