//! `builtin:acl-authorizer`: a pure-WebAssembly access list (the `acl-rules` crate). Its
//! configuration has one rule per line, `subject, point-pattern, action`; `*` and `?` are
//! wildcards in every field, `#` starts a comment. A request is allowed when any line matches
//! it, denied otherwise. The original goutube's casbin policy is:
//!
//! ```text
//! root, *, produce
//! root, *, consume
//! ```

wit_bindgen::generate!({ world: "authorizer", path: "../../schema/wit" });

use std::cell::RefCell;

use acl_rules::Acl;
use goutube::plugins::types::Action;

thread_local! {
    // Set by `configure`, which runs once per instance before any call.
    static ACL: RefCell<Option<Acl>> = const { RefCell::new(None) };
}

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Produce => "produce",
        Action::Consume => "consume",
        Action::Metadata => "metadata",
        Action::Replicate => "replicate",
        Action::Admin => "admin",
    }
}

struct AclAuthorizer;

impl Guest for AclAuthorizer {
    fn configure(config: String) -> Result<(), String> {
        let acl = Acl::parse(&config)?;
        ACL.set(Some(acl));
        Ok(())
    }

    fn authorize(request: AuthzRequest) -> Decision {
        let action = action_name(request.action);
        ACL.with_borrow(|acl| {
            match acl
                .as_ref()
                .and_then(|acl| acl.allows(&request.subject, action, &request.point))
            {
                Some(line) => Decision::Allow(format!("ACL line {line}")),
                None => Decision::Deny(format!(
                    "no ACL line allows {} to {action} {:?}",
                    request.subject, request.point
                )),
            }
        })
    }
}

export!(AclAuthorizer);
