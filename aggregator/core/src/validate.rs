//! Names that end up in URLs, paths, Kubernetes labels and pod names, and the image
//! allow-list's patterns.

use crate::{Error, Result};

/// [`is_dns_label`] as a regular expression, for the OpenAPI document (a test checks
/// that the two agree).
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$";

/// Whether `name` is a DNS-1123 label: 1–63 of `a-z`, `0-9`, `-`, starting and ending
/// with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    let b = name.as_bytes();
    let ok_char = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-';
    let edge = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (1..=63).contains(&b.len()) && b.iter().all(ok_char) && edge(b[0]) && edge(b[b.len() - 1])
}

/// Checks a user name: a DNS-1123 label, because names end up in URLs, Kubernetes
/// labels and pod names.
pub fn validate_user_name(name: &str) -> Result<()> {
    if is_dns_label(name) {
        Ok(())
    } else {
        // The input is not echoed: people type passwords into name fields.
        Err(Error::BadRequest(
            "user name must be 1-63 characters of a-z, 0-9 and '-', starting and ending \
             with a letter or digit"
                .into(),
        ))
    }
}

/// Checks a server name: a DNS-1123 label (it ends up in URLs, paths and pod names).
pub fn validate_server_name(name: &str) -> Result<()> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "server name must be a DNS-1123 label: 1-63 characters of a-z, 0-9 and '-', \
             starting and ending with a letter or digit"
                .into(),
        ))
    }
}

/// A volume name: a DNS-1123 label, since it names a directory and a PVC.
pub fn validate_volume_name(name: &str) -> Result<()> {
    if is_dns_label(name) {
        Ok(())
    } else {
        Err(Error::BadRequest(
            "volume name must be a DNS-1123 label: 1-63 characters of a-z, 0-9 and '-', \
             starting and ending with a letter or digit"
                .into(),
        ))
    }
}

/// Glob match with `*` (any run of characters, `/` included), for image allow-lists.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // The pattern the API documents and the check the server runs agree: on
        // strings made to match it, and on strings of the characters near it.
        #[test]
        fn the_documented_pattern_is_the_check(
            made in proptest::string::string_regex(
                DNS_LABEL_PATTERN.trim_start_matches('^').trim_end_matches('$'),
            ).unwrap(),
            near in "[a-z0-9A-Z_.-]{0,66}",
        ) {
            let re = regex::Regex::new(DNS_LABEL_PATTERN).unwrap();
            prop_assert!(is_dns_label(&made), "{made:?}");
            prop_assert_eq!(re.is_match(&near), is_dns_label(&near), "{:?}", near);
        }
    }

    #[test]
    fn user_names() {
        for ok in ["a", "admin", "a-b", "x9", "0", &"a".repeat(63)] {
            assert!(validate_user_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "é",
            "../x",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_user_name(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn server_names_are_dns_labels() {
        for ok in ["a", "lab", "my-lab-2", "0", &"a".repeat(63)] {
            assert!(validate_server_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "Lab",
            "a_b",
            "a.b",
            "a/b",
            "..",
            "é",
            &"a".repeat(64),
        ] {
            assert!(
                matches!(validate_server_name(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match(
            "quay.io/jupyter/*",
            "quay.io/jupyter/scipy-notebook:2025"
        ));
        assert!(glob_match("*", "anything/at:all"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(glob_match("exact:1", "exact:1"));
        assert!(!glob_match("exact:1", "exact:10"));
        assert!(!glob_match(
            "quay.io/jupyter/*",
            "docker.io/quay.io/jupyter/x"
        ));
        assert!(!glob_match("a*b", "aXXbY"));
        assert!(glob_match("a**", "a"));
        assert!(!glob_match("", "a"));
    }
}
