//! Reading the end of a server's log file: a tail, and where following goes on.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// Log bytes read for a tail, at most.
pub const LOG_TAIL_BYTES: u64 = 4 << 20;

/// The last `max_bytes` of a file and the offset they start at; a missing file is
/// empty (a server that has not written yet).
pub fn read_end(path: &Path, max_bytes: u64) -> std::io::Result<(Vec<u8>, u64)> {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let from = f.metadata()?.len().saturating_sub(max_bytes);
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(max_bytes).read_to_end(&mut buf)?;
    Ok((buf, from))
}

/// The last `n` lines of a file, reading at most `max_bytes` from its end; a missing
/// file is empty.
pub fn tail_lines(path: &Path, n: usize, max_bytes: u64) -> std::io::Result<String> {
    let (buf, from) = read_end(path, max_bytes)?;
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let keep = &lines[lines.len().saturating_sub(n)..];
    let mut out = keep.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    Ok(out)
}

/// The last `n` whole lines of a log (at most [`LOG_TAIL_BYTES`] of it), and the
/// offset just after the last of them: where following goes on.
pub fn whole_lines_tail(path: &Path, n: usize) -> std::io::Result<(String, u64)> {
    let (buf, from) = read_end(path, LOG_TAIL_BYTES)?;
    let whole = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut lines: Vec<&[u8]> = buf[..whole].split_inclusive(|&b| b == b'\n').collect();
    if from > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let text: Vec<u8> = lines[lines.len().saturating_sub(n)..].concat();
    Ok((
        String::from_utf8_lossy(&text).into_owned(),
        from + whole as u64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn following_starts_after_the_last_whole_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\nb\nc\npart").unwrap();
        let (text, at) = whole_lines_tail(&path, 2).unwrap();
        assert_eq!(text, "b\nc\n");
        assert_eq!(at, 6, "the unfinished line is followed, not tailed");
        assert_eq!(
            whole_lines_tail(&dir.path().join("none"), 5).unwrap(),
            (String::new(), 0)
        );
    }

    #[test]
    fn log_tails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert_eq!(tail_lines(&path, 5, 1024).unwrap(), "");
        let text: String = (1..=100).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        assert_eq!(
            tail_lines(&path, 2, 1 << 20).unwrap(),
            "line 99\nline 100\n"
        );
        assert_eq!(tail_lines(&path, 0, 1 << 20).unwrap(), "");
        // A byte cap that cuts mid-line drops the partial line.
        assert_eq!(tail_lines(&path, 100, 12).unwrap(), "line 100\n");
    }
}
