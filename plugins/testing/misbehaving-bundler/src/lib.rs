//! A deliberately wrong bundler for the host's tests. It bundles as `crc-bundler` does; its
//! configuration says how `unbundle` answers: `other-point` (the record of another point),
//! `other-start` (another offset), `outside` (a payload range past the end of the bundle),
//! `read-outside` (reads past the end of its buffer, which traps), `huge` (a rebuilt payload of
//! 64 MiB). Anything else answers correctly.

wit_bindgen::generate!({ world: "bundler", path: "../../../schema/wit" });

use std::cell::RefCell;

use goutube::plugins::bundles::{Body, FoundPayload, Span};
use goutube::plugins::checksum;

bundle_format::buffer_source!(Buffer);

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Misbehaving;

impl Guest for Misbehaving {
    fn configure(config: String) -> Result<(), String> {
        MODE.with_borrow_mut(|mode| *mode = config.trim().to_owned());
        Ok(())
    }

    fn bundle(point: String, start: u64, payload: &Buffer) -> Bundled {
        Bundled {
            head: Vec::new(),
            body: Body::Payload,
            tail: bundle_format::raw_tail(checksum::crc32c, payload, &point, start),
        }
    }

    fn unbundle(bytes: &Buffer) -> Result<Unbundled, String> {
        let checked = bundle_format::check(bytes)?;
        let mut found = Unbundled {
            point: checked.point,
            start: checked.start,
            payload: FoundPayload::Within(Span {
                offset: 0,
                len: checked.body_len as u64,
            }),
        };
        MODE.with_borrow(|mode| match mode.as_str() {
            "other-point" => found.point.push_str("-other"),
            "other-start" => found.start += 1,
            "outside" => {
                found.payload = FoundPayload::Within(Span {
                    offset: 1,
                    len: bytes.len(),
                })
            }
            "read-outside" => {
                bytes.read(bytes.len(), 1);
            }
            "huge" => found.payload = FoundPayload::Rebuilt(vec![0; 64 << 20]),
            _ => {}
        });
        Ok(found)
    }
}

export!(Misbehaving);
