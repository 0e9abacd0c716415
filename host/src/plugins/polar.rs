//! The Polar policy the host evaluates with oso for the `polar` interface of authorizers (oso
//! cannot run inside a component: see STACK.md).
//!
//! Rules are `allow(subject, action, point)` over strings; the subject is the client
//! certificate's common name, the action one of `produce`, `consume`, `metadata`, `replicate`,
//! `admin`.
//!
//! A query costs tens of microseconds (oso copies its host for each), and a stream creating
//! small points asks once per point, each new. So the policy is also asked, once per subject and
//! action, with the point left a free variable: a first answer that binds nothing to it and puts
//! no constraint on it is a proof from the rules that hold whatever the point is, and the point
//! is not asked about again. Anything else (no answer, a binding, a constraint, an error) says
//! nothing, and each point is asked about as before. See `docs/plugins.md`, "Polar".

use std::collections::HashMap;
use std::sync::Mutex;

/// The built-in policy, `policies/default.polar`.
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/default.polar");

/// The most subject and action pairs whose answer for every point is remembered; past it the
/// memory starts again (subjects are certificate names: a node sees few).
const REMEMBERED: usize = 4096;

/// The name of the free variable standing for the point.
const ANY_POINT: &str = "goutube_any_point";

/// A loaded Polar policy (oso), asked by authorizers through the host `polar` interface.
pub struct Polar {
    oso: oso::Oso,
    origin: String,
    /// Per subject and action: whether the policy allows them on every point.
    everywhere: Mutex<HashMap<(String, String), bool>>,
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
            everywhere: Mutex::new(HashMap::new()),
        })
    }

    /// Where the policy came from: a file path, or "built-in default".
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Whether the policy allows `subject` to take `action` on `point`.
    pub fn is_allowed(&self, subject: &str, action: &str, point: &str) -> Result<bool, String> {
        if self.allows_everywhere(subject, action) {
            return Ok(true);
        }
        self.oso
            .is_allowed(subject.to_owned(), action.to_owned(), point.to_owned())
            .map_err(|e| format!("evaluating {}: {e}", self.origin))
    }

    /// Whether the policy allows `subject` to take `action` whatever the point: remembered, or
    /// asked with the point free.
    fn allows_everywhere(&self, subject: &str, action: &str) -> bool {
        let key = (subject.to_owned(), action.to_owned());
        if let Some(&answer) = self.everywhere.lock().expect("poisoned").get(&key) {
            return answer;
        }
        let answer = self.proves_for_any_point(subject, action);
        let mut everywhere = self.everywhere.lock().expect("poisoned");
        if everywhere.len() >= REMEMBERED {
            everywhere.clear();
        }
        everywhere.insert(key, answer);
        answer
    }

    /// Asks `allow(subject, action, P)` with `P` free: true only if the first answer leaves `P`
    /// free and unconstrained. An answer that constrains it comes back as an expression, which
    /// oso refuses (an error here), so it counts as no proof.
    fn proves_for_any_point(&self, subject: &str, action: &str) -> bool {
        let any_point = oso::PolarValue::Variable(ANY_POINT.to_owned());
        let Ok(mut query) = self
            .oso
            .query_rule("allow", (subject.to_owned(), action.to_owned(), any_point))
        else {
            return false;
        };
        match query.next() {
            Some(Ok(answer)) => answer.iter_bindings().all(|(name, value)| {
                name != ANY_POINT || matches!(value, polar_core::terms::Value::Variable(_))
            }),
            _ => false,
        }
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

    /// Policies whose rules for some point differ from their rules for another, written in every
    /// way Polar lets a rule look at the point: the answer remembered for a subject and action
    /// must never allow a point the policy itself denies.
    const POINT_DEPENDENT: &[&str] = &[
        r#"allow("alice", "consume", point: String) if point.starts_with("videos/");"#,
        r#"allow("alice", "consume", point) if point.starts_with("videos/");"#,
        r#"allow("alice", "consume", point) if not point.starts_with("secret/");"#,
        r#"allow("alice", "consume", point) if point != "secret/x";"#,
        r#"allow("alice", "consume", point) if not point = "secret/x";"#,
        r#"allow("alice", "consume", point) if forall(x in ["secret/x"], x != point);"#,
        r#"allow("alice", "consume", point) if not forbidden(point);
           forbidden("secret/x");"#,
        r#"allow("alice", "consume", point) if not forbidden(point);
           forbidden(p) if p.starts_with("secret/");"#,
        r#"allow("alice", "consume", point) if point = "secret/x" and cut and false;
           allow("alice", "consume", _point);"#,
        r#"allow("alice", "consume", point) if point in ["videos/a", "public/b"];"#,
        r#"allow("alice", "consume", point) if point < "secret/";"#,
        r#"allow("alice", "consume", point) if point.len() < 8;"#,
        r#"allow("alice", "consume", "videos/a");
           allow("alice", "consume", _point) if false;"#,
    ];

    const POINTS: &[&str] = &["videos/a", "public/b", "secret/x", "secret/yy", ""];

    #[test]
    fn the_answer_for_every_point_is_used_only_when_the_rules_prove_it() {
        for text in POINT_DEPENDENT {
            let policy = Polar::load(text, "test").unwrap();
            let fresh = Polar::load(text, "test").unwrap();
            assert!(
                !policy.allows_everywhere("alice", "consume"),
                "taken as allowing every point: {text}"
            );
            for point in POINTS {
                // The fresh policy is asked about this point alone, with nothing remembered.
                let expected = fresh.oso.is_allowed("alice", "consume", *point).unwrap();
                assert_eq!(
                    policy.is_allowed("alice", "consume", point).unwrap(),
                    expected,
                    "{point:?} under {text}"
                );
            }
            assert!(
                !policy.is_allowed("alice", "consume", "secret/x").unwrap(),
                "secret/x allowed under {text}"
            );
        }
    }

    #[test]
    fn rules_that_hold_for_every_point_are_asked_once_per_subject_and_action() {
        let policy = Polar::load(
            r#"allow("root", _action, _point);
               allow(subject: String, "replicate", _point) if subject.starts_with("node:");
               allow("alice", "consume", point) if point.starts_with("videos/");"#,
            "test",
        )
        .unwrap();
        assert!(policy.allows_everywhere("root", "produce"));
        assert!(policy.allows_everywhere("node:a", "replicate"));
        assert!(!policy.allows_everywhere("node:a", "produce"));
        assert!(!policy.allows_everywhere("alice", "consume"));
        assert!(!policy.allows_everywhere("nobody", "consume"));
        assert!(policy.is_allowed("alice", "consume", "videos/1").unwrap());
        assert!(!policy.is_allowed("alice", "consume", "cams/1").unwrap());
        assert!(!policy.is_allowed("nobody", "consume", "videos/1").unwrap());
        assert_eq!(policy.everywhere.lock().unwrap().len(), 5);
        // A remembered answer is used without a query: one planted against the rules wins.
        policy
            .everywhere
            .lock()
            .unwrap()
            .insert(("nobody".into(), "admin".into()), true);
        assert!(policy.is_allowed("nobody", "admin", "p").unwrap());
        assert!(!policy.is_allowed("nobody", "produce", "p").unwrap());
    }

    #[test]
    fn syntax_errors_name_the_origin() {
        let error = Polar::load("allow(", "policies/broken.polar")
            .err()
            .unwrap();
        assert!(error.contains("policies/broken.polar"), "{error}");
    }
}
