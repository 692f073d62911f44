//! A cgroup per server: every process of the server (daemonized ones included) is in
//! it, its memory, CPU and process count are limited there, and deleting the server
//! kills the whole group before its devices are freed.
//!
//! Membership and killing use the cgroup v2 hierarchy (`cgroup.procs`, `cgroup.kill`),
//! wherever it is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` beside v1
//! controllers). Limits use v2's controllers where it has them, else the v1 hierarchy
//! of that controller (`memory.limit_in_bytes`, `cpu.cfs_quota_us`, `pids.max`); what
//! neither offers is reported as not enforced.
//!
//! Groups are made below the aggregator's own cgroup, in `kcloud-{data dir hash}/{server
//! id}` (one parent per data directory: two aggregators never touch each other's). On a
//! systemd host that needs a delegated subtree (`Delegate=yes`): the aggregator then
//! moves itself to `aggregator/` of its own cgroup, so that its cgroup may enable
//! controllers for `kcloud-.../` (cgroup v2's "no internal processes" rule).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The controllers a server is limited by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Controller {
    Memory,
    Cpu,
    Pids,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Memory, Controller::Cpu, Controller::Pids];

    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
        }
    }
}

/// Where a controller is, for server cgroups.
#[derive(Clone, Debug)]
enum Place {
    V2,
    /// The `kcloud` directory in that controller's v1 hierarchy.
    V1(PathBuf),
}

/// What limits one server.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub(crate) memory_bytes: u64,
    pub(crate) cpu_millis: u64,
    pub(crate) pids: u32,
}

/// The parent of servers' cgroups, in each hierarchy used.
#[derive(Debug)]
pub(crate) struct Cgroups {
    /// `.../kcloud` in the v2 hierarchy.
    v2: PathBuf,
    controllers: Vec<(Controller, Place)>,
}

/// One server's cgroup (which may not exist, or no longer).
#[derive(Debug, Clone)]
pub(crate) struct ServerCgroup {
    v2: PathBuf,
    /// Its directories in v1 hierarchies, with the controller each serves.
    v1: Vec<(Controller, PathBuf)>,
    /// The memory controller's directory and whether it is v2's.
    memory: Option<(PathBuf, bool)>,
}

impl Cgroups {
    /// Finds the hierarchies from `/proc/self/mountinfo` and `/proc/self/cgroup`, and
    /// makes `name/` where servers' groups go (one per data directory, so that two
    /// aggregators on one host never touch each other's servers). `Err` says why that
    /// is impossible here.
    pub(crate) fn detect(name: &str) -> Result<Cgroups, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let mounts = parse_mountinfo(&mountinfo);
        let own = parse_own(&own);
        let v2_mount = mounts.iter().find(|m| m.v2).ok_or(
            "no cgroup v2 hierarchy is mounted (mount -t cgroup2 none /sys/fs/cgroup/unified)",
        )?;
        let v2_own = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.clone())
            .ok_or("/proc/self/cgroup has no cgroup v2 entry")?;
        let own_dir = v2_mount.dir_of(&v2_own);
        let available = read_words(&own_dir.join("cgroup.controllers"));
        let wanted: Vec<Controller> = Controller::ALL
            .into_iter()
            .filter(|c| available.iter().any(|a| a == c.name()))
            .collect();
        if !wanted.is_empty() && own_dir != v2_mount.point {
            // Not the root: a cgroup that enables controllers for its children may hold
            // no processes, so the aggregator moves to a leaf of its own.
            // Other processes there (a shell that started us) keep it from enabling
            // controllers; then v1 serves, below.
            let leaf = own_dir.join("aggregator");
            mkdir(&leaf).map_err(|e| format!("creating {}: {e}", leaf.display()))?;
            let _ = std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string());
        }
        let v2 = own_dir.join(name);
        mkdir(&v2).map_err(|e| {
            format!(
                "creating {} (the aggregator needs a writable cgroup v2 subtree: root, or \
                 systemd's Delegate=yes): {e}",
                v2.display()
            )
        })?;
        let enable = |dir: &Path, cs: &[Controller]| {
            if cs.is_empty() {
                return Ok(());
            }
            let words: Vec<String> = cs.iter().map(|c| format!("+{}", c.name())).collect();
            std::fs::write(dir.join("cgroup.subtree_control"), words.join(" "))
        };
        let mut in_v2 = wanted.clone();
        if enable(&own_dir, &in_v2)
            .and_then(|()| enable(&v2, &in_v2))
            .is_err()
        {
            // Not ours to enable: fall back to v1 for everything.
            in_v2.clear();
        }
        // A probe: can we make and remove a group here?
        let probe = v2.join(format!(".probe-{}", std::process::id()));
        mkdir(&probe).map_err(|e| format!("creating {}: {e}", probe.display()))?;
        let _ = std::fs::remove_dir(&probe);

        let mut controllers = Vec::new();
        for c in Controller::ALL {
            if in_v2.contains(&c) {
                controllers.push((c, Place::V2));
                continue;
            }
            let Some(m) = mounts
                .iter()
                .find(|m| m.options.iter().any(|o| o == c.name()))
            else {
                continue;
            };
            let Some((_, path)) = own
                .iter()
                .find(|(cs, _)| cs.split(',').any(|x| x == c.name()))
            else {
                continue;
            };
            let dir = m.dir_of(path).join(name);
            if mkdir(&dir).is_ok() {
                controllers.push((c, Place::V1(dir)));
            }
        }
        Ok(Cgroups { v2, controllers })
    }

    /// The limits enforced here, with the files that enforce them.
    pub(crate) fn enforced(&self) -> Vec<String> {
        self.controllers
            .iter()
            .map(|(c, place)| {
                let how = match (c, place) {
                    (Controller::Memory, Place::V2) => "cgroup v2 memory.max",
                    (Controller::Memory, Place::V1(_)) => "cgroup v1 memory.limit_in_bytes",
                    (Controller::Cpu, Place::V2) => "cgroup v2 cpu.max",
                    (Controller::Cpu, Place::V1(_)) => "cgroup v1 cpu.cfs_quota_us",
                    (Controller::Pids, Place::V2) => "cgroup v2 pids.max",
                    (Controller::Pids, Place::V1(_)) => "cgroup v1 pids.max",
                };
                format!("{} ({how})", c.name())
            })
            .collect()
    }

    /// Limits the host cannot enforce.
    pub(crate) fn missing(&self) -> Vec<&'static str> {
        Controller::ALL
            .into_iter()
            .filter(|c| !self.controllers.iter().any(|(x, _)| x == c))
            .map(Controller::name)
            .collect()
    }

    /// The group of server `id` (nothing is created).
    pub(crate) fn group(&self, id: &str) -> ServerCgroup {
        let mut v1 = Vec::new();
        let mut memory = None;
        for (c, place) in &self.controllers {
            match place {
                Place::V2 => {
                    if *c == Controller::Memory {
                        memory = Some((self.v2.join(id), true));
                    }
                }
                Place::V1(dir) => {
                    if *c == Controller::Memory {
                        memory = Some((dir.join(id), false));
                    }
                    v1.push((*c, dir.join(id)));
                }
            }
        }
        ServerCgroup {
            v2: self.v2.join(id),
            v1,
            memory,
        }
    }

    /// Creates server `id`'s group with `limits`.
    pub(crate) fn create(&self, id: &str, limits: Limits) -> io::Result<ServerCgroup> {
        let g = self.group(id);
        mkdir(&g.v2)?;
        for (_, dir) in &g.v1 {
            mkdir(dir)?;
        }
        for (c, place) in &self.controllers {
            let dir = match place {
                Place::V2 => g.v2.clone(),
                Place::V1(d) => d.join(id),
            };
            let v2 = matches!(place, Place::V2);
            match c {
                Controller::Memory if limits.memory_bytes > 0 => {
                    let bytes = limits.memory_bytes.to_string();
                    if v2 {
                        write(&dir, "memory.max", &bytes)?;
                        // No swapping past the limit either, where swap is accounted.
                        let _ = write(&dir, "memory.swap.max", "0");
                    } else {
                        write(&dir, "memory.limit_in_bytes", &bytes)?;
                        let _ = write(&dir, "memory.memsw.limit_in_bytes", &bytes);
                    }
                }
                Controller::Cpu if limits.cpu_millis > 0 => {
                    // A period of 100 ms; the quota is the share of it, per CPU.
                    let quota = limits.cpu_millis.saturating_mul(100).max(1000);
                    if v2 {
                        write(&dir, "cpu.max", &format!("{quota} 100000"))?;
                    } else {
                        write(&dir, "cpu.cfs_period_us", "100000")?;
                        write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                    }
                }
                Controller::Pids => write(&dir, "pids.max", &limits.pids.to_string())?,
                _ => {}
            }
        }
        Ok(g)
    }

    /// Ids of the server groups that exist (leftovers of servers no longer recorded
    /// are killed and removed at start).
    pub(crate) fn ids(&self) -> Vec<String> {
        std::fs::read_dir(&self.v2)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl ServerCgroup {
    /// The `cgroup.procs` files a new process writes its pid to, to join the group in
    /// every hierarchy.
    pub(crate) fn procs_files(&self) -> Vec<PathBuf> {
        std::iter::once(&self.v2)
            .chain(self.v1.iter().map(|(_, d)| d))
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The processes in the group.
    pub(crate) fn pids(&self) -> Vec<u32> {
        read_pids(&self.v2.join("cgroup.procs"))
    }

    pub(crate) fn exists(&self) -> bool {
        self.v2.is_dir()
    }

    /// Sends `signal` to every process in the group.
    pub(crate) fn signal(&self, signal: rustix::process::Signal) {
        for pid in self.pids() {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, signal);
            }
        }
    }

    /// Kills every process in the group and waits (up to 10 s) until none is left.
    /// True when the group is empty.
    pub(crate) async fn kill(&self) -> bool {
        if !self.exists() {
            return true;
        }
        let kill_file = self.v2.join("cgroup.kill");
        if kill_file.exists() {
            if let Err(e) = std::fs::write(&kill_file, "1") {
                tracing::warn!(error = %e, group = %self.v2.display(), "cgroup.kill failed");
            }
        } else {
            // Before Linux 5.14: freeze, so nothing forks while we kill, then thaw.
            let _ = std::fs::write(self.v2.join("cgroup.freeze"), "1");
            self.signal(rustix::process::Signal::KILL);
            let _ = std::fs::write(self.v2.join("cgroup.freeze"), "0");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.pids().is_empty() {
                return true;
            }
            if Instant::now() > deadline {
                tracing::error!(group = %self.v2.display(), "processes survived the kill of their cgroup");
                return false;
            }
            if !kill_file.exists() {
                self.signal(rustix::process::Signal::KILL);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// How many processes of the group the kernel killed for running out of memory.
    pub(crate) fn oom_kills(&self) -> u64 {
        let Some((dir, v2)) = &self.memory else {
            return 0;
        };
        let file = if *v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Removes the (empty) group's directories.
    pub(crate) fn remove(&self) {
        for dir in std::iter::once(&self.v2).chain(self.v1.iter().map(|(_, d)| d)) {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, dir = %dir.display(), "could not remove a server's cgroup")
                }
            }
        }
    }
}

fn mkdir(dir: &Path) -> io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn write(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value} to {}: {e}", dir.join(file).display()),
        )
    })
}

fn read_words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|t| t.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

fn read_pids(path: &Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// A cgroup hierarchy's mount.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The hierarchy's path that is mounted (the mount's root within it).
    root: String,
    point: PathBuf,
    v2: bool,
    /// v1: the controllers (super options such as `memory`, `cpu`).
    options: Vec<String>,
}

impl Mount {
    /// Where cgroup `path` (as `/proc/self/cgroup` names it) is in this mount.
    fn dir_of(&self, path: &str) -> PathBuf {
        let rel = path
            .strip_prefix(self.root.trim_end_matches('/'))
            .unwrap_or(path)
            .trim_start_matches('/');
        if rel.is_empty() {
            self.point.clone()
        } else {
            self.point.join(rel)
        }
    }
}

/// The cgroup mounts of a `/proc/self/mountinfo`.
fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            // ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let super_opts = right.next().unwrap_or("");
            let (root, point) = (left.get(3)?, left.get(4)?);
            let unescape = |s: &str| s.replace("\\040", " ");
            match fstype {
                "cgroup2" => Some(Mount {
                    root: unescape(root),
                    point: PathBuf::from(unescape(point)),
                    v2: true,
                    options: Vec::new(),
                }),
                "cgroup" => Some(Mount {
                    root: unescape(root),
                    point: PathBuf::from(unescape(point)),
                    v2: false,
                    options: super_opts.split(',').map(str::to_owned).collect(),
                }),
                _ => None,
            }
        })
        .collect()
}

/// `(controllers, path)` of each line of `/proc/self/cgroup`; v2's has no controllers.
fn parse_own(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some((controllers.to_owned(), path.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn hybrid_hierarchies_are_found() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 4);
        let v2 = mounts.iter().find(|m| m.v2).unwrap();
        assert_eq!(v2.point, PathBuf::from("/sys/fs/cgroup/unified"));
        let memory = mounts
            .iter()
            .find(|m| m.options.iter().any(|o| o == "memory"))
            .unwrap();
        assert_eq!(
            memory.dir_of("/process_api/abc"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert_eq!(v2.dir_of("/"), PathBuf::from("/sys/fs/cgroup/unified"));
        let own = parse_own("4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n");
        assert_eq!(own[1], ("cpu,cpuacct".to_owned(), "/".to_owned()));
        assert_eq!(own[2], (String::new(), "/".to_owned()));
    }

    #[test]
    fn a_mount_of_a_subtree_maps_paths_below_it() {
        // A container that sees only its own part of the hierarchy.
        let m = &parse_mountinfo(
            "50 40 0:40 /kubepods/pod1 /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw\n",
        )[0];
        assert_eq!(
            m.dir_of("/kubepods/pod1/app"),
            PathBuf::from("/sys/fs/cgroup/app")
        );
        assert_eq!(m.dir_of("/kubepods/pod1"), PathBuf::from("/sys/fs/cgroup"));
    }
}
