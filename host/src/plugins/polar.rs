//! The Polar policy the host evaluates with oso for the `polar` interface of authorizers (oso
//! cannot run inside a component: see STACK.md).
//!
//! Rules are `allow(subject, action, point)` over strings; the subject is the client
//! certificate's common name, the action one of `produce`, `consume`, `metadata`, `replicate`,
//! `admin`.

/// The built-in policy, `policies/default.polar`.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.polar");

/// A loaded Polar policy (oso), asked by authorizers through the host `polar` interface.
pub struct Polar {
    oso: oso::Oso,
    origin: String,
}

impl Polar {
    /// Loads `text`; `origin` names it in errors (a file path, or "built-in default").
    pub fn load(text: &str, origin: &str) -> Result<Self, String> {
        let mut oso = oso::Oso::new();
        oso.load_str(text)
            .map_err(|e| format!("Polar policy {origin}: {e}"))?;
        Ok(Self {
            oso,
            origin: origin.to_owned(),
        })
    }

    /// Where the policy came from: a file path, or "built-in default".
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the policy allows `subject` to take `action` on `point`.
    pub fn is_allowed(&self, subject: &str, action: &str, point: &str) -> Result<bool, String> {
        self.oso
            .is_allowed(subject.to_owned(), action.to_owned(), point.to_owned())
            .map_err(|e| format!("evaluating {}: {e}", self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_allows_root_nodes_and_plaintext_only() {
        let policy = Polar::load(DEFAULT_POLICY, "default").unwrap();
        for action in ["produce", "consume", "metadata", "replicate", "admin"] {
            assert!(
                policy.is_allowed("root", action, "any/point").unwrap(),
                "root {action}"
            );
            assert!(
                !policy.is_allowed("nobody", action, "any/point").unwrap(),
                "nobody {action}"
            );
            assert!(
                policy.is_allowed("anonymous", action, "p").unwrap(),
                "plaintext {action}"
            );
        }
        assert!(
            policy
                .is_allowed("node:follower-1", "replicate", "p")
                .unwrap()
        );
        assert!(
            !policy
                .is_allowed("node:follower-1", "produce", "p")
                .unwrap()
        );
        assert!(!policy.is_allowed("nodes", "replicate", "p").unwrap());
    }

    #[test]
    fn syntax_errors_name_the_origin() {
        let error = Polar::load("allow(", "policies/broken.polar")
            .err()
            .unwrap();
        assert!(error.contains("policies/broken.polar"), "{error}");
    }
}
