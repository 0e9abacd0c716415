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
//! The body comes first and the rest is a tail computed from the body's CRC alone, so a component
//! frames a payload it never reads ([`tail`]) and checks a received bundle it reads only the end
//! of ([`check`], over a [`Source`]: in a component, the host's buffer). [`encode`] and
//! [`decode`] do the same on bytes in hand (natively: the benchmark, the tests).
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

/// What follows a body of `body_len` bytes whose CRC32C is `body_crc`: the point id and the
/// trailer.
pub fn tail(
    crc: Crc,
    body_crc: u32,
    point: &str,
    start: u64,
    codec: Codec,
    payload_len: usize,
    body_len: usize,
) -> Vec<u8> {
    let mut tail = Vec::with_capacity(point.len() + TRAILER_LEN);
    tail.extend_from_slice(point.as_bytes());
    tail.extend_from_slice(MAGIC);
    tail.push(VERSION);
    tail.push(codec as u8);
    tail.extend_from_slice(&(point.len() as u16).to_le_bytes());
    tail.extend_from_slice(&start.to_le_bytes());
    tail.extend_from_slice(&(payload_len as u32).to_le_bytes());
    tail.extend_from_slice(&(body_len as u32).to_le_bytes());
    let checksum = crc(body_crc, &tail);
    tail.extend_from_slice(&checksum.to_le_bytes());
    tail
}

/// The tail that frames `payload` as it is (`Codec::Raw`), its CRC32C computed by `payload`
/// where it lies (in a component: by the host, without copying it into the guest).
pub fn raw_tail(crc: Crc, payload: &impl Source, point: &str, start: u64) -> Vec<u8> {
    let len = payload.len();
    let body_crc = payload.crc32c(0, 0, len);
    tail(
        crc,
        body_crc,
        point,
        start,
        Codec::Raw,
        len as usize,
        len as usize,
    )
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
    let tail = tail(
        crc,
        crc(0, &body),
        point,
        start,
        codec,
        payload_len,
        body.len(),
    );
    let mut out = body;
    out.extend_from_slice(&tail);
    out
}

/// A bundle to check, wherever its bytes are.
pub trait Source {
    fn len(&self) -> u64;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// A copy of `[offset, offset + len)`; only called within [`len`](Source::len).
    fn read(&self, offset: u64, len: u64) -> Vec<u8>;
    /// CRC32C of `[offset, offset + len)` continuing from `crc`; only called within `len`.
    fn crc32c(&self, crc: u32, offset: u64, len: u64) -> u32;
}

/// Makes a component's generated `buffer` resource type (with its `len`, `read` and `crc32c`
/// methods, as the `bundles` interface defines them) a [`Source`].
#[macro_export]
macro_rules! buffer_source {
    ($buffer:ty) => {
        impl $crate::Source for $buffer {
            fn len(&self) -> u64 {
                <$buffer>::len(self)
            }

            fn read(&self, offset: u64, len: u64) -> Vec<u8> {
                <$buffer>::read(self, offset, len)
            }

            fn crc32c(&self, crc: u32, offset: u64, len: u64) -> u32 {
                <$buffer>::crc32c(self, crc, offset, len)
            }
        }
    };
}

/// A bundle whose checksum matched: the body is `[0, body_len)` of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Checked {
    pub point: String,
    pub start: u64,
    pub codec: Codec,
    pub payload_len: usize,
    pub body_len: usize,
}

/// Checks the bundle in `source`, reading only its point id and trailer.
pub fn check(source: &impl Source) -> Result<Checked, String> {
    let total = source.len();
    let Some(trailer_at) = total.checked_sub(TRAILER_LEN as u64) else {
        return Err(format!(
            "record of {total} bytes is shorter than the {TRAILER_LEN}-byte trailer"
        ));
    };
    let trailer = source.read(trailer_at, TRAILER_LEN as u64);
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
    let point_len = u64::from(u16::from_le_bytes([trailer[6], trailer[7]]));
    let start = u64::from_le_bytes(trailer[8..16].try_into().unwrap());
    let payload_len = u32::from_le_bytes(trailer[16..20].try_into().unwrap()) as usize;
    let body_len = u64::from(u32::from_le_bytes(trailer[20..24].try_into().unwrap()));
    let stored_crc = u32::from_le_bytes(trailer[24..28].try_into().unwrap());
    if body_len + point_len != trailer_at {
        return Err(format!(
            "record is {total} bytes, its trailer describes {}",
            body_len + point_len + TRAILER_LEN as u64
        ));
    }
    let computed = source.crc32c(0, 0, total - 4);
    if computed != stored_crc {
        return Err(format!(
            "checksum mismatch: stored {stored_crc:08x}, computed {computed:08x}"
        ));
    }
    if codec == Codec::Raw && body_len != payload_len as u64 {
        return Err("raw body length differs from the payload length".into());
    }
    let point = String::from_utf8(source.read(body_len, point_len))
        .map_err(|_| "point id is not UTF-8".to_string())?;
    Ok(Checked {
        point,
        start,
        codec,
        payload_len,
        body_len: body_len as usize,
    })
}

/// Bytes in hand as a [`Source`], with a native CRC.
struct InHand<'a> {
    bytes: &'a [u8],
    crc: Crc,
}

impl Source for InHand<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.bytes[offset as usize..(offset + len) as usize].to_vec()
    }

    fn crc32c(&self, crc: u32, offset: u64, len: u64) -> u32 {
        (self.crc)(crc, &self.bytes[offset as usize..(offset + len) as usize])
    }
}

/// Checks and splits a frame made by [`encode`], reusing its buffer for the body.
pub fn decode(crc: Crc, mut bytes: Vec<u8>) -> Result<Frame, String> {
    let checked = check(&InHand { bytes: &bytes, crc })?;
    bytes.truncate(checked.body_len);
    Ok(Frame {
        point: checked.point,
        start: checked.start,
        codec: checked.codec,
        payload_len: checked.payload_len,
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
