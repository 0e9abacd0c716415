//! `builtin:acl-authorizer`: a pure-WebAssembly access list. Its configuration has one rule per
//! line, `subject, point-pattern, action`; `*` and `?` are wildcards in every field, `#` starts a
//! comment. A request is allowed when any line matches it, denied otherwise. The original
//! goutube's casbin policy is:
//!
//! ```text
//! root, *, produce
//! root, *, consume
//! ```

wit_bindgen::generate!({ world: "authorizer", path: "../../schema/wit" });

use std::cell::RefCell;

use goutube::plugins::types::Action;
use wildmatch::WildMatch;

struct Rule {
    line: usize,
    subject: WildMatch,
    point: WildMatch,
    action: WildMatch,
}

thread_local! {
    static RULES: RefCell<Vec<Rule>> = const { RefCell::new(Vec::new()) };
}

const ACTIONS: [&str; 5] = ["produce", "consume", "metadata", "replicate", "admin"];

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Produce => "produce",
        Action::Consume => "consume",
        Action::Metadata => "metadata",
        Action::Replicate => "replicate",
        Action::Admin => "admin",
    }
}

fn parse(config: &str) -> Result<Vec<Rule>, String> {
    let mut rules = Vec::new();
    for (index, raw) in config.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [subject, point, action] = fields[..] else {
            return Err(format!(
                "line {}: expected `subject, point-pattern, action`, got {raw:?}",
                index + 1
            ));
        };
        if subject.is_empty() || point.is_empty() {
            return Err(format!("line {}: empty field in {raw:?}", index + 1));
        }
        let action_pattern = WildMatch::new(action);
        if !ACTIONS.iter().any(|a| action_pattern.matches(a)) {
            return Err(format!(
                "line {}: {action:?} matches no action (known: {})",
                index + 1,
                ACTIONS.join(", ")
            ));
        }
        rules.push(Rule {
            line: index + 1,
            subject: WildMatch::new(subject),
            point: WildMatch::new(point),
            action: action_pattern,
        });
    }
    Ok(rules)
}

struct AclAuthorizer;

impl Guest for AclAuthorizer {
    fn configure(config: String) -> Result<(), String> {
        let rules = parse(&config)?;
        RULES.with_borrow_mut(|current| *current = rules);
        Ok(())
    }

    fn authorize(request: AuthzRequest) -> Decision {
        let action = action_name(request.action);
        RULES.with_borrow(|rules| {
            match rules.iter().find(|r| {
                r.subject.matches(&request.subject)
                    && r.point.matches(&request.point)
                    && r.action.matches(action)
            }) {
                Some(rule) => Decision::Allow(format!("ACL line {}", rule.line)),
                None => Decision::Deny(format!(
                    "no ACL line allows {} to {action} {:?}",
                    request.subject, request.point
                )),
            }
        })
    }
}

export!(AclAuthorizer);
