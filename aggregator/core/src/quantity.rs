//! CPU and memory amounts as users write them: numbers or Kubernetes-style quantities.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Error, Result};

/// A CPU or memory amount: a number (CPUs; bytes) or a Kubernetes-style quantity
/// string (`"500m"`, `"2"`; `"8Gi"`, `"512Mi"`, `"1G"`).
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(untagged)]
pub enum Quantity {
    Number(f64),
    Text(String),
}

/// CPU in millicores: a number of CPUs, `"2"`, `"0.5"` or `"500m"`; 10m to 100000 CPUs.
pub fn cpu_millis(q: &Quantity) -> Result<u64> {
    let err = || {
        Error::BadRequest(
            "cpu: a number of CPUs (e.g. 2, 0.5) or millicores (\"500m\"), 10m to 100000".into(),
        )
    };
    let millis = match q {
        Quantity::Number(n) => *n * 1000.0,
        Quantity::Text(s) => match s.strip_suffix('m') {
            Some(m) => m.parse::<u64>().map_err(|_| err())? as f64,
            None => s.parse::<f64>().map_err(|_| err())? * 1000.0,
        },
    };
    // Whole millicores, but as decimals write them: 1.1 CPUs is 1100.0000000000002
    // in binary floating point, and still 1100m.
    let whole = millis.round();
    if !millis.is_finite()
        || !(10.0..=100_000_000.0).contains(&whole)
        || (millis - whole).abs() > 1e-6
    {
        return Err(err());
    }
    Ok(whole as u64)
}

/// The memory a server may ask for: 64 MiB to 1 PiB.
pub const MEMORY_MIN: u64 = 64 << 20;
pub const MEMORY_MAX: u64 = 1 << 50;

/// Memory in bytes: a number of bytes or a quantity with a suffix (`Ki`, `Mi`, `Gi`,
/// `Ti` binary; `k`, `M`, `G`, `T` decimal); 64 MiB to 1 PiB.
pub fn memory_bytes(q: &Quantity) -> Result<u64> {
    let err = || {
        Error::BadRequest(
            "memory: bytes, or a quantity such as \"512Mi\", \"8Gi\", \"1G\"; 64Mi to 1Pi".into(),
        )
    };
    let bytes = match q {
        Quantity::Number(n) => *n,
        Quantity::Text(s) => {
            let split = s
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(s.len());
            let (num, suffix) = s.split_at(split);
            let factor: f64 = match suffix {
                "" => 1.0,
                "k" => 1e3,
                "M" => 1e6,
                "G" => 1e9,
                "T" => 1e12,
                "Ki" => 1024.0,
                "Mi" => 1024.0 * 1024.0,
                "Gi" => 1024.0 * 1024.0 * 1024.0,
                "Ti" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
                _ => return Err(err()),
            };
            num.parse::<f64>().map_err(|_| err())? * factor
        }
    };
    if !bytes.is_finite() || !(MEMORY_MIN as f64..=MEMORY_MAX as f64).contains(&bytes) {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        let n = |v: f64| Quantity::Number(v);
        let t = |v: &str| Quantity::Text(v.into());
        assert_eq!(cpu_millis(&n(2.0)).unwrap(), 2000);
        assert_eq!(cpu_millis(&n(0.5)).unwrap(), 500);
        assert_eq!(cpu_millis(&t("250m")).unwrap(), 250);
        assert_eq!(cpu_millis(&t("1.5")).unwrap(), 1500);
        for bad in [
            n(0.0),
            n(-1.0),
            n(f64::NAN),
            n(1e12),
            t("1x"),
            t("m"),
            t(""),
            t("0.0001"),
        ] {
            assert!(cpu_millis(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(memory_bytes(&t("8Gi")).unwrap(), 8 << 30);
        assert_eq!(memory_bytes(&t("512Mi")).unwrap(), 512 << 20);
        assert_eq!(memory_bytes(&t("1G")).unwrap(), 1_000_000_000);
        assert_eq!(memory_bytes(&t("1.5Gi")).unwrap(), 3 << 29);
        assert_eq!(memory_bytes(&n(1073741824.0)).unwrap(), 1 << 30);
        for bad in [
            t("1Mi"),
            t("8GB"),
            t("Gi"),
            t("-1Gi"),
            t("2Pi"),
            n(1.0),
            n(f64::INFINITY),
        ] {
            assert!(memory_bytes(&bad).is_err(), "{bad:?}");
        }
    }
}
