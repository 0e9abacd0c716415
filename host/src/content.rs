//! Content types: the media type of a point, given with its first bytes (`ProduceRequest`,
//! `goutube put --content-type`) or else sniffed from them, so a browser or a player knows what
//! it reads. Sniffing looks at the first [`SNIFF_LEN`] bytes only.

/// Bytes of a point's head that sniffing looks at.
pub(crate) const SNIFF_LEN: u64 = 512;

/// What a point whose type is neither given nor recognised is served as.
pub(crate) const OCTET_STREAM: &str = "application/octet-stream";

/// The media type the first bytes of a point look like.
pub(crate) fn sniff(head: &[u8]) -> &'static str {
    let starts = |magic: &[u8]| head.starts_with(magic);
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(4, b"ftyp") {
        return match head.get(8..12) {
            Some(b"qt  ") => "video/quicktime",
            Some(b"M4A ") | Some(b"M4B ") => "audio/mp4",
            _ => "video/mp4",
        };
    }
    if starts(&[0x1A, 0x45, 0xDF, 0xA3]) {
        return if contains(head, b"webm") {
            "video/webm"
        } else {
            "video/x-matroska"
        };
    }
    if starts(b"OggS") {
        return if contains(head, b"\x80theora") {
            "video/ogg"
        } else {
            "audio/ogg"
        };
    }
    if starts(b"RIFF") && at(8, b"WAVE") {
        return "audio/wav";
    }
    if starts(b"ID3") || (head.len() >= 2 && head[0] == 0xFF && head[1] & 0xE0 == 0xE0) {
        return "audio/mpeg";
    }
    if starts(b"\x89PNG\r\n\x1a\n") {
        return "image/png";
    }
    if starts(&[0xFF, 0xD8, 0xFF]) {
        return "image/jpeg";
    }
    if starts(b"%PDF-") {
        return "application/pdf";
    }
    if is_text(head) {
        let first = head.iter().find(|b| !b.is_ascii_whitespace());
        return match first {
            Some(b'{') | Some(b'[') => "application/json",
            _ => "text/plain; charset=utf-8",
        };
    }
    OCTET_STREAM
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

/// UTF-8 (a character cut at the end of the head is fine) without control characters but
/// whitespace.
fn is_text(head: &[u8]) -> bool {
    if head.is_empty() {
        return false;
    }
    let valid = match std::str::from_utf8(head) {
        Ok(text) => text,
        // Cut in the middle of a character by the sniffing window.
        Err(error) if error.error_len().is_none() => {
            std::str::from_utf8(&head[..error.valid_up_to()]).expect("checked")
        }
        Err(_) => return false,
    };
    !valid.is_empty()
        && valid
            .chars()
            .all(|c| !c.is_control() || matches!(c, '\t' | '\n' | '\r'))
}

/// Whether `value` is a media type a client may give a point: `type/subtype` with optional
/// `; name=value` parameters, visible ASCII, at most 255 bytes (it is sent as an HTTP header).
pub(crate) fn is_valid(value: &str) -> bool {
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    if value.len() > 255 || !value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return false;
    }
    let mut parts = value.split(';');
    let essence = parts.next().unwrap_or_default().trim();
    let Some((kind, subtype)) = essence.split_once('/') else {
        return false;
    };
    token(kind)
        && token(subtype)
        && parts.all(|parameter| {
            parameter
                .split_once('=')
                .is_some_and(|(name, value)| token(name.trim()) && !value.trim().is_empty())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_recognised() {
        let mut mp4 = vec![0, 0, 0, 0x20];
        mp4.extend_from_slice(b"ftypisom\0\0\x02\0");
        assert_eq!(sniff(&mp4), "video/mp4");
        let mut webm = vec![0x1A, 0x45, 0xDF, 0xA3, 0x9F, 0x42, 0x86, 0x81, 0x01];
        webm.extend_from_slice(b"\x42\x82\x84webm");
        assert_eq!(sniff(&webm), "video/webm");
        assert_eq!(sniff(b"OggS\0\x02....\x01vorbis"), "audio/ogg");
        assert_eq!(sniff(b"RIFF\x24\0\0\0WAVEfmt "), "audio/wav");
        assert_eq!(sniff(b"ID3\x04\0\0"), "audio/mpeg");
        assert_eq!(sniff(&[0xFF, 0xFB, 0x90, 0x64]), "audio/mpeg");
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"), "image/png");
        assert_eq!(sniff(&[0xFF, 0xD8, 0xFF, 0xE0]), "image/jpeg");
        assert_eq!(sniff(b"%PDF-1.7\n"), "application/pdf");
        assert_eq!(sniff(b"  {\"a\": [1, 2]}"), "application/json");
        assert_eq!(
            sniff("héllo wörld\n".as_bytes()),
            "text/plain; charset=utf-8"
        );
        // A character cut by the sniffing window is still text.
        assert_eq!(
            sniff(&"é".as_bytes()[..1]),
            OCTET_STREAM,
            "only a cut character"
        );
        assert_eq!(sniff(&"aé".as_bytes()[..2]), "text/plain; charset=utf-8");
        assert_eq!(sniff(&[0, 1, 2, 3, 250]), OCTET_STREAM);
        assert_eq!(sniff(b""), OCTET_STREAM);
    }

    #[test]
    fn given_types_are_checked() {
        for good in [
            "video/mp4",
            "text/plain; charset=utf-8",
            "application/vnd.apple.mpegurl",
        ] {
            assert!(is_valid(good), "{good}");
        }
        for bad in [
            "",
            "video",
            "video/",
            "/mp4",
            "video/mp4\r\nX: y",
            "vidéo/mp4",
            "a/b; c",
        ] {
            assert!(!is_valid(bad), "{bad:?}");
        }
    }
}
