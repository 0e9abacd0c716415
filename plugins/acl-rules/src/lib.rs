//! The access list of `acl-authorizer`. One rule per line, `subject, point-pattern, action`;
//! `*` and `?` are wildcards in every field; `#` starts a comment. A request is allowed when any
//! rule matches it.

use wildmatch::WildMatch;

pub const ACTIONS: [&str; 5] = ["produce", "consume", "metadata", "replicate", "admin"];

struct Rule {
    line: usize,
    subject: WildMatch,
    point: WildMatch,
    action: WildMatch,
}

pub struct Acl {
    rules: Vec<Rule>,
}

impl Acl {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut rules = Vec::new();
        for (index, raw) in text.lines().enumerate() {
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
        Ok(Self { rules })
    }

    /// The line of the first rule that allows the request, if any.
    pub fn allows(&self, subject: &str, action: &str, point: &str) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| {
                r.subject.matches(subject) && r.point.matches(point) && r.action.matches(action)
            })
            .map(|r| r.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_globs_line_by_line() {
        let acl =
            Acl::parse("# comment\nroot, *, *\nalice, videos/*, consume # trailing\n").unwrap();
        assert_eq!(acl.allows("root", "admin", "x"), Some(2));
        assert_eq!(acl.allows("alice", "consume", "videos/a/b"), Some(3));
        assert_eq!(acl.allows("alice", "produce", "videos/a"), None);
        assert_eq!(acl.allows("bob", "consume", "videos/a"), None);
    }

    #[test]
    fn errors_name_the_line() {
        assert!(Acl::parse("root, *\n").err().unwrap().starts_with("line 1"));
        assert!(
            Acl::parse("\n\nroot, *, delete\n")
                .err()
                .unwrap()
                .starts_with("line 3")
        );
    }
}
