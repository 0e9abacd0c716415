//! The `Range` rules of the gateway (RFC 9110 §14, as research note §3.4 lists them), as pure
//! functions: parse the header, then resolve it against the point's length.
//!
//! - Only the `bytes` unit is honoured; another unit, a malformed header, `a-b` with `b < a`, or
//!   more than one range means the header is ignored: the whole point (`200`). Browsers and
//!   players send one range per request.
//! - `a-` and `a-b` with `a ≥ len` cannot be satisfied (`416`, `Content-Range: bytes */len`);
//!   `b ≥ len` is cut to `len - 1`.
//! - `-n` is the last `n` bytes, the whole point when `n ≥ len`; `-0` cannot be satisfied.
//! - Nothing can be satisfied in an empty point.
//!
//! (`If-Range` is the gateway's: it decides whether the header is read at all.)

/// One range as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spec {
    /// `a-b`
    Closed(u64, u64),
    /// `a-`
    From(u64),
    /// `-n`
    Suffix(u64),
}

/// What to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// `200` with the whole point.
    Full,
    /// `206` with `[start, end]` (inclusive, as `Content-Range` writes it).
    Partial { start: u64, end: u64 },
    /// `416`.
    Unsatisfiable,
}

/// The one range of a `Range` header value, or `None` if the header is to be ignored.
pub(crate) fn parse(value: &str) -> Option<Spec> {
    let (unit, ranges) = value.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = ranges.split(',').map(str::trim).filter(|r| !r.is_empty());
    let only = specs.next()?;
    if specs.next().is_some() {
        return None;
    }
    let (first, last) = only.split_once('-')?;
    let number = |text: &str| -> Option<u64> {
        let text = text.trim();
        (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
            .then(|| text.parse().ok())
            .flatten()
    };
    match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => Some(Spec::Suffix(number(last)?)),
        (false, true) => Some(Spec::From(number(first)?)),
        (false, false) => {
            let (a, b) = (number(first)?, number(last)?);
            (b >= a).then_some(Spec::Closed(a, b))
        }
        (true, true) => None,
    }
}

impl Spec {
    /// The answer for a point of `len` bytes.
    pub(crate) fn resolve(self, len: u64) -> Answer {
        if len == 0 {
            return Answer::Unsatisfiable;
        }
        match self {
            Spec::Closed(a, _) | Spec::From(a) if a >= len => Answer::Unsatisfiable,
            Spec::Closed(a, b) => Answer::Partial {
                start: a,
                end: b.min(len - 1),
            },
            Spec::From(a) => Answer::Partial {
                start: a,
                end: len - 1,
            },
            Spec::Suffix(0) => Answer::Unsatisfiable,
            Spec::Suffix(n) => Answer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
        }
    }

    /// Whether the range reaches past the first `len` bytes: a copy that short is not the one
    /// to answer from if a longer one exists (the gateway sends such a request to the owner).
    pub(crate) fn reaches_past(self, len: u64) -> bool {
        match self {
            Spec::Closed(_, b) => b >= len,
            Spec::From(a) => a >= len,
            Spec::Suffix(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_or_are_ignored() {
        for (header, spec) in [
            ("bytes=0-99", Some(Spec::Closed(0, 99))),
            ("bytes=100-", Some(Spec::From(100))),
            ("bytes=-100", Some(Spec::Suffix(100))),
            ("Bytes = 5-5", Some(Spec::Closed(5, 5))),
            ("bytes=0-9,20-29", None),
            ("bytes=50-10", None),
            ("items=0-9", None),
            ("bytes=", None),
            ("bytes=-", None),
            ("bytes=a-b", None),
            ("bytes=+1-2", None),
            ("bytes=99999999999999999999-", None),
            ("0-10", None),
        ] {
            assert_eq!(parse(header), spec, "{header}");
        }
    }

    #[test]
    fn ranges_resolve_against_the_length() {
        let len = 1000;
        for (spec, answer) in [
            (Spec::Closed(0, 99), Answer::Partial { start: 0, end: 99 }),
            (
                Spec::Closed(900, 5000),
                Answer::Partial {
                    start: 900,
                    end: 999,
                },
            ),
            (Spec::Closed(1000, 1001), Answer::Unsatisfiable),
            (
                Spec::From(999),
                Answer::Partial {
                    start: 999,
                    end: 999,
                },
            ),
            (Spec::From(1000), Answer::Unsatisfiable),
            (
                Spec::Suffix(100),
                Answer::Partial {
                    start: 900,
                    end: 999,
                },
            ),
            (Spec::Suffix(5000), Answer::Partial { start: 0, end: 999 }),
            (Spec::Suffix(0), Answer::Unsatisfiable),
        ] {
            assert_eq!(spec.resolve(len), answer, "{spec:?}");
        }
        assert_eq!(Spec::Suffix(10).resolve(0), Answer::Unsatisfiable);
        assert_eq!(Spec::From(0).resolve(0), Answer::Unsatisfiable);
        assert!(Spec::Closed(0, 1000).reaches_past(1000));
        assert!(!Spec::Closed(0, 999).reaches_past(1000));
        assert!(Spec::From(1000).reaches_past(1000));
        assert!(!Spec::Suffix(5000).reaches_past(1000));
    }
}
