//! A deliberately broken authorizer for the host's fault tests. `authorize` misbehaves according
//! to the first segment of the point id — `loop/…` never returns, `allocate/…` asks for 1 GiB,
//! `panic/…` panics, `verbose/…` denies with a 100 000-character reason — and allows everything
//! else. The configuration `fail` makes `configure`
//! itself fail.

wit_bindgen::generate!({ world: "authorizer", path: "../../../schema/wit" });

use std::hint::black_box;

struct Misbehaving;

impl Guest for Misbehaving {
    fn configure(config: String) -> Result<(), String> {
        match config.trim() {
            "fail" => Err("configured to fail".into()),
            _ => Ok(()),
        }
    }

    fn authorize(request: AuthzRequest) -> Decision {
        match request.point.split('/').next().unwrap_or_default() {
            "loop" => {
                let mut spins = 0u64;
                loop {
                    spins = black_box(spins.wrapping_add(1));
                }
            }
            "allocate" => {
                let big = vec![1u8; 1 << 30];
                Decision::Allow(format!("allocated {}", black_box(big).len()))
            }
            "panic" => panic!("misbehaving-authorizer panics on purpose"),
            "verbose" => Decision::Deny("why? ".repeat(20_000)),
            _ => Decision::Allow(format!("{} allowed", request.subject)),
        }
    }
}

export!(Misbehaving);
