//! A deliberately broken authorizer for the host's fault tests. Its configuration picks the
//! misbehaviour of `authorize`: `loop` (never returns), `allocate` (asks for 1 GiB), `panic`, or
//! `allow`; `fail` makes `configure` itself fail.

wit_bindgen::generate!({ world: "authorizer", path: "../../../schema/wit" });

use std::cell::RefCell;
use std::hint::black_box;



thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Misbehaving;

impl Guest for Misbehaving {
    fn configure(config: String) -> Result<(), String> {
        let mode = config.trim().to_owned();
        match mode.as_str() {
            "loop" | "allocate" | "panic" | "allow" => {
                MODE.set(mode);
                Ok(())
            }
            "fail" => Err("configured to fail".into()),
            other => Err(format!("unknown mode {other:?}")),
        }
    }

    fn authorize(request: AuthzRequest) -> Decision {
        match MODE.with_borrow(String::clone).as_str() {
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
            _ => Decision::Allow(format!("{} allowed", request.subject)),
        }
    }
}

export!(Misbehaving);
