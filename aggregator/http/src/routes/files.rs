//! The file browser over volumes (`/api/v1/users/{user}/volumes/{volume}/files/{path}`)
//! and shares (`/api/v1/shares/{share}/files/{path}`): list, stat, download with
//! ranges, streamed upload, mkdir, rename, delete.
//!
//! Another user's volume and a share the caller may not use are 404. Paths are
//! confined by `kcloud_service::files`; writes to a read-only share are 403. Files are
//! served with `Content-Security-Policy: sandbox` and `nosniff`, so an uploaded HTML or
//! SVG file cannot run script on the portal's origin.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Json, routing::MethodRouter};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use kcloud_core::Error;
use kcloud_service::files::{
    self, DEFAULT_LIMIT, Entry, Listing, MAX_LIMIT, RelPath, Root, blocking,
};
use kcloud_service::volumes::FileTarget as Target;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::extract::{ApiJson, ApiPath, ApiQuery, Caller};

const VOLUME_FILES: &str = "/api/v1/users/{user}/volumes/{volume}/files";
const SHARE_FILES: &str = "/api/v1/shares/{share}/files";
/// Bytes read per chunk of a download.
const READ_CHUNK: usize = 64 << 10;

pub fn routes() -> OpenApiRouter<AppState> {
    // The documented `{path}` is one segment to utoipa; axum serves it as a catch-all
    // (`{*path}`), and the bare folder URLs for the root.
    let (vs, vp, vm) = routes!(volume_get, volume_put, volume_post, volume_delete);
    let (ss, sp, sm) = routes!(share_get, share_put, share_post, share_delete);
    let mut api = utoipa::openapi::OpenApiBuilder::new().build();
    api.paths.merge(vp);
    api.paths.merge(sp);
    api.components
        .get_or_insert_with(Default::default)
        .schemas
        .extend(vs.into_iter().chain(ss));
    let serve = |r: OpenApiRouter<AppState>, base: &str, m: MethodRouter<AppState>| {
        r.route(base, m.clone())
            .route(&format!("{base}/"), m.clone())
            .route(&format!("{base}/{{*path}}"), m)
    };
    let r = OpenApiRouter::with_openapi(api);
    let r = serve(r, VOLUME_FILES, vm);
    serve(r, SHARE_FILES, sm)
}

#[derive(Debug, Deserialize)]
struct VolumePath {
    user: String,
    volume: String,
    #[serde(default)]
    path: String,
}

#[derive(Debug, Deserialize)]
struct SharePath {
    share: String,
    #[serde(default)]
    path: String,
}

/// Options of the file endpoints (each method reads its own).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// GET on a folder: entries to skip.
    #[param(maximum = 18_446_744_073_709_551_615_u64)]
    offset: Option<usize>,
    /// GET on a folder: entries per page (default 500, at most 5000).
    #[param(minimum = 1, maximum = 5000)]
    limit: Option<usize>,
    /// GET on a folder: include names starting with `.`.
    hidden: Option<bool>,
    /// GET: describe the path instead of listing or downloading it.
    stat: Option<bool>,
    /// GET on a file: `Content-Disposition: attachment`.
    download: Option<bool>,
    /// PUT: replace an existing file.
    overwrite: Option<bool>,
    /// DELETE: remove a folder with its contents.
    recursive: Option<bool>,
}

/// `POST` on a path: make it a folder, or move it elsewhere inside the same root.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum FileOp {
    Mkdir,
    Rename { to: String },
}

async fn volume_target(s: &AppState, caller: &Caller, p: &VolumePath) -> Result<Target, Error> {
    s.volumes.volume_files(caller, &p.user, &p.volume).await
}

async fn share_target(s: &AppState, caller: &Caller, name: &str) -> Result<Target, Error> {
    s.volumes.share_files(caller, name).await
}

async fn get(t: Target, path: &str, q: FileQuery, headers: &HeaderMap) -> Result<Response, Error> {
    let path = RelPath::parse(path)?;
    let root = t.root;
    if q.stat == Some(true) {
        return Ok(Json(blocking(move || root.stat(&path)).await?).into_response());
    }
    let r = root.clone();
    let p = path.clone();
    if blocking(move || r.is_dir(&p)).await? {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT);
        if limit == 0 || limit > MAX_LIMIT {
            return Err(Error::BadRequest(format!("limit: 1 to {MAX_LIMIT}")));
        }
        let (offset, hidden) = (q.offset.unwrap_or(0), q.hidden.unwrap_or(false));
        let listing: Listing = blocking(move || root.list(&path, offset, limit, hidden)).await?;
        return Ok(Json(listing).into_response());
    }
    download(root, path, headers, q.download == Some(true)).await
}

async fn download(
    root: Arc<Root>,
    path: RelPath,
    headers: &HeaderMap,
    attachment: bool,
) -> Result<Response, Error> {
    let name = path.as_str().rsplit('/').next().unwrap_or("").to_owned();
    let (file, size) = blocking(move || root.open_file(&path)).await?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(h) => byte_range(h, size).map_err(|()| Error::RangeNotSatisfiable { size })?,
        None => None,
    };
    let (start, len) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, size),
    };
    let mut file = tokio::fs::File::from_std(file);
    if start > 0 {
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|source| Error::Io {
                context: "seeking in a download".into(),
                source,
            })?;
    }
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), READ_CHUNK);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(&name)),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, no-cache"),
    );
    if attachment
        && let Ok(v) = HeaderValue::from_str(&format!(
            "attachment; filename*=UTF-8''{}",
            crate::percent::encode(&name, b"")
        ))
    {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some((a, b)) = range {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    Ok(resp)
}

async fn put(
    s: &AppState,
    t: Target,
    path: &str,
    q: FileQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Entry>), Error> {
    let path = RelPath::parse(path)?;
    if t.root.read_only() {
        return Err(Error::Forbidden("this share is read-only".into()));
    }
    let limit = match &t.volume {
        Some((owner, name, size)) => size.saturating_sub(s.volumes.used_bytes(owner, name).await?),
        None => u64::MAX,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let overwrite = q.overwrite == Some(true);
    let up = files::upload(
        t.root,
        path,
        body.into_data_stream(),
        limit,
        declared,
        overwrite,
    )
    .await?;
    if let Some((owner, name, _)) = &t.volume {
        s.volumes.adjust_usage(owner, name, up.delta);
    }
    Ok((StatusCode::CREATED, Json(up.entry)))
}

async fn post(t: Target, path: &str, op: FileOp) -> Result<(StatusCode, Json<Entry>), Error> {
    let path = RelPath::parse(path)?;
    let root = t.root;
    match op {
        FileOp::Mkdir => Ok((
            StatusCode::CREATED,
            Json(blocking(move || root.mkdir(&path)).await?),
        )),
        FileOp::Rename { to } => {
            let to = RelPath::parse(&to)?;
            Ok((
                StatusCode::OK,
                Json(blocking(move || root.rename(&path, &to)).await?),
            ))
        }
    }
}

async fn delete(s: &AppState, t: Target, path: &str, q: FileQuery) -> Result<StatusCode, Error> {
    let path = RelPath::parse(path)?;
    let root = t.root;
    let recursive = q.recursive == Some(true);
    let freed = blocking(move || root.delete(&path, recursive)).await?;
    if let Some((owner, name, _)) = &t.volume {
        match freed {
            Some(n) => s
                .volumes
                .adjust_usage(owner, name, -i64::try_from(n).unwrap_or(0)),
            None => s.volumes.forget_usage(owner, name),
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// A folder's page of entries, a file's bytes (ranges supported), or with `stat=true`
/// the entry itself.
#[utoipa::path(get, path = "/api/v1/users/{user}/volumes/{volume}/files/{path}", tag = "files",
    params(("user" = String, Path), ("volume" = String, Path),
        ("path" = String, Path, description = "Inside the volume; empty for the root folder"), FileQuery),
    responses((status = 200, description = "A folder; a file's bytes (typed by its name); or an entry with stat=true",
            content((Listing = "application/json"), (String = "*/*"))),
        (status = 206, description = "Part of a file", content((String = "*/*"))), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 416, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn volume_get(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<VolumePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = volume_target(&s, &caller, &p).await?;
    Ok(get(t, &p.path, q, &headers).await?)
}

/// Uploads the request body to the path: streamed to a temporary file, renamed into
/// place when complete. 413 past the space left in the volume; 409 if the file exists
/// (unless `overwrite=true`).
#[utoipa::path(put, path = "/api/v1/users/{user}/volumes/{volume}/files/{path}", tag = "files",
    params(("user" = String, Path), ("volume" = String, Path), ("path" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Entry), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn volume_put(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<VolumePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let t = volume_target(&s, &caller, &p).await?;
    Ok(put(&s, t, &p.path, q, &headers, body).await?)
}

/// `{"op": "mkdir"}` (201) or `{"op": "rename", "to": "other/path"}` (200).
#[utoipa::path(post, path = "/api/v1/users/{user}/volumes/{volume}/files/{path}", tag = "files",
    params(("user" = String, Path), ("volume" = String, Path), ("path" = String, Path)),
    request_body = FileOp,
    responses((status = 200, body = Entry), (status = 201, body = Entry), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn volume_post(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<VolumePath>,
    ApiJson(op): ApiJson<FileOp>,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let t = volume_target(&s, &caller, &p).await?;
    Ok(post(t, &p.path, op).await?)
}

/// Deletes a file, link or empty folder; a folder with contents needs `recursive=true`
/// (else 409).
#[utoipa::path(delete, path = "/api/v1/users/{user}/volumes/{volume}/files/{path}", tag = "files",
    params(("user" = String, Path), ("volume" = String, Path), ("path" = String, Path), FileQuery),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn volume_delete(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<VolumePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<StatusCode, ApiError> {
    let t = volume_target(&s, &caller, &p).await?;
    Ok(delete(&s, t, &p.path, q).await?)
}

/// As for volumes, on a share the caller may use.
#[utoipa::path(get, path = "/api/v1/shares/{share}/files/{path}", tag = "files",
    params(("share" = String, Path), ("path" = String, Path), FileQuery),
    responses((status = 200, description = "A folder; a file's bytes (typed by its name); or an entry with stat=true",
            content((Listing = "application/json"), (String = "*/*"))),
        (status = 206, description = "Part of a file", content((String = "*/*"))), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn share_get(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<SharePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let t = share_target(&s, &caller, &p.share).await?;
    Ok(get(t, &p.path, q, &headers).await?)
}

/// As for volumes; 403 on a read-only share.
#[utoipa::path(put, path = "/api/v1/shares/{share}/files/{path}", tag = "files",
    params(("share" = String, Path), ("path" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Entry), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn share_put(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<SharePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let t = share_target(&s, &caller, &p.share).await?;
    Ok(put(&s, t, &p.path, q, &headers, body).await?)
}

/// As for volumes; 403 on a read-only share.
#[utoipa::path(post, path = "/api/v1/shares/{share}/files/{path}", tag = "files",
    params(("share" = String, Path), ("path" = String, Path)), request_body = FileOp,
    responses((status = 200, body = Entry), (status = 201, body = Entry), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn share_post(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<SharePath>,
    ApiJson(op): ApiJson<FileOp>,
) -> Result<(StatusCode, Json<Entry>), ApiError> {
    let t = share_target(&s, &caller, &p.share).await?;
    Ok(post(t, &p.path, op).await?)
}

/// As for volumes; 403 on a read-only share.
#[utoipa::path(delete, path = "/api/v1/shares/{share}/files/{path}", tag = "files",
    params(("share" = String, Path), ("path" = String, Path), FileQuery),
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = []), ("cookie" = [])))]
async fn share_delete(
    State(s): State<AppState>,
    caller: Caller,
    ApiPath(p): ApiPath<SharePath>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<StatusCode, ApiError> {
    let t = share_target(&s, &caller, &p.share).await?;
    Ok(delete(&s, t, &p.path, q).await?)
}

/// One `Range: bytes=...` range as inclusive offsets. `Ok(None)`: serve the whole file
/// (no usable range, or several ranges, which RFC 9110 lets a server ignore);
/// `Err(())`: 416.
fn byte_range(h: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = h.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, false) => {
            let Some(n) = num(b) else { return Ok(None) };
            if n == 0 || size == 0 {
                return Err(());
            }
            Ok(Some((size.saturating_sub(n), size - 1)))
        }
        (false, _) => {
            let Some(start) = num(a) else { return Ok(None) };
            let end = if b.trim().is_empty() {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return Ok(None),
                }
            };
            if start >= size {
                return Err(());
            }
            Ok(Some((start, end.min(size - 1))))
        }
        (true, true) => Ok(None),
    }
}

/// A content type from the extension; anything unknown is octet-stream.
fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some(
            "txt" | "md" | "log" | "py" | "r" | "sh" | "toml" | "yaml" | "yml" | "ini" | "cfg",
        ) => "text/plain; charset=utf-8",
        Some("csv") => "text/csv; charset=utf-8",
        Some("tsv") => "text/tab-separated-values; charset=utf-8",
        Some("json" | "ipynb") => "application/json",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("gz" | "tgz") => "application/gzip",
        Some("tar") => "application/x-tar",
        Some("mp4") => "video/mp4",
        Some("wav") => "audio/wav",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=90-1000", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-1000", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
        assert_eq!(byte_range("bytes=0-", 0), Err(()));
        for whole in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=x-1",
            "bytes=5-1",
            "bytes=-",
        ] {
            assert_eq!(byte_range(whole, 100), Ok(None), "{whole}");
        }
    }

    #[test]
    fn content_types_and_names() {
        assert_eq!(content_type("a/b.CSV"), "text/csv; charset=utf-8");
        assert_eq!(content_type("model.pt"), "application/octet-stream");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(
            crate::percent::encode("a b/ü.txt", b""),
            "a%20b%2F%C3%BC.txt"
        );
    }
}
