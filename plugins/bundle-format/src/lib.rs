//! The wire framing of goutube's built-in bundlers (`crc-bundler`, `lz4-bundler`).
//!
//! ```text
//! body | point bytes | trailer (28 bytes):
//!     magic "GTB1" | version u8 = 1 | codec u8 | point_len u16 | start u64 | payload_len u32
//!     | body_len u32 | crc32c u32
//! ```
//!
//! Integers are little-endian. The CRC32C covers everything but itself: the body, the point id
//! and the first 24 trailer bytes. The body is the payload itself (`Raw`) or its LZ4 block
//! compression (`Lz4`), in which case `payload_len` is checked after decompression.
//!
//! The body comes first so that neither side copies it: [`encode`] appends the point and the
//! trailer to the payload's own buffer, [`decode`] truncates the received buffer to the body.
//!
//! The CRC function is a parameter, `(crc so far, bytes) -> crc`: inside a component it is the
//! host's `checksum.crc32c` import (hardware), natively [`crc32c_append`].

pub const MAGIC: &[u8; 4] = b"GTB1";
pub const VERSION: u8 = 1;
pub const TRAILER_LEN: usize = 28;

/// How the body holds the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Lz4 = 1,
}

/// A decoded, checksum-verified frame (the body still encoded with `codec`).
#[derive(Debug, PartialEq, Eq)]
pub struct Frame {
    pub point: String,
    pub start: u64,
    pub codec: Codec,
    pub payload_len: usize,
    pub body: Vec<u8>,
}

/// A CRC32C function: continues `crc` over `bytes`.
pub type Crc = fn(u32, &[u8]) -> u32;

/// The CRC32C of the `crc32c` crate (SSE 4.2 when available), for native use.
pub fn crc32c_append(crc: u32, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, bytes)
}

/// Frames `body` (the payload encoded with `codec`, `payload_len` bytes once decoded), reusing
/// its buffer.
pub fn encode(
    crc: Crc,
    point: &str,
    start: u64,
    codec: Codec,
    payload_len: usize,
    body: Vec<u8>,
) -> Vec<u8> {
    let body_len = body.len();
    let mut out = body;
    out.reserve_exact(point.len() + TRAILER_LEN);
    out.extend_from_slice(point.as_bytes());
    let mut trailer = [0u8; TRAILER_LEN];
    trailer[0..4].copy_from_slice(MAGIC);
    trailer[4] = VERSION;
    trailer[5] = codec as u8;
    trailer[6..8].copy_from_slice(&(point.len() as u16).to_le_bytes());
    trailer[8..16].copy_from_slice(&start.to_le_bytes());
    trailer[16..20].copy_from_slice(&(payload_len as u32).to_le_bytes());
    trailer[20..24].copy_from_slice(&(body_len as u32).to_le_bytes());
    let checksum = crc(crc(0, &out), &trailer[..24]);
    trailer[24..28].copy_from_slice(&checksum.to_le_bytes());
    out.extend_from_slice(&trailer);
    out
}

/// Checks and splits a frame made by [`encode`], reusing its buffer for the body.
pub fn decode(crc: Crc, mut bytes: Vec<u8>) -> Result<Frame, String> {
    let Some(trailer_at) = bytes.len().checked_sub(TRAILER_LEN) else {
        return Err(format!(
            "record of {} bytes is shorter than the {TRAILER_LEN}-byte trailer",
            bytes.len()
        ));
    };
    let trailer: [u8; TRAILER_LEN] = bytes[trailer_at..].try_into().unwrap();
    if &trailer[0..4] != MAGIC {
        return Err("not a goutube bundle (bad magic)".into());
    }
    if trailer[4] != VERSION {
        return Err(format!("bundle version {} is not supported", trailer[4]));
    }
    let codec = match trailer[5] {
        0 => Codec::Raw,
        1 => Codec::Lz4,
        other => return Err(format!("unknown codec {other}")),
    };
    let point_len = usize::from(u16::from_le_bytes([trailer[6], trailer[7]]));
    let start = u64::from_le_bytes(trailer[8..16].try_into().unwrap());
    let payload_len = u32::from_le_bytes(trailer[16..20].try_into().unwrap()) as usize;
    let body_len = u32::from_le_bytes(trailer[20..24].try_into().unwrap()) as usize;
    let stored_crc = u32::from_le_bytes(trailer[24..28].try_into().unwrap());
    if body_len + point_len != trailer_at {
        return Err(format!(
            "record is {} bytes, its trailer describes {}",
            bytes.len(),
            body_len + point_len + TRAILER_LEN
        ));
    }
    let computed = crc(crc(0, &bytes[..trailer_at]), &trailer[..24]);
    if computed != stored_crc {
        return Err(format!(
            "checksum mismatch: stored {stored_crc:08x}, computed {computed:08x}"
        ));
    }
    if codec == Codec::Raw && body_len != payload_len {
        return Err("raw body length differs from the payload length".into());
    }
    let point = std::str::from_utf8(&bytes[body_len..trailer_at])
        .map_err(|_| "point id is not UTF-8".to_string())?
        .to_owned();
    bytes.truncate(body_len);
    Ok(Frame {
        point,
        start,
        codec,
        payload_len,
        body: bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let body: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let bytes = encode(
            crc32c_append,
            "videos/a",
            1234,
            Codec::Raw,
            body.len(),
            body.clone(),
        );
        let frame = decode(crc32c_append, bytes).unwrap();
        let want = Frame {
            point: "videos/a".into(),
            start: 1234,
            codec: Codec::Raw,
            payload_len: 1000,
            body,
        };
        assert_eq!(frame, want);
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let body: Vec<u8> = (0..64u32).map(|i| (i * 7) as u8).collect();
        let bytes = encode(crc32c_append, "p", 9, Codec::Raw, body.len(), body);
        for i in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[i / 8] ^= 1 << (i % 8);
            assert!(
                decode(crc32c_append, damaged).is_err(),
                "flip of bit {i} accepted"
            );
        }
        assert!(decode(crc32c_append, bytes[1..].to_vec()).is_err());
        assert!(decode(crc32c_append, Vec::new()).is_err());
    }
}
