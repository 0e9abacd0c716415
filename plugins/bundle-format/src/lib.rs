//! The wire framing of goutube's built-in bundlers (`crc-bundler`, `lz4-bundler`).
//!
//! ```text
//! magic "GTB1" | version u8 = 1 | codec u8 | point_len u16 | start u64 | payload_len u32
//! | body_len u32 | crc32c u32 | point bytes | body bytes
//! ```
//!
//! Integers are little-endian. The CRC32C covers everything but itself: the first 24 header
//! bytes, the point id and the body. The body is the payload itself (`Raw`) or its LZ4 block
//! compression (`Lz4`), in which case `payload_len` is checked after decompression.

pub const MAGIC: &[u8; 4] = b"GTB1";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 28;

/// How the body holds the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
}

/// A decoded, checksum-verified frame (the body still encoded with `codec`).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub point: &'a str,
    pub start: u64,
    pub codec: Codec,
    pub payload_len: usize,
    pub body: &'a [u8],
}

/// Frames `body` (the payload encoded with `codec`, `payload_len` bytes once decoded).
pub fn encode(point: &str, start: u64, codec: Codec, payload_len: usize, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + point.len() + body.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(codec as u8);
    out.extend_from_slice(&(point.len() as u16).to_le_bytes());
    out.extend_from_slice(&start.to_le_bytes());
    out.extend_from_slice(&(payload_len as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&out), point.as_bytes()),
        body,
    );
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(point.as_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks and splits a frame made by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Frame<'_>, String> {
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "record of {} bytes is shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    if &bytes[0..4] != MAGIC {
        return Err("not a goutube bundle (bad magic)".into());
    }
    if bytes[4] != VERSION {
        return Err(format!("bundle version {} is not supported", bytes[4]));
    }
    let codec = match bytes[5] {
        0 => Codec::Raw,
        1 => Codec::Lz4,
        other => return Err(format!("unknown codec {other}")),
    };
    let point_len = usize::from(u16::from_le_bytes([bytes[6], bytes[7]]));
    let start = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let payload_len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(bytes[20..24].try_into().unwrap()) as usize;
    let stored_crc = u32::from_le_bytes(bytes[24..28].try_into().unwrap());
    if bytes.len() != HEADER_LEN + point_len + body_len {
        return Err(format!(
            "record is {} bytes, its header describes {}",
            bytes.len(),
            HEADER_LEN + point_len + body_len
        ));
    }
    let (point, body) = bytes[HEADER_LEN..].split_at(point_len);
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&bytes[..24]), point),
        body,
    );
    if crc != stored_crc {
        return Err(format!(
            "checksum mismatch: stored {stored_crc:08x}, computed {crc:08x}"
        ));
    }
    if codec == Codec::Raw && body_len != payload_len {
        return Err("raw body length differs from the payload length".into());
    }
    let point = std::str::from_utf8(point).map_err(|_| "point id is not UTF-8".to_string())?;
    Ok(Frame {
        point,
        start,
        codec,
        payload_len,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let bytes = encode("videos/a", 1234, Codec::Raw, body.len(), &body);
        let frame = decode(&bytes).unwrap();
        assert_eq!(
            frame,
            Frame {
                point: "videos/a",
                start: 1234,
                codec: Codec::Raw,
                payload_len: 1000,
                body: &body
            }
        );
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let body: Vec<u8> = (0..64u32).map(|i| (i * 7) as u8).collect();
        let bytes = encode("p", 9, Codec::Raw, body.len(), &body);
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(decode(&damaged).is_err(), "flip of bit {i} accepted");
        }
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(decode(&[]).is_err());
    }
}
