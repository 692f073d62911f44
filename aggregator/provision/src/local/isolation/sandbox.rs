//! The sandbox a local server runs in: bubblewrap (`bwrap`, from the distribution)
//! builds its mount, PID, IPC, UTS and cgroup namespaces, then `setpriv` (util-linux)
//! becomes the owner's uid with no supplementary groups, no capabilities and
//! `no_new_privs` before running the server's program.
//!
//! Why bubblewrap rather than our own `unshare`/`pivot_root`: it is what Flatpak runs
//! every desktop app in, small and audited, and the details it gets right (a fresh
//! `/proc` for the PID namespace, a minimal `/dev`, mount propagation, a reaping init)
//! are exactly the ones a hand-written version gets wrong. It runs as root here (no user
//! namespace needed), so the uid change happens inside, through `setpriv`.
//!
//! What a server sees: a root of its own (tmpfs) with the system's programs read-only
//! (`/usr`, `/bin`, `/lib*`, `/etc`, `/opt`, the install prefix of its program, and
//! `[local] read_only_paths`), the aggregator's data directory masked where one of
//! those would include it, its home (`/home/jovyan`, the server's `work/`), its own
//! volumes and shares at their mount paths (read-only ones truly read-only), a private
//! `/tmp`, a fresh `/proc` showing only its processes, a minimal `/dev` plus exactly its
//! GPU files, and `/sys` read-only. The network is the host's (servers listen on a
//! loopback port the proxy reaches).

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

/// System directories every server sees read-only (those that exist).
const SYSTEM_PATHS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt",
];

/// Where a server's home is inside its sandbox (as in the cluster shape's images).
pub(crate) const HOME: &str = "/home/jovyan";
/// Where the server's Jupyter configuration is inside its sandbox.
pub(crate) const CONFIG_DIR: &str = "/run/kcloud/jupyter";

/// The tools and the read-only view, found once at start.
#[derive(Debug)]
pub(crate) struct Sandbox {
    sh: PathBuf,
    bwrap: PathBuf,
    setpriv: PathBuf,
    read_only: Vec<PathBuf>,
    /// Never visible in a sandbox, even where a read-only path includes it.
    hidden: Vec<PathBuf>,
}

/// What one server's sandbox holds.
#[derive(Debug)]
pub(crate) struct Jail<'a> {
    pub(crate) hostname: &'a str,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    /// The server's `work/`, its home.
    pub(crate) home: &'a Path,
    /// The Jupyter configuration directory, read-only at [`CONFIG_DIR`].
    pub(crate) config: Option<&'a Path>,
    /// `passwd` and `group` files that name the server's uid.
    pub(crate) passwd: Option<(&'a Path, &'a Path)>,
    /// `(host directory, absolute path inside, read-only)`.
    pub(crate) mounts: Vec<(PathBuf, String, bool)>,
    /// `(host file, file inside)`.
    pub(crate) devices: Vec<(PathBuf, PathBuf)>,
    /// The cgroup files the process writes its pid to before anything else runs.
    pub(crate) cgroup_procs: Vec<PathBuf>,
    /// The program (absolute) and its arguments.
    pub(crate) argv: &'a [String],
}

impl Sandbox {
    /// Finds `bwrap` and `setpriv` on `path`; `Err` says what is missing.
    pub(crate) fn detect(
        path: Option<&std::ffi::OsStr>,
        read_only: &[PathBuf],
        hidden: Vec<PathBuf>,
    ) -> Result<Sandbox, String> {
        let find = |name: &str, package: &str| {
            super::super::program::find_program(name, path)
                .ok_or_else(|| format!("`{name}` is not installed (package {package})"))
        };
        let mut ro: Vec<PathBuf> = SYSTEM_PATHS
            .iter()
            .map(PathBuf::from)
            .filter(|p| p.exists())
            .collect();
        ro.extend(read_only.iter().cloned());
        Ok(Sandbox {
            sh: find("sh", "dash")?,
            bwrap: find("bwrap", "bubblewrap")?,
            setpriv: find("setpriv", "util-linux")?,
            read_only: ro,
            hidden,
        })
    }

    /// The host directory a program is installed in, to show it read-only: none for
    /// the system's own paths, else the folder above its `bin/` (a virtualenv, conda
    /// or pyenv root), or its own folder when that would be a top-level directory.
    pub(crate) fn install_prefix(&self, program: &Path) -> Option<PathBuf> {
        if self.read_only.iter().any(|p| program.starts_with(p)) {
            return None;
        }
        let dir = program.parent()?;
        let prefix = match dir.file_name() {
            Some(n) if n == "bin" || n == "shims" => dir.parent().unwrap_or(dir),
            _ => dir,
        };
        let depth = prefix
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .count();
        Some(if depth >= 2 { prefix } else { dir }.to_owned())
    }

    /// The command line that runs `jail.argv` in its sandbox: a shell joins the
    /// server's cgroup and becomes `bwrap`, which runs `setpriv`, which runs the
    /// program as the owner.
    pub(crate) fn command(&self, jail: &Jail<'_>) -> Vec<OsString> {
        let mut a = Args::default();
        // The shell is the process that becomes bwrap: its pid joins the cgroup first,
        // so every process of the server is in it from the start.
        a.push(&[
            &self.sh,
            &"-c",
            &"while [ \"$1\" != -- ]; do echo $$ > \"$1\" || exit 125; shift; done; shift; exec \"$@\"",
            &"kcloud-sandbox",
        ]);
        for f in &jail.cgroup_procs {
            a.push(&[f]);
        }
        a.push(&[&"--", &self.bwrap]);
        a.push(&[
            &"--unshare-pid",
            &"--unshare-ipc",
            &"--unshare-uts",
            &"--unshare-cgroup-try",
            &"--hostname",
            &jail.hostname,
            // No controlling terminal to push input into (TIOCSTI).
            &"--new-session",
        ]);
        a.mount("--proc", None, Path::new("/proc"));
        a.mount("--dev", None, Path::new("/dev"));
        a.mount("--ro-bind", Some(Path::new("/sys")), Path::new("/sys"));
        a.push(&[&"--perms", &"01777"]);
        a.mount("--tmpfs", None, Path::new("/tmp"));
        a.push(&[&"--perms", &"0755"]);
        a.mount("--tmpfs", None, Path::new("/run"));
        let mut exposed: Vec<&Path> = self.read_only.iter().map(PathBuf::as_path).collect();
        let prefix = jail
            .argv
            .first()
            .and_then(|p| self.install_prefix(Path::new(p)));
        if let Some(p) = &prefix {
            exposed.push(p);
        }
        for p in &exposed {
            a.mount("--ro-bind-try", Some(p), p);
        }
        for h in &self.hidden {
            if exposed.iter().any(|p| h.starts_with(p)) {
                a.push(&[&"--tmpfs", h]);
            }
        }
        if let Some((passwd, group)) = jail.passwd {
            a.mount("--ro-bind", Some(passwd), Path::new("/etc/passwd"));
            a.mount("--ro-bind", Some(group), Path::new("/etc/group"));
        }
        a.mount("--bind", Some(jail.home), Path::new(HOME));
        for (host, inside, read_only) in &jail.mounts {
            let how = if *read_only { "--ro-bind" } else { "--bind" };
            a.mount(how, Some(host), Path::new(inside));
        }
        if let Some(c) = jail.config {
            a.mount("--ro-bind", Some(c), Path::new(CONFIG_DIR));
        }
        for (host, inside) in &jail.devices {
            a.mount("--dev-bind", Some(host), inside);
        }
        let (uid, gid) = (jail.uid.to_string(), jail.gid.to_string());
        a.push(&[&"--chdir", &HOME, &"--", &self.setpriv]);
        a.push(&[
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            &"--clear-groups",
            &"--no-new-privs",
            &"--inh-caps=-all",
            &"--bounding-set=-all",
            &"--",
        ]);
        for arg in jail.argv {
            a.push(&[arg]);
        }
        a.0
    }
}

/// bwrap's arguments, and the paths mounted or made so far: a mount point's missing
/// parents are made first with mode 0755 (bwrap would make them 0700, which the
/// server's uid could not pass through), unless a bind of a host directory (whose
/// folders exist) already provides them.
#[derive(Default)]
struct Args(Vec<OsString>, Vec<(PathBuf, bool)>);

impl Args {
    fn push(&mut self, items: &[&dyn AsRef<std::ffi::OsStr>]) {
        self.0.extend(items.iter().map(|i| i.as_ref().to_owned()));
    }

    fn mount(&mut self, how: &str, source: Option<&Path>, target: &Path) {
        let parents: Vec<PathBuf> = target
            .ancestors()
            .skip(1)
            .filter(|p| *p != Path::new("/"))
            .map(Path::to_owned)
            .collect();
        for dir in parents.into_iter().rev() {
            let provided = self
                .1
                .iter()
                .any(|(m, subtree)| *m == dir || (*subtree && dir.starts_with(m)));
            if !provided {
                self.push(&[&"--perms", &"0755", &"--dir", &dir]);
                self.1.push((dir, false));
            }
        }
        self.push(&[&how]);
        if let Some(s) = source {
            self.push(&[&s]);
        }
        self.push(&[&target]);
        // A bind of a host directory brings its folders; a tmpfs, /dev or /proc none.
        let subtree = how.contains("bind") && source.is_some_and(Path::is_dir);
        self.1.push((target.to_owned(), subtree));
    }
}

/// `passwd` and `group` for the sandbox: the host's, plus the owner as `uid`/`gid`
/// when the host has no such entry (programs that look their user up then find one).
pub(crate) fn account_files(owner: &str, uid: u32, gid: u32) -> (String, String) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    let has = |text: &str, id: u32| {
        text.lines()
            .any(|l| l.split(':').nth(2).and_then(|v| v.parse::<u32>().ok()) == Some(id))
    };
    let mut passwd = passwd;
    if !has(&passwd, uid) {
        if !passwd.is_empty() && !passwd.ends_with('\n') {
            passwd.push('\n');
        }
        passwd.push_str(&format!(
            "{owner}:x:{uid}:{gid}:kcloud user {owner}:{HOME}:/bin/sh\n"
        ));
    }
    let mut group = group;
    if !has(&group, gid) {
        if !group.is_empty() && !group.ends_with('\n') {
            group.push('\n');
        }
        group.push_str(&format!("{owner}:x:{gid}:\n"));
    }
    (passwd, group)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(read_only: &[&str], hidden: &[&str]) -> Sandbox {
        Sandbox {
            sh: "/bin/sh".into(),
            bwrap: "/usr/bin/bwrap".into(),
            setpriv: "/usr/bin/setpriv".into(),
            read_only: read_only.iter().map(PathBuf::from).collect(),
            hidden: hidden.iter().map(PathBuf::from).collect(),
        }
    }

    #[test]
    fn install_prefixes() {
        let s = sandbox(&["/usr", "/opt"], &[]);
        assert_eq!(s.install_prefix(Path::new("/usr/bin/python3")), None);
        assert_eq!(
            s.install_prefix(Path::new("/opt/conda/bin/jupyter-lab")),
            None
        );
        assert_eq!(
            s.install_prefix(Path::new("/root/.pyenv/shims/jupyter-lab")),
            Some(PathBuf::from("/root/.pyenv"))
        );
        assert_eq!(
            s.install_prefix(Path::new("/work/lab/.venv/bin/jupyter-lab")),
            Some(PathBuf::from("/work/lab/.venv"))
        );
        // Never a whole top-level directory such as /root or /home.
        assert_eq!(
            s.install_prefix(Path::new("/root/bin/tool")),
            Some(PathBuf::from("/root/bin"))
        );
        assert_eq!(
            s.install_prefix(Path::new("/srv/tool")),
            Some(PathBuf::from("/srv"))
        );
    }

    #[test]
    fn the_command_line() {
        let s = sandbox(&["/usr", "/etc"], &["/work/lab/data", "/elsewhere"]);
        let argv = vec![
            "/work/lab/.venv/bin/jupyter-lab".to_owned(),
            "--port=1".to_owned(),
        ];
        let jail = Jail {
            hostname: "lab",
            uid: 200001,
            gid: 200001,
            home: Path::new("/data/servers/alice/lab/work"),
            config: Some(Path::new("/data/servers/alice/lab/config")),
            passwd: None,
            mounts: vec![
                (
                    "/data/volumes/alice/v".into(),
                    "/home/jovyan/work".into(),
                    false,
                ),
                ("/srv/datasets".into(), "/home/jovyan/datasets".into(), true),
            ],
            devices: vec![("/dev/nvidia0".into(), "/dev/nvidia0".into())],
            cgroup_procs: vec!["/cg/kcloud/id/cgroup.procs".into()],
            argv: &argv,
        };
        let cmd: Vec<String> = s
            .command(&jail)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let line = cmd.join(" ");
        let has = |w: &str| assert!(line.contains(w), "{w:?} in {line}");
        assert_eq!(cmd[0], "/bin/sh");
        has("kcloud-sandbox /cg/kcloud/id/cgroup.procs -- /usr/bin/bwrap --unshare-pid");
        has("--ro-bind-try /usr /usr");
        has("--ro-bind-try /work/lab/.venv /work/lab/.venv");
        // The data dir is below no exposed path here, so nothing to mask.
        assert!(!line.contains("--tmpfs /work/lab/data"), "{line}");
        has("--bind /data/servers/alice/lab/work /home/jovyan");
        has("--bind /data/volumes/alice/v /home/jovyan/work");
        has("--ro-bind /srv/datasets /home/jovyan/datasets");
        has("--ro-bind /data/servers/alice/lab/config /run/kcloud/jupyter");
        has("--dev-bind /dev/nvidia0 /dev/nvidia0");
        has(
            "--chdir /home/jovyan -- /usr/bin/setpriv --reuid=200001 --regid=200001 --clear-groups --no-new-privs",
        );
        assert!(
            line.ends_with("-- /work/lab/.venv/bin/jupyter-lab --port=1"),
            "{line}"
        );
        assert!(
            !line.contains("--die-with-parent"),
            "servers outlive the aggregator"
        );

        // A data dir inside an exposed path is masked.
        let s = sandbox(&["/usr", "/work/lab"], &["/work/lab/data"]);
        let line: Vec<String> = s
            .command(&jail)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert!(line.join(" ").contains("--tmpfs /work/lab/data"));
    }

    #[test]
    fn account_files_name_the_uid() {
        let (passwd, group) = account_files("alice", 200007, 200007);
        assert!(passwd.contains("alice:x:200007:200007:kcloud user alice:/home/jovyan:/bin/sh\n"));
        assert!(group.ends_with("alice:x:200007:\n"));
        assert!(passwd.starts_with("root:"), "the host's entries stay");
    }
}
