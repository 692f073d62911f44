//! JSON Schemas of the values whose rules are more than a type (names, quantities,
//! sizes, durations, file paths, free text), for the OpenAPI document: the parsers'
//! limits written as patterns and bounds, so that a client generated from the document
//! refuses what the server would refuse. Tests hold each pattern to its parser. And
//! the one shape rule serde's derive does not keep: nested request objects are
//! objects ([`object`]).

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};

use crate::validate::DNS_LABEL_PATTERN;

/// Binary and decimal suffixes of quantities, with their factors.
const SUFFIXES: [(&str, u64); 8] = [
    ("k", 1_000),
    ("M", 1_000_000),
    ("G", 1_000_000_000),
    ("T", 1_000_000_000_000),
    ("Ki", 1 << 10),
    ("Mi", 1 << 20),
    ("Gi", 1 << 30),
    ("Ti", 1 << 40),
];

use crate::quantity::{MEMORY_MAX, MEMORY_MIN};

/// A DNS-1123 label (user, group, server and volume names).
pub fn dns_label() -> Value {
    json!({"type": "string", "minLength": 1, "maxLength": 63, "pattern": DNS_LABEL_PATTERN})
}

/// Free text of `min..=max` characters without control characters (descriptions,
/// notes, token names, entitlement entries).
pub fn text(min: usize, max: usize) -> Value {
    json!({"type": "string", "minLength": min, "maxLength": max,
        "pattern": "^[^\\x00-\\x1f\\x7f-\\x9f]*$"})
}

/// A duration of 1 second to `max_secs` in one unit: `90s`, `15m`, `1h`, `7d`.
pub fn duration(max_secs: u64) -> Value {
    let alts: Vec<String> = [("s", 1), ("m", 60), ("h", 3600), ("d", 86_400)]
        .iter()
        .filter(|(_, f)| max_secs >= *f)
        .map(|(unit, f)| format!("{}{unit}", int_range(1, max_secs / f)))
        .collect();
    json!({"type": "string", "pattern": format!("^(?:{})$", alts.join("|"))})
}

/// Like [`text`], with line breaks allowed (descriptions).
pub fn lines(max: usize) -> Value {
    json!({"type": "string", "maxLength": max,
        "pattern": "^[^\\x00-\\x09\\x0b-\\x1f\\x7f-\\x9f]*$"})
}

/// A path inside a volume or share, as `RelPath::parse` reads it: `/`-separated names
/// (not `.` or `..`, no backslash, no control character), one trailing `/` allowed;
/// empty for the root. (Lengths are in bytes there: 255 per name, 4096 in all.)
pub fn file_path() -> Value {
    let c = r"[^/\\\x00-\x1f\x7f-\x9f]";
    let d = r"[^/\\\x00-\x1f\x7f-\x9f.]";
    let name = format!(r"(?:{d}{c}*|\.{d}{c}*|\.\.{c}+)");
    json!({"type": "string", "pattern": format!("^(?:{name}(?:/{name})*/?)?$")})
}

/// CPU: a number of CPUs (0.01 to 100000, in steps of 0.001), or a string of whole
/// CPUs (`"2"`) or millicores (`"500m"`). The server also reads decimal strings
/// (`"0.5"`); the document names the two forms clients need.
pub fn cpu() -> Value {
    let pattern = format!(
        "^(?:{}|{}m)$",
        int_range(1, 100_000),
        int_range(10, 100_000_000)
    );
    json!({"oneOf": [
        {"type": "number", "minimum": 0.01, "maximum": 100_000, "multipleOf": 0.001},
        {"type": "string", "pattern": pattern},
    ], "description": "CPUs (2, 0.5) or a quantity (\"2\", \"500m\"); 10m to 100000"})
}

/// Memory: bytes (64 MiB to 1 PiB), or a whole number with a suffix in that range.
pub fn memory() -> Value {
    json!({"oneOf": [
        {"type": "number", "minimum": MEMORY_MIN, "maximum": MEMORY_MAX},
        {"type": "string", "pattern": quantity_pattern(MEMORY_MIN, MEMORY_MAX)},
    ], "description": "bytes, or a quantity (\"512Mi\", \"8Gi\", \"1G\"); 64Mi to 1Pi"})
}

/// A volume size: 1 byte to `max`, as bytes or a whole number with a suffix.
pub fn size(max: u64) -> Value {
    json!({"oneOf": [
        {"type": "integer", "minimum": 1, "maximum": max},
        {"type": "string", "pattern": quantity_pattern(1, max)},
    ], "description": format!("bytes, or a quantity (\"10Gi\", \"500M\"); at most {max} bytes")})
}

/// For `#[serde(deserialize_with)]` on a request's nested object: only a JSON object
/// (serde's derive also takes an array of the fields in order, `[null, 2]`, which
/// the API document does not admit and no client means).
pub fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<T, D::Error> {
    let v = Value::deserialize(d)?;
    if !v.is_object() {
        return Err(D::Error::custom("expected an object"));
    }
    serde_json::from_value(v).map_err(D::Error::custom)
}

/// [`object`] or `null`.
pub fn optional_object<'de, D: Deserializer<'de>, T: DeserializeOwned>(
    d: D,
) -> Result<Option<T>, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(None),
        v if v.is_object() => serde_json::from_value(v)
            .map(Some)
            .map_err(D::Error::custom),
        _ => Err(D::Error::custom("expected an object or null")),
    }
}

/// Whole numbers, bare or with a suffix, whose value lies in `[lo, hi]`.
fn quantity_pattern(lo: u64, hi: u64) -> String {
    let mut alts = vec![int_range(lo, hi)];
    for (suffix, f) in SUFFIXES {
        let (a, b) = (lo.div_ceil(f), hi / f);
        if a <= b {
            alts.push(format!("{}{suffix}", int_range(a.max(1), b)));
        }
    }
    format!("^(?:{})$", alts.join("|"))
}

/// A regular expression (no anchors) for the decimal numbers `lo..=hi`, without
/// leading zeros.
pub fn int_range(lo: u64, hi: u64) -> String {
    let mut alts = Vec::new();
    let (lo_len, hi_len) = (digits(lo), digits(hi));
    for len in lo_len..=hi_len {
        let first = if len == 1 { 0 } else { 10u64.pow(len - 1) };
        let last = 10u64.saturating_pow(len).saturating_sub(1);
        let (a, b) = (lo.max(first), hi.min(last));
        if a <= b {
            alts.push(same_length(&a.to_string(), &b.to_string()));
        }
    }
    format!("(?:{})", alts.join("|"))
}

fn digits(n: u64) -> u32 {
    n.checked_ilog10().unwrap_or(0) + 1
}

/// `lo..=hi`, both of the same number of digits.
fn same_length(lo: &str, hi: &str) -> String {
    let n = lo.len();
    if lo == hi {
        return lo.to_owned();
    }
    let (l, h) = (lo.as_bytes()[0], hi.as_bytes()[0]);
    let rest = n - 1;
    let any = |k: usize| {
        if k == 0 {
            String::new()
        } else {
            format!("[0-9]{{{k}}}")
        }
    };
    if lo[1..].bytes().all(|c| c == b'0') && hi[1..].bytes().all(|c| c == b'9') {
        return format!("[{}-{}]{}", l as char, h as char, any(rest));
    }
    if l == h {
        return format!("{}{}", l as char, same_length(&lo[1..], &hi[1..]));
    }
    let mut alts = vec![format!(
        "{}{}",
        l as char,
        same_length(&lo[1..], &"9".repeat(rest))
    )];
    if l + 1 < h {
        alts.push(format!(
            "[{}-{}]{}",
            (l + 1) as char,
            (h - 1) as char,
            any(rest)
        ));
    }
    alts.push(format!(
        "{}{}",
        h as char,
        same_length(&"0".repeat(rest), &hi[1..])
    ));
    format!("(?:{})", alts.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantity::{Quantity, cpu_millis, memory_bytes};
    use crate::volume::{Size, parse_size};
    use proptest::prelude::*;
    use regex::Regex;

    fn pattern(schema: &Value) -> Regex {
        Regex::new(schema["oneOf"][1]["pattern"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn ranges_are_exact_at_their_edges() {
        for (lo, hi) in [
            (0, 9),
            (1, 100_000),
            (10, 100_000_000),
            (67_109, 1_125_899_906_842),
        ] {
            let re = Regex::new(&format!("^{}$", int_range(lo, hi))).unwrap();
            for n in [
                lo.saturating_sub(1),
                lo,
                lo + 1,
                hi - 1,
                hi,
                hi + 1,
                (lo + hi) / 2,
            ] {
                assert_eq!(
                    re.is_match(&n.to_string()),
                    (lo..=hi).contains(&n),
                    "{lo}..={hi}: {n}"
                );
            }
            assert!(!re.is_match(&format!("0{hi}")), "no leading zero");
        }
    }

    proptest! {
        #[test]
        fn int_ranges_match_exactly_their_numbers(a in 0u64..2_000_000, b in 0u64..2_000_000, n in 0u64..3_000_000) {
            let (lo, hi) = (a.min(b), a.max(b));
            let re = Regex::new(&format!("^{}$", int_range(lo, hi))).unwrap();
            prop_assert_eq!(re.is_match(&n.to_string()), (lo..=hi).contains(&n));
        }

        // What the pattern admits, the parser accepts; the forms the pattern names,
        // outside it, the parser refuses.
        #[test]
        fn cpu_pattern_is_the_parser(n in 0u64..200_000_000, m in any::<bool>()) {
            let text = if m { format!("{n}m") } else { format!("{}", n / 1000) };
            let ok = cpu_millis(&Quantity::Text(text.clone())).is_ok();
            prop_assert_eq!(pattern(&cpu()).is_match(&text), ok, "{}", text);
        }

        #[test]
        fn memory_pattern_is_the_parser(n in 0u64..(1 << 52), s in 0usize..9) {
            let suffix = SUFFIXES.get(s).map(|(x, _)| *x).unwrap_or("");
            let text = format!("{}{suffix}", n >> (s * 5));
            let ok = memory_bytes(&Quantity::Text(text.clone())).is_ok();
            prop_assert_eq!(pattern(&memory()).is_match(&text), ok, "{}", text);
        }

        #[test]
        fn size_pattern_is_the_parser_and_the_limit(n in 0u64..(1 << 44), s in 0usize..9) {
            let max = 1u64 << 40;
            let suffix = SUFFIXES.get(s).map(|(x, _)| *x).unwrap_or("");
            let text = format!("{}{suffix}", n >> (s * 4));
            let ok = parse_size(&Size::Text(text.clone())).is_ok_and(|b| (1..=max).contains(&b));
            prop_assert_eq!(pattern(&size(max)).is_match(&text), ok, "{}", text);
        }
    }

    proptest! {
        #[test]
        fn duration_pattern_is_the_parser_and_the_limit(n in 0u64..700_000, u in 0usize..4) {
            let max = 7 * 86_400;
            let text = format!("{n}{}", ["s", "m", "h", "d"][u]);
            let ok = crate::time::parse_duration(&text)
                .is_ok_and(|d| (1..=max).contains(&d.as_secs()) && d.subsec_nanos() == 0);
            let re = Regex::new(duration(max)["pattern"].as_str().unwrap()).unwrap();
            prop_assert_eq!(re.is_match(&text), ok, "{}", text);
        }
    }

    #[test]
    fn cpu_numbers_in_steps_of_a_thousandth_are_accepted() {
        for n in [0.01, 0.013, 0.1, 0.3, 1.1, 2.675, 99_999.999, 100_000.0] {
            assert!(cpu_millis(&Quantity::Number(n)).is_ok(), "{n}");
        }
        for n in [0.0, 0.009, 0.0105, 100_000.001] {
            assert!(cpu_millis(&Quantity::Number(n)).is_err(), "{n}");
        }
    }
}
