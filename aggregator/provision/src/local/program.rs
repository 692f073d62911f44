//! What a local server runs: the program found on this host's `PATH`, and the part
//! of the aggregator's environment it may inherit.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The aggregator's environment variables a server inherits (plus `LC_*`, `PYENV_*`,
/// `CONDA_*`, `XDG_*`); nothing else, so that no secret of the aggregator's leaks.
const PASS_ENV: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
    "CUDA_HOME",
    "CUDA_PATH",
    "VIRTUAL_ENV",
    "PYTHONPATH",
    "PYTHONUSERBASE",
    "JUPYTER_PATH",
    "JUPYTER_CONFIG_DIR",
    "JUPYTER_DATA_DIR",
];
const PASS_ENV_PREFIXES: &[&str] = &["LC_", "PYENV_", "CONDA_", "XDG_"];

pub(crate) fn passes(name: &OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    PASS_ENV.contains(&name) || PASS_ENV_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// `program` itself when it holds a `/`, else the first executable of that name on
/// `path`.
pub(crate) fn find_program(program: &str, path: Option<&OsStr>) -> Option<PathBuf> {
    if program.is_empty() {
        return None;
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        return is_executable(&p).then_some(p);
    }
    std::env::split_paths(path?)
        .map(|dir| dir.join(program))
        .find(|c| is_executable(c))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harmless_environment_is_inherited() {
        for ok in [
            "PATH",
            "HOME",
            "LC_ALL",
            "PYENV_ROOT",
            "CONDA_PREFIX",
            "LD_LIBRARY_PATH",
        ] {
            assert!(passes(OsStr::new(ok)), "{ok}");
        }
        for secret in [
            "KCLOUD_BOOTSTRAP_ADMIN_PASSWORD",
            "AWS_SECRET_ACCESS_KEY",
            "CUDA_VISIBLE_DEVICES",
            "JUPYTER_TOKEN",
            "RUST_LOG",
        ] {
            assert!(!passes(OsStr::new(secret)), "{secret}");
        }
    }

    #[test]
    fn programs_are_found_on_a_path() {
        let path = std::env::var_os("PATH");
        assert!(find_program("sh", path.as_deref()).is_some());
        assert!(find_program("/bin/sh", None).is_some());
        assert!(find_program("no-such-program-kcloud", path.as_deref()).is_none());
        assert!(find_program("", path.as_deref()).is_none());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tool"), "#!/bin/sh\n").unwrap();
        assert!(
            find_program("tool", Some(dir.path().as_os_str())).is_none(),
            "not executable"
        );
    }
}
