//! The file browser's operations, confined to one root directory.
//!
//! Every path is opened relative to a `cap_std::fs::Dir` handle on the root (openat2
//! with `RESOLVE_BENEATH` where the kernel has it, else cap-std's own component-wise
//! resolution): `..`, absolute paths and symlinks that lead outside the root fail in
//! the kernel, not in a string check. [`RelPath`] additionally refuses `..`, `.`,
//! empty components, NUL and overlong names up front, so that the errors are clear.
//! Writes and removals act on a name inside an opened parent directory.
//!
//! What the browser creates belongs to whoever owns the root (a sandboxed server's
//! volume belongs to its owner's uid), given by file descriptor, so that the files
//! stay the user's to change from their servers.

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use cap_std::fs::{Dir, OpenOptions};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use kcloud_core::{Error, Result};

/// Longest path accepted, in bytes.
pub const MAX_PATH: usize = 4096;
/// Longest name of one component, in bytes (Linux's NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Entries per listing page by default, and at most.
pub const DEFAULT_LIMIT: usize = 500;
pub const MAX_LIMIT: usize = 5000;
/// Prefix of upload temporaries (hidden, so listings skip them by default).
const UPLOAD_PREFIX: &str = ".kcloud-upload-";
/// An upload temporary untouched this long is a leftover.
const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(3600);
/// Directory depth the usage walk descends to.
const MAX_WALK_DEPTH: usize = 256;

/// A path inside a root: `""` is the root, else `/`-separated plain names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelPath(String);

impl RelPath {
    /// Accepts one trailing `/`; refuses leading `/`, empty, `.` and `..` components,
    /// NUL, backslashes, control characters, names over 255 bytes and paths over 4096.
    pub fn parse(raw: &str) -> Result<RelPath> {
        let bad = |why: &str| Error::BadRequest(format!("path: {why}"));
        if raw.len() > MAX_PATH {
            return Err(bad("too long"));
        }
        if raw.contains('\0') {
            return Err(bad("NUL characters are not allowed"));
        }
        // Backslashes are separators to Windows clients and control characters break
        // terminals and downloads: names with them are refused, not created.
        if raw.contains('\\') || raw.chars().any(char::is_control) {
            return Err(bad("backslashes and control characters are not allowed"));
        }
        if raw.starts_with('/') {
            return Err(bad("must be relative to the volume's root"));
        }
        let p = raw.strip_suffix('/').unwrap_or(raw);
        if p.is_empty() {
            return Ok(RelPath(String::new()));
        }
        for c in p.split('/') {
            match c {
                "" => return Err(bad("empty names (`//`) are not allowed")),
                "." | ".." => return Err(bad("`.` and `..` are not allowed")),
                c if c.len() > MAX_NAME => return Err(bad("a name is over 255 bytes")),
                _ => {}
            }
        }
        Ok(RelPath(p.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent (`""` for top-level names) and the last name; `None` for the root.
    fn split(&self) -> Option<(&str, &str)> {
        if self.is_root() {
            return None;
        }
        Some(self.0.rsplit_once('/').unwrap_or(("", &self.0)))
    }

    fn name(&self) -> &str {
        self.split().map_or("", |(_, n)| n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EntryType {
    File,
    Dir,
    Symlink,
}

/// One file, folder or link. Sizes of folders are not computed (0 or the directory
/// inode's size): a listing never walks.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: EntryType,
    pub size: u64,
    pub modified_ms: u64,
    /// With `?stat=true`: the entry's path from the root.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// One page of a folder: folders first, then by name.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<Entry>,
    /// Entries in the folder (hidden ones only with `hidden=true`).
    pub total: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
}

/// A root directory handle: a volume's or a share's.
pub struct Root {
    dir: Dir,
    read_only: bool,
    /// The root's uid and gid when they are not the aggregator's: new files get them.
    owner: Option<(u32, u32)>,
}

impl Root {
    /// Opens `path` (trusted: from config or a validated volume name) as a root.
    pub fn open(path: &Path, read_only: bool) -> Result<Root> {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority()).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::Unavailable("the storage behind this volume or share is missing".into())
            } else {
                Error::Io {
                    context: format!("opening {}", path.display()),
                    source: e,
                }
            }
        })?;
        let owner = dir
            .dir_metadata()
            .ok()
            .map(|m| {
                use cap_std::fs::MetadataExt;
                (m.uid(), m.gid())
            })
            .filter(|(uid, _)| *uid != rustix::process::geteuid().as_raw());
        Ok(Root {
            dir,
            read_only,
            owner,
        })
    }

    /// Gives a file or folder the browser just made to the root's owner.
    fn give(&self, fd: impl std::os::fd::AsFd, shown: &str) -> Result<()> {
        match self.owner {
            Some((uid, gid)) => {
                std::os::unix::fs::fchown(fd, Some(uid), Some(gid)).map_err(|e| io_error(e, shown))
            }
            None => Ok(()),
        }
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::Forbidden("this share is read-only".into()))
        } else {
            Ok(())
        }
    }

    /// The directory a path's last name lives in, opened inside the root.
    fn parent(&self, path: &RelPath) -> Result<(Dir, String)> {
        let (parent, name) = path
            .split()
            .ok_or_else(|| Error::BadRequest("not allowed on the root folder".into()))?;
        let dir = if parent.is_empty() {
            self.dir.try_clone().map_err(|e| io_error(e, ""))?
        } else {
            self.dir.open_dir(parent).map_err(|e| io_error(e, parent))?
        };
        Ok((dir, name.to_owned()))
    }

    /// Apparent size of all regular files below the root (links not followed). On
    /// the way, removes upload temporaries that nobody has written to for
    /// [`STALE_UPLOAD`]: left by an aggregator killed mid-upload (a live upload keeps
    /// its temporary's modification time fresh).
    pub fn usage(&self) -> Result<u64> {
        fn walk(dir: &Dir, depth: usize) -> io::Result<u64> {
            let mut total = 0u64;
            for e in dir.entries()? {
                let e = e?;
                let ft = e.file_type()?;
                if ft.is_dir() && depth < MAX_WALK_DEPTH {
                    total = total.saturating_add(walk(&e.open_dir()?, depth + 1)?);
                } else if ft.is_file() {
                    let meta = e.metadata()?;
                    let stale = e.file_name().to_string_lossy().starts_with(UPLOAD_PREFIX)
                        && meta
                            .modified()
                            .ok()
                            .and_then(|m| m.into_std().elapsed().ok())
                            .is_some_and(|age| age > STALE_UPLOAD);
                    if stale && dir.remove_file(e.file_name()).is_ok() {
                        continue;
                    }
                    total = total.saturating_add(meta.len());
                }
            }
            Ok(total)
        }
        walk(&self.dir, 0).map_err(|e| io_error(e, ""))
    }

    /// What `path` is (a symlink is reported as one, not followed).
    pub fn stat(&self, path: &RelPath) -> Result<Entry> {
        let meta = if path.is_root() {
            self.dir.dir_metadata()
        } else {
            self.dir.symlink_metadata(path.as_str())
        }
        .map_err(|e| io_error(e, path.as_str()))?;
        Ok(Entry {
            path: Some(path.as_str().to_owned()),
            ..entry(path.name().to_owned(), &meta)
        })
    }

    /// Whether `path` is a folder (following links that stay inside).
    pub fn is_dir(&self, path: &RelPath) -> Result<bool> {
        if path.is_root() {
            return Ok(true);
        }
        let meta = self
            .dir
            .metadata(path.as_str())
            .map_err(|e| io_error(e, path.as_str()))?;
        Ok(meta.is_dir())
    }

    pub fn list(
        &self,
        path: &RelPath,
        offset: usize,
        limit: usize,
        hidden: bool,
    ) -> Result<Listing> {
        let dir = if path.is_root() {
            self.dir.try_clone()
        } else {
            self.dir.open_dir(path.as_str())
        }
        .map_err(|e| io_error(e, path.as_str()))?;
        let mut entries = Vec::new();
        for e in dir.entries().map_err(|e| io_error(e, path.as_str()))? {
            let e = e.map_err(|e| io_error(e, path.as_str()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if !hidden && name.starts_with('.') {
                continue;
            }
            // An entry removed while listing is skipped, not an error.
            let Ok(meta) = e.metadata() else { continue };
            entries.push(entry(name, &meta));
        }
        entries.sort_by(|a, b| {
            (a.kind != EntryType::Dir, &a.name).cmp(&(b.kind != EntryType::Dir, &b.name))
        });
        let total = entries.len();
        let page: Vec<Entry> = entries.into_iter().skip(offset).take(limit).collect();
        let next_offset = (offset.saturating_add(page.len()) < total).then(|| offset + page.len());
        Ok(Listing {
            path: path.as_str().to_owned(),
            entries: page,
            total,
            next_offset,
        })
    }

    /// Opens a regular file for reading, with its size.
    pub fn open_file(&self, path: &RelPath) -> Result<(std::fs::File, u64)> {
        let file = self
            .dir
            .open(path.as_str())
            .map_err(|e| io_error(e, path.as_str()))?;
        let meta = file.metadata().map_err(|e| io_error(e, path.as_str()))?;
        if !meta.is_file() {
            return Err(Error::BadRequest(format!(
                "{:?} is not a regular file",
                path.as_str()
            )));
        }
        Ok((file.into_std(), meta.len()))
    }

    /// Creates a folder and any missing parents; one that exists is a conflict.
    pub fn mkdir(&self, path: &RelPath) -> Result<Entry> {
        self.writable()?;
        if path.is_root() {
            return Err(Error::Conflict("the root folder exists".into()));
        }
        match self.dir.symlink_metadata(path.as_str()) {
            Ok(_) => return Err(Error::Conflict(format!("{:?} exists", path.as_str()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(e, path.as_str())),
        }
        // One level at a time, so each folder made here is given to the root's owner.
        let mut at = String::new();
        for name in path.as_str().split('/').filter(|n| !n.is_empty()) {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(name);
            match self.dir.create_dir(&at) {
                Ok(()) => {
                    let made = self.dir.open_dir(&at).map_err(|e| io_error(e, &at))?;
                    self.give(&made, &at)?;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_error(e, &at)),
            }
        }
        self.stat(path)
    }

    /// Moves `from` to `to` inside this root; an existing `to` is a conflict.
    pub fn rename(&self, from: &RelPath, to: &RelPath) -> Result<Entry> {
        self.writable()?;
        let (from_dir, from_name) = self.parent(from)?;
        let (to_dir, to_name) = self.parent(to)?;
        from_dir
            .symlink_metadata(&from_name)
            .map_err(|e| io_error(e, from.as_str()))?;
        match to_dir.symlink_metadata(&to_name) {
            Ok(_) => return Err(Error::Conflict(format!("{:?} exists", to.as_str()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error(e, to.as_str())),
        }
        from_dir
            .rename(&from_name, &to_dir, &to_name)
            .map_err(|e| io_error(e, to.as_str()))?;
        self.stat(to)
    }

    /// Removes a file, link or empty folder; a folder with contents only with
    /// `recursive`. Returns the bytes freed when known (a file's size).
    pub fn delete(&self, path: &RelPath, recursive: bool) -> Result<Option<u64>> {
        self.writable()?;
        let (dir, name) = self.parent(path)?;
        let meta = dir
            .symlink_metadata(&name)
            .map_err(|e| io_error(e, path.as_str()))?;
        let shown = path.as_str();
        if meta.is_dir() {
            if recursive {
                dir.remove_dir_all(&name).map_err(|e| io_error(e, shown))?;
            } else {
                dir.remove_dir(&name).map_err(|e| match e.kind() {
                    io::ErrorKind::DirectoryNotEmpty => Error::Conflict(format!(
                        "folder {shown:?} is not empty; delete with ?recursive=true"
                    )),
                    _ => io_error(e, shown),
                })?;
            }
            Ok(if recursive { None } else { Some(0) })
        } else {
            dir.remove_file(&name).map_err(|e| io_error(e, shown))?;
            Ok(Some(if meta.is_file() { meta.len() } else { 0 }))
        }
    }

    /// Checks that an upload to `path` may start: the parent folder exists, the path
    /// is not a folder, and an existing file is replaced only with `overwrite`.
    /// Returns the parent, the name, the replaced file's size and a fresh temporary.
    fn begin_upload(&self, path: &RelPath, overwrite: bool) -> Result<Upload> {
        self.writable()?;
        let (dir, name) = self.parent(path)?;
        let replaced = match dir.symlink_metadata(&name) {
            Ok(m) if m.is_dir() => {
                return Err(Error::Conflict(format!("{:?} is a folder", path.as_str())));
            }
            Ok(_) if !overwrite => {
                return Err(Error::Conflict(format!(
                    "{:?} exists; upload with ?overwrite=true to replace it",
                    path.as_str()
                )));
            }
            // A link is replaced, not written through: it frees nothing.
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => 0,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_error(e, path.as_str())),
        };
        let tmp = format!("{UPLOAD_PREFIX}{}", uuid::Uuid::new_v4());
        let file = dir
            .open_with(&tmp, OpenOptions::new().write(true).create_new(true))
            .map_err(|e| io_error(e, path.as_str()))?;
        self.give(&file, path.as_str())?;
        Ok(Upload {
            file: Some(file.into_std()),
            guard: TempGuard {
                dir: Arc::new(dir),
                tmp,
                armed: true,
            },
            name,
            replaced,
        })
    }
}

struct Upload {
    file: Option<std::fs::File>,
    guard: TempGuard,
    name: String,
    replaced: u64,
}

/// Removes an upload's temporary unless disarmed: a failed, refused or abandoned
/// upload (the client went away and the handler was dropped) leaves nothing behind.
struct TempGuard {
    dir: Arc<Dir>,
    tmp: String,
    armed: bool,
}

impl Drop for TempGuard {
    fn drop(&mut self) {
        if self.armed
            && let Err(e) = self.dir.remove_file(&self.tmp)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "could not remove an upload's temporary file");
        }
    }
}

/// What an upload wrote.
pub struct Uploaded {
    pub entry: Entry,
    /// Bytes written minus the size of the file it replaced.
    pub delta: i64,
}

/// Streams `body` into `path`: to a temporary in the same folder, synced, then
/// renamed (with `overwrite`) or hard-linked (without: atomic, fails if the name was
/// taken meanwhile) into place. More than `limit` bytes (plus those of the file it
/// replaces) is `TooLarge`, refused before reading when `declared` (Content-Length)
/// says so, and nothing is left behind.
pub async fn upload<E: std::fmt::Display>(
    root: Arc<Root>,
    path: RelPath,
    body: impl Stream<Item = std::result::Result<Bytes, E>> + Unpin,
    limit: u64,
    declared: Option<u64>,
    overwrite: bool,
) -> Result<Uploaded> {
    let r = root.clone();
    let p = path.clone();
    let mut up = blocking(move || r.begin_upload(&p, overwrite)).await?;
    let limit = limit.saturating_add(up.replaced);
    if declared.is_some_and(|n| n > limit) {
        return Err(Error::TooLarge(format!(
            "upload over the {limit} bytes left in this volume"
        )));
    }
    let std_file = up
        .file
        .take()
        .ok_or_else(|| Error::Internal("upload without a file".into()))?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut written: u64 = 0;
    let mut stream = body;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| Error::BadRequest(format!("the upload was interrupted: {e}")))?;
        written = written.saturating_add(chunk.len() as u64);
        if written > limit {
            return Err(Error::TooLarge(format!(
                "upload over the {limit} bytes left in this volume"
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| io_error(e, path.as_str()))?;
    }
    file.flush().await.map_err(|e| io_error(e, path.as_str()))?;
    file.sync_all()
        .await
        .map_err(|e| io_error(e, path.as_str()))?;
    drop(file);
    let replaced = up.replaced;
    let entry = blocking(move || {
        let g = &mut up.guard;
        if overwrite {
            g.dir
                .rename(&g.tmp, &g.dir, &up.name)
                .map_err(|e| io_error(e, path.as_str()))?;
            g.armed = false;
        } else {
            g.dir.hard_link(&g.tmp, &g.dir, &up.name).map_err(|e| {
                if e.kind() == io::ErrorKind::AlreadyExists {
                    Error::Conflict(format!(
                        "{:?} was created meanwhile; upload with ?overwrite=true to replace it",
                        path.as_str()
                    ))
                } else {
                    io_error(e, path.as_str())
                }
            })?;
            // The guard removes the temporary name; the file lives on under its own.
        }
        root.stat(&path)
    })
    .await?;
    let delta = i64::try_from(written).unwrap_or(i64::MAX) - i64::try_from(replaced).unwrap_or(0);
    Ok(Uploaded { entry, delta })
}

/// Runs blocking file-system work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("file task failed: {e}")))?
}

fn entry(name: String, meta: &cap_std::fs::Metadata) -> Entry {
    let ft = meta.file_type();
    let kind = if ft.is_symlink() {
        EntryType::Symlink
    } else if ft.is_dir() {
        EntryType::Dir
    } else {
        EntryType::File
    };
    let modified_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.into_std().duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    Entry {
        name,
        kind,
        size: if kind == EntryType::Dir {
            0
        } else {
            meta.len()
        },
        modified_ms,
        path: None,
    }
}

/// Maps a file-system error to what the client learns. Escapes (cap-std reports
/// them as permission errors) and link loops are 403; nothing about the host path is
/// shown.
fn io_error(e: io::Error, path: &str) -> Error {
    use io::ErrorKind as K;
    match e.kind() {
        K::NotFound => Error::NotFound(format!("no file or folder {path:?}")),
        K::AlreadyExists => Error::Conflict(format!("{path:?} exists")),
        K::DirectoryNotEmpty => Error::Conflict(format!("folder {path:?} is not empty")),
        K::NotADirectory => Error::BadRequest(format!("{path:?}: a part of it is not a folder")),
        K::IsADirectory => Error::Conflict(format!("{path:?} is a folder")),
        K::InvalidFilename | K::InvalidInput => {
            Error::BadRequest(format!("{path:?} is not a valid name or move here"))
        }
        K::PermissionDenied | K::ReadOnlyFilesystem => {
            Error::Forbidden(format!("{path:?} is outside this volume or not accessible"))
        }
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => {
            Error::TooLarge("the storage is full".into())
        }
        K::CrossesDevices => Error::BadRequest(format!("{path:?}: cannot move across devices")),
        _ => {
            // ELOOP through too many links and EXDEV from RESOLVE_BENEATH surface here
            // on some kernels as raw codes.
            match e.raw_os_error() {
                Some(code)
                    if code == rustix::io::Errno::XDEV.raw_os_error()
                        || code == rustix::io::Errno::LOOP.raw_os_error() =>
                {
                    Error::Forbidden(format!("{path:?} is outside this volume"))
                }
                _ => Error::Io {
                    context: format!("file operation on {path:?}"),
                    source: e,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // The API document's pattern for `{path}` and the parser agree (lengths
        // aside: they are bytes here, and the generated paths stay short).
        #[test]
        fn the_documented_path_pattern_is_the_parser(
            raw in "(/|[a.]|\\.|\\.\\.|é|\\\\|\u{1}|\u{85}|x){0,12}"
        ) {
            let schema = kcloud_core::schema::file_path();
            let re = regex::Regex::new(schema["pattern"].as_str().unwrap()).unwrap();
            prop_assert_eq!(re.is_match(&raw), RelPath::parse(&raw).is_ok(), "{:?}", raw);
        }
    }

    #[test]
    fn the_usage_walk_removes_stale_upload_leftovers_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let old = dir.path().join("sub").join(format!("{UPLOAD_PREFIX}dead"));
        let live = dir.path().join(format!("{UPLOAD_PREFIX}live"));
        let kept = dir.path().join("data.bin");
        for p in [&old, &live, &kept] {
            std::fs::write(p, [0u8; 100]).unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        // A user's own file that is merely old is never touched.
        std::fs::File::options()
            .write(true)
            .open(&kept)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        let root = Root::open(dir.path(), false).unwrap();
        assert_eq!(root.usage().unwrap(), 200);
        assert!(!old.exists() && live.exists() && kept.exists());
    }

    #[test]
    fn paths() {
        assert!(RelPath::parse("").unwrap().is_root());
        assert!(RelPath::parse("/").is_err());
        assert_eq!(RelPath::parse("a/b/").unwrap().as_str(), "a/b");
        assert_eq!(RelPath::parse("a/b").unwrap().split(), Some(("a", "b")));
        assert_eq!(RelPath::parse("a").unwrap().split(), Some(("", "a")));
        assert_eq!(RelPath::parse("a b/ü.txt").unwrap().name(), "ü.txt");
        let long = "x".repeat(256);
        for bad in [
            "..",
            "a/../b",
            "./a",
            "a/.",
            "/etc/passwd",
            "a//b",
            "a\0b",
            "a\\b",
            "a\nb",
            long.as_str(),
            &"a/".repeat(2100),
        ] {
            assert!(
                matches!(RelPath::parse(bad), Err(Error::BadRequest(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn listing_pages_folders_first_and_hides_dotfiles() {
        let tmp = tempfile::tempdir().unwrap();
        for f in ["b.txt", "a.txt", ".hidden"] {
            std::fs::write(tmp.path().join(f), "x").unwrap();
        }
        std::fs::create_dir(tmp.path().join("z-dir")).unwrap();
        let root = Root::open(tmp.path(), false).unwrap();
        let all = root
            .list(&RelPath::parse("").unwrap(), 0, 10, false)
            .unwrap();
        let names: Vec<&str> = all.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["z-dir", "a.txt", "b.txt"]);
        assert_eq!(all.total, 3);
        assert_eq!(all.next_offset, None);
        let page = root.list(&RelPath::parse("").unwrap(), 1, 1, true).unwrap();
        assert_eq!(page.total, 4);
        assert_eq!(page.entries[0].name, ".hidden");
        assert_eq!(page.next_offset, Some(2));
        assert_eq!(root.usage().unwrap(), 3);
    }

    #[test]
    fn symlinks_out_of_the_root_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("vol");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(&vol).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::fs::write(other.join("secret"), "s").unwrap();
        std::os::unix::fs::symlink("/etc", vol.join("etc")).unwrap();
        std::os::unix::fs::symlink("../other", vol.join("up")).unwrap();
        std::os::unix::fs::symlink(&other, vol.join("abs")).unwrap();
        let root = Root::open(&vol, false).unwrap();
        for p in ["etc/passwd", "up/secret", "abs/secret"] {
            let p = RelPath::parse(p).unwrap();
            assert!(
                matches!(root.open_file(&p), Err(Error::Forbidden(_))),
                "{p:?}"
            );
            assert!(
                root.list(
                    &RelPath::parse(p.as_str().split('/').next().unwrap()).unwrap(),
                    0,
                    10,
                    false
                )
                .is_err()
            );
            assert!(
                root.mkdir(&RelPath::parse(&format!("{}/x", p.as_str())).unwrap())
                    .is_err()
            );
        }
        assert!(!other.join("x").exists());
        // The links themselves are listed, and deleting one removes only the link.
        let top = root
            .list(&RelPath::parse("").unwrap(), 0, 10, false)
            .unwrap();
        assert!(top.entries.iter().all(|e| e.kind == EntryType::Symlink));
        root.delete(&RelPath::parse("up").unwrap(), true).unwrap();
        assert!(other.join("secret").exists());
    }
}
