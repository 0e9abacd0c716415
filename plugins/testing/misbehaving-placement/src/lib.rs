//! A deliberately wrong placement for the host's fail-closed tests. Its configuration says how
//! it answers `owners`: `empty` (no owner), `stranger` (a name that is no member), `twice` (the
//! first member twice), `long` (a 10 000-character name), `trap` (panics). Anything else answers
//! the first member, as a correct placement could.

wit_bindgen::generate!({ world: "placement", path: "../../../schema/wit" });

use std::cell::RefCell;

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Misbehaving;

impl Guest for Misbehaving {
    fn configure(config: String) -> Result<(), String> {
        MODE.with_borrow_mut(|mode| *mode = config.trim().to_owned());
        Ok(())
    }

    fn owners(_key: String, members: Vec<Member>, _replicas: u32) -> Vec<String> {
        let first = members.first().map(|m| m.name.clone()).unwrap_or_default();
        MODE.with_borrow(|mode| match mode.as_str() {
            "empty" => Vec::new(),
            "stranger" => vec!["no-such-member".into()],
            "twice" => vec![first.clone(), first],
            "long" => vec!["x".repeat(10_000)],
            "trap" => panic!("misbehaving-placement panics on purpose"),
            _ => vec![first],
        })
    }
}

export!(Misbehaving);
