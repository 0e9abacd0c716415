//! Signed URLs of the HTTP gateway: a browser has no client certificate, so a client that may
//! `consume` a point asks a node (`SignUrl`, `goutube url`) for a URL that carries its right for
//! a while. The URL holds `expires` (Unix seconds), `subject` (who signed) and `sig`: the
//! HMAC-SHA256, under the node's first URL key, of
//! `goutube-url-v1 \n point \n expires \n subject`. A request with it is authorized as that
//! subject (so taking a right away also takes it from the URLs already handed out). Every
//! configured key verifies, the first signs: keys rotate by putting the new one first.
//!
//! A URL of the pages (`/v1/pages/…`, `goutube url --pages`) is signed the same way over
//! `goutube-pages-v1 \n expires \n subject`: it names the viewer, and every page authorizes
//! what it shows for that viewer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, utf8_percent_encode};
use ring::hmac;

/// What a point id may keep unescaped in a URL path: everything but controls, space, `%`, `?`,
/// `#` and the characters URLs reserve or forbid (`/` stays: ids with `/` read as paths).
const PATH: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'\\')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// `id` as a URL path segment (its `/` kept).
pub(crate) fn encode_path(id: &str) -> String {
    utf8_percent_encode(id, PATH).to_string()
}

/// `value` as a query value.
pub(crate) fn encode_query(value: &str) -> String {
    utf8_percent_encode(value, NON_ALPHANUMERIC).to_string()
}

/// Why a signed URL does not let its holder in. The messages are one line, for a `403`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("this node has no http.url_keys: it cannot sign or verify URLs")]
    NoKeys,
    #[error("a signed URL needs expires, subject and sig")]
    Incomplete,
    #[error("the signed URL is malformed: {0}")]
    Malformed(&'static str),
    #[error("the signed URL expired at {0} (Unix seconds)")]
    Expired(u64),
    #[error("the signature does not match this point (another point's URL, or a forged one)")]
    Mismatch,
    #[error("a signed URL may live at most {0} seconds")]
    TooLong(u64),
}

/// The holder of a valid signed URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub subject: String,
    pub expires: u64,
    /// The signature as the URL carried it (pages carry it on in their links).
    pub sig: String,
}

/// A URL signed for one point and one subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedUrl {
    /// The URL, with its `expires`, `subject` and `sig` query.
    pub url: String,
    /// When it stops working (Unix seconds).
    pub expires: u64,
}

/// Signs and verifies the URLs of one node.
pub struct UrlSigner {
    keys: Vec<hmac::Key>,
    /// `scheme://host:port` of the gateway, as clients reach it.
    base: String,
    max_ttl: Duration,
}

impl UrlSigner {
    pub fn new(keys: &[Vec<u8>], base: String, max_ttl: Duration) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|key| hmac::Key::new(hmac::HMAC_SHA256, key))
                .collect(),
            base: base.trim_end_matches('/').to_owned(),
            max_ttl,
        }
    }

    /// A URL that lets its holder read `point` as `subject` for `ttl` (the player page with
    /// `player`).
    pub fn sign(
        &self,
        point: &str,
        subject: &str,
        ttl: Duration,
        player: bool,
    ) -> Result<SignedUrl, UrlError> {
        let kind = if player { "player" } else { "points" };
        let path = format!("/v1/{kind}/{}", encode_path(point));
        self.sign_for(Resource::Point(point), &path, subject, ttl)
    }

    /// A URL that lets its holder see the node's pages (the points page, and from there the
    /// cluster page) as `subject` for `ttl`. What each page shows is still authorized for
    /// `subject`, call by call.
    pub fn sign_pages(&self, subject: &str, ttl: Duration) -> Result<SignedUrl, UrlError> {
        self.sign_for(Resource::Pages, "/v1/pages/points", subject, ttl)
    }

    fn sign_for(
        &self,
        resource: Resource<'_>,
        path: &str,
        subject: &str,
        ttl: Duration,
    ) -> Result<SignedUrl, UrlError> {
        let key = self.keys.first().ok_or(UrlError::NoKeys)?;
        if ttl > self.max_ttl {
            return Err(UrlError::TooLong(self.max_ttl.as_secs()));
        }
        let expires = now() + ttl.as_secs().max(1);
        let tag = hmac::sign(key, &message(resource, expires, subject));
        let url = format!(
            "{}{path}?expires={expires}&subject={}&sig={}",
            self.base,
            encode_query(subject),
            hex(tag.as_ref())
        );
        Ok(SignedUrl { url, expires })
    }

    /// Who the `expires`, `subject` and `sig` of a request for `resource` let in.
    pub fn verify(
        &self,
        resource: Resource<'_>,
        expires: Option<&str>,
        subject: Option<&str>,
        sig: Option<&str>,
    ) -> Result<Grant, UrlError> {
        if self.keys.is_empty() {
            return Err(UrlError::NoKeys);
        }
        let (Some(expires), Some(subject), Some(sig)) = (expires, subject, sig) else {
            return Err(UrlError::Incomplete);
        };
        let expires: u64 = expires
            .parse()
            .map_err(|_| UrlError::Malformed("expires is not a number"))?;
        let tag = unhex(sig).ok_or(UrlError::Malformed("sig is not hexadecimal"))?;
        let message = message(resource, expires, subject);
        if !self
            .keys
            .iter()
            .any(|key| hmac::verify(key, &message, &tag).is_ok())
        {
            return Err(UrlError::Mismatch);
        }
        if expires <= now() {
            return Err(UrlError::Expired(expires));
        }
        Ok(Grant {
            subject: subject.to_owned(),
            expires,
            sig: sig.to_owned(),
        })
    }
}

/// What a URL is signed for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// One point: its bytes and its player page.
    Point(&'a str),
    /// The node's pages (`/v1/pages/…`).
    Pages,
}

/// The signed bytes. A point's and the pages' differ in their first line, so neither
/// signature opens the other.
fn message(resource: Resource<'_>, expires: u64, subject: &str) -> Vec<u8> {
    match resource {
        Resource::Point(point) => format!("goutube-url-v1\n{point}\n{expires}\n{subject}"),
        Resource::Pages => format!("goutube-pages-v1\n{expires}\n{subject}"),
    }
    .into_bytes()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(url: &str) -> (String, String, String) {
        let query = url.split_once('?').unwrap().1;
        let field = |name: &str| {
            let raw = query
                .split('&')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
                .unwrap();
            percent_encoding::percent_decode_str(raw)
                .decode_utf8()
                .unwrap()
                .into_owned()
        };
        (field("expires"), field("subject"), field("sig"))
    }

    #[test]
    fn a_pages_url_opens_the_pages_and_no_point() {
        let signer = UrlSigner::new(
            &[b"k".to_vec()],
            "http://h:1".into(),
            Duration::from_secs(60),
        );
        let url = signer
            .sign_pages("alice", Duration::from_secs(30))
            .unwrap()
            .url;
        assert!(
            url.starts_with("http://h:1/v1/pages/points?expires="),
            "{url}"
        );
        let (e, s, g) = query(&url);
        let grant = signer
            .verify(Resource::Pages, Some(&e), Some(&s), Some(&g))
            .unwrap();
        assert_eq!(grant.subject, "alice");
        assert_eq!(
            signer.verify(
                Resource::Point("pages/points"),
                Some(&e),
                Some(&s),
                Some(&g)
            ),
            Err(UrlError::Mismatch)
        );
        let point = signer
            .sign("p", "alice", Duration::from_secs(30), false)
            .unwrap()
            .url;
        let (e, s, g) = query(&point);
        assert_eq!(
            signer.verify(Resource::Pages, Some(&e), Some(&s), Some(&g)),
            Err(UrlError::Mismatch)
        );
    }

    #[test]
    fn urls_verify_for_their_point_only_until_they_expire() {
        let hour = Duration::from_secs(3600);
        let signer = UrlSigner::new(&[b"first key".to_vec()], "https://n:1/".into(), hour * 24);
        let SignedUrl { url, expires } = signer
            .sign("videos/a b%?#é", "alice smith", hour, false)
            .unwrap();
        assert!(
            url.starts_with("https://n:1/v1/points/videos/a%20b%25%3F%23%C3%A9?"),
            "{url}"
        );
        let (e, s, g) = query(&url);
        let grant = signer
            .verify(
                Resource::Point("videos/a b%?#é"),
                Some(&e),
                Some(&s),
                Some(&g),
            )
            .unwrap();
        assert_eq!(
            grant,
            Grant {
                subject: "alice smith".into(),
                expires,
                sig: g.clone(),
            }
        );
        assert_eq!(
            signer.verify(
                Resource::Point("videos/other"),
                Some(&e),
                Some(&s),
                Some(&g)
            ),
            Err(UrlError::Mismatch)
        );
        assert_eq!(
            signer.verify(
                Resource::Point("videos/a b%?#é"),
                Some(&e),
                Some("root"),
                Some(&g)
            ),
            Err(UrlError::Mismatch),
            "another subject"
        );
        let later = (expires + 100).to_string();
        assert_eq!(
            signer.verify(
                Resource::Point("videos/a b%?#é"),
                Some(&later),
                Some(&s),
                Some(&g)
            ),
            Err(UrlError::Mismatch),
            "a moved expiry"
        );
        assert_eq!(
            signer.verify(Resource::Point("videos/a b%?#é"), Some(&e), Some(&s), None),
            Err(UrlError::Incomplete)
        );
        assert!(matches!(
            signer.verify(Resource::Point("p"), Some("x"), Some(&s), Some(&g)),
            Err(UrlError::Malformed(_))
        ));
        assert_eq!(
            signer.sign("p", "a", hour * 25, false),
            Err(UrlError::TooLong(24 * 3600))
        );

        // Expired: signed (by the same key) with an expiry in the past.
        let past = now() - 10;
        let tag = hmac::sign(&signer.keys[0], &message(Resource::Point("p"), past, "a"));
        assert_eq!(
            signer.verify(
                Resource::Point("p"),
                Some(&past.to_string()),
                Some("a"),
                Some(&hex(tag.as_ref()))
            ),
            Err(UrlError::Expired(past))
        );
    }

    #[test]
    fn keys_rotate_the_first_signs_every_one_verifies() {
        let hour = Duration::from_secs(3600);
        let old = UrlSigner::new(&[b"old key".to_vec()], "http://n:1".into(), hour);
        let rotated = UrlSigner::new(
            &[b"new key".to_vec(), b"old key".to_vec()],
            "http://n:1".into(),
            hour,
        );
        let retired = UrlSigner::new(&[b"new key".to_vec()], "http://n:1".into(), hour);
        let url = old.sign("p", "a", hour, true).unwrap().url;
        assert!(url.contains("/v1/player/p?"), "{url}");
        let (e, s, g) = query(&url);
        assert!(
            rotated
                .verify(Resource::Point("p"), Some(&e), Some(&s), Some(&g))
                .is_ok()
        );
        assert_eq!(
            retired.verify(Resource::Point("p"), Some(&e), Some(&s), Some(&g)),
            Err(UrlError::Mismatch)
        );
        let url = rotated.sign("p", "a", hour, false).unwrap().url;
        let (e, s, g) = query(&url);
        assert!(
            retired
                .verify(Resource::Point("p"), Some(&e), Some(&s), Some(&g))
                .is_ok()
        );
        let none = UrlSigner::new(&[], "http://n:1".into(), hour);
        assert_eq!(none.sign("p", "a", hour, false), Err(UrlError::NoKeys));
    }
}
