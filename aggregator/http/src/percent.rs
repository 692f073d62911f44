//! Percent-encoding of URL parts and header parameters (RFC 3986 §2.1), one
//! implementation for the proxy's redirects, the file browser's `filename*` and the
//! sign-on's error redirect.

/// Percent-encodes everything but unreserved characters (`A-Z a-z 0-9 - . _ ~`) and
/// the bytes in `keep` (e.g. `/` in a path).
pub(crate) fn encode(s: &str, keep: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` (and `+` as a space); a malformed escape stays as it is.
pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (c, _) => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_kept_bytes() {
        assert_eq!(encode("a b/ü.txt", b""), "a%20b%2F%C3%BC.txt");
        assert_eq!(encode("/user/a b/", b"/"), "/user/a%20b/");
        assert_eq!(decode("a%20b%2F%C3%BC.txt"), "a b/ü.txt");
        assert_eq!(decode("a+b%zz"), "a b%zz");
    }
}
