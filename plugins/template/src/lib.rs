//! A minimal authorizer to copy: it allows the subjects listed in its configuration (one per line)
//! to do everything but `admin`, and denies everyone else. See docs/plugins.md for how to build
//! it, name it in a node's config and test it.

wit_bindgen::generate!({ world: "authorizer", path: "../../schema/wit" });

use std::cell::RefCell;

use goutube::plugins::log::{self, Level};
use goutube::plugins::types::Action;

thread_local! {
    // Configuration lives in the instance: `configure` runs once per instance, before any call.
    static ALLOWED: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
}

struct Template;

impl Guest for Template {
    fn configure(config: String) -> Result<(), String> {
        let subjects: Vec<String> = config
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if subjects.is_empty() {
            return Err("list at least one subject, one per line".into());
        }
        log::log(
            Level::Info,
            &format!("allowing {} subject(s)", subjects.len()),
        );
        ALLOWED.set(subjects);
        Ok(())
    }

    fn authorize(request: AuthzRequest) -> Decision {
        if request.action == Action::Admin {
            return Decision::Deny("the template never allows admin".into());
        }
        if ALLOWED.with_borrow(|allowed| allowed.contains(&request.subject)) {
            Decision::Allow(format!("{} is listed", request.subject))
        } else {
            Decision::Deny(format!("{} is not listed", request.subject))
        }
    }
}

export!(Template);
