//! Files only the aggregator may read (the data directory, keys, shared secrets) and
//! the random tokens kept in them. Nothing here logs a secret.

use std::io::Write as _;
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::rngs::OsRng;
use rand::{RngCore as _, TryRngCore as _};

use crate::{Error, Result};

/// The shortest shared secret (agent token) accepted from a file.
pub const MIN_SECRET_CHARS: usize = 16;

/// 32 random bytes, base64url: for CSRF tokens and generated shared secrets.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    // ThreadRng: a CSPRNG seeded and reseeded from the OS.
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// `{prefix}-` and 16 random hex digits: ids of records users name in paths
/// (reservations `r-…`, queue entries `q-…`).
pub fn random_id(prefix: &str) -> String {
    format!("{prefix}-{}", random_hex())
}

/// 16 random hex digits (the id part of [`random_id`], and of personal tokens).
pub fn random_hex() -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Compares secrets without an early exit that would leak how much matched.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Fills `buf` from the OS random number generator.
pub fn os_random(buf: &mut [u8]) -> Result<()> {
    OsRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::Internal(format!("the OS random number generator failed: {e}")))
}

/// Creates `dir` (and parents) with mode 0700 where it creates them; an existing
/// directory is left as it is.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(|source| Error::Io {
        context: format!("creating directory {}", dir.display()),
        source,
    })
}

/// Writes `contents` to `path` with mode 0600 unless `path` exists, atomically: the
/// file appears complete or not at all (temp file, fsync, hard link), and of two
/// processes racing, one wins and both then read the winner's file. Returns whether
/// this call created it.
pub fn create_secret_file(path: &Path, contents: &[u8]) -> Result<bool> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_private_dir(dir)?;
    let io = |what: &str, p: &Path| {
        let context = format!("{what} {}", p.display());
        move |source| Error::Io { context, source }
    };
    let tmp = dir.join(format!(".{}.tmp", &random_token()[..16]));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let written = opts.open(&tmp).and_then(|mut f| {
        f.write_all(contents)?;
        f.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            // Make the new directory entry durable too.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("creating", path)(e)),
    }
}

/// Reads a secret file, warning when others may read it too.
pub fn read_secret_file(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        context: format!("reading {}", path.display()),
        source,
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path)
            // Group access is how a Kubernetes Secret reaches a non-root pod (0440 with
            // fsGroup); access for everyone else is the mistake worth a warning.
            && m.permissions().mode() & 0o007 != 0
        {
            tracing::warn!(
                path = %path.display(),
                "secret file is readable by others; make it 0600 (0440 with fsGroup for a mounted Secret)"
            );
        }
    }
    Ok(bytes)
}

/// A shared secret (the agents' token): from `explicit` if given, else from
/// `default_path`, generated there (a `random_token`, mode 0600) when absent.
/// Surrounding whitespace is trimmed; at least 16 printable ASCII characters.
pub fn load_or_create_secret(explicit: Option<&Path>, default_path: &Path) -> Result<String> {
    let path = match explicit {
        Some(p) => p,
        None => {
            if !default_path.exists()
                && create_secret_file(default_path, random_token().as_bytes())?
            {
                tracing::info!(path = %default_path.display(), "generated a new shared secret");
            }
            default_path
        }
    };
    let bytes = read_secret_file(path)?;
    let text = std::str::from_utf8(&bytes)
        .map(str::trim)
        .map_err(|_| Error::Config(format!("{} is not UTF-8 text", path.display())))?;
    if text.len() < MIN_SECRET_CHARS || !text.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::Config(format!(
            "{} must hold at least {MIN_SECRET_CHARS} printable ASCII characters without spaces",
            path.display()
        )));
    }
    Ok(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        let a = load_or_create_secret(None, &path).unwrap();
        assert_eq!(a.len(), 43);
        assert_eq!(load_or_create_secret(None, &path).unwrap(), a);
        let explicit = dir.path().join("given");
        std::fs::write(&explicit, "  0123456789abcdef-long-enough\n").unwrap();
        assert_eq!(
            load_or_create_secret(Some(&explicit), &path).unwrap(),
            "0123456789abcdef-long-enough"
        );
        std::fs::write(&explicit, "short\n").unwrap();
        assert!(matches!(
            load_or_create_secret(Some(&explicit), &path),
            Err(Error::Config(_))
        ));
        std::fs::write(&explicit, "has a space inside it\n").unwrap();
        assert!(matches!(
            load_or_create_secret(Some(&explicit), &path),
            Err(Error::Config(_))
        ));
        assert_ne!(random_token(), random_token());
    }
}
