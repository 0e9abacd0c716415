//! Text from outside the node (a plugin's deny reason, a peer's member name, a stored point id)
//! made safe to put in a status message or a log line: cut to a bound and with its control
//! characters escaped. A leaf: the modules that make errors and the edge that shows them both
//! use it.

/// Most bytes of text from a plugin or a peer (a deny reason, a member name) that go into a
/// status message or a log line.
pub const MAX_TEXT: usize = 256;

/// `text`, cut to at most [`MAX_TEXT`] bytes (on a character boundary) with `…` when it was cut.
pub fn bounded(text: &str) -> String {
    if text.len() <= MAX_TEXT {
        return text.to_owned();
    }
    let mut end = MAX_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `text` with its control characters (escape, newline, NUL, C1…) written as escapes (`\u{1b}`,
/// `\n`), so that what a peer, a plugin or a stored name holds cannot act on a terminal or
/// forge a log line.
pub fn escaped(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            escaped.extend(c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escaped("a\x1b[2Jb\nc\u{9b}é"), "a\\u{1b}[2Jb\\nc\\u{9b}é");
    }

    #[test]
    fn long_texts_are_bounded_on_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(300);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_TEXT + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…'));
    }
}
