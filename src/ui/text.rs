//! Text from a VPS or a guest (a PRETTY_NAME, unit names, journal lines,
//! a command's output quoted in an error) is data: on a terminal its
//! control characters could move the cursor, rewrite the screen, set the
//! title or write the clipboard (OSC 52). What reaches stderr and stdout
//! for a person shows them escaped, as OpenSSH and systemd do; the `--json`
//! stream keeps the true bytes, JSON-escaped.

use std::borrow::Cow;

/// S with every control character but newline and tab shown escaped: C0
/// and DEL as `\xNN`, C1 (a lone 0x9b is a CSI on some terminals) and the
/// bidirectional overrides that reorder what is shown as `\u{NNNN}`.
pub fn shown(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if !needs_escape(c) {
            out.push(c);
        } else if (c as u32) < 0x80 {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push_str(&format!("\\u{{{:04x}}}", c as u32));
        }
    }
    Cow::Owned(out)
}

fn needs_escape(c: char) -> bool {
    match c {
        '\n' | '\t' => false,
        c if (c as u32) < 0x20 || c as u32 == 0x7f => true,
        c => {
            (0x80..0xa0).contains(&(c as u32))
                || ('\u{202a}'..='\u{202e}').contains(&c)
                || ('\u{2066}'..='\u{2069}').contains(&c)
        }
    }
}
