//! `builtin:polar-authorizer` (the default authorizer): asks the host's Polar policy
//! (`plugins.authorizer.policy_file`, or the built-in `policies/default.polar`) whether
//! `allow(subject, action, point)` holds. Takes no configuration of its own.

wit_bindgen::generate!({ world: "authorizer", path: "../../schema/wit" });

use goutube::plugins::polar;
use goutube::plugins::types::Action;

struct PolarAuthorizer;

fn action_name(action: Action) -> &'static str {
    match action {
        Action::Produce => "produce",
        Action::Consume => "consume",
        Action::Metadata => "metadata",
        Action::Replicate => "replicate",
        Action::Admin => "admin",
    }
}

impl Guest for PolarAuthorizer {
    fn configure(config: String) -> Result<(), String> {
        if config.trim().is_empty() {
            Ok(())
        } else {
            Err(
                "polar-authorizer takes no configuration; set plugins.authorizer.policy_file"
                    .into(),
            )
        }
    }

    fn authorize(request: AuthzRequest) -> Decision {
        let action = action_name(request.action);
        match polar::is_allowed(&request.subject, action, &request.point) {
            Ok(true) => Decision::Allow("the Polar policy allows it".into()),
            Ok(false) => Decision::Deny("no allow rule of the Polar policy matches".into()),
            Err(error) => Decision::Deny(format!("the Polar policy failed: {error}")),
        }
    }
}

export!(PolarAuthorizer);
