//! The aggregator's error type, shared by its crates so that a domain error (a taken
//! name, an exceeded quota) keeps its meaning from the store to the HTTP answer.

/// Everything that can fail in the aggregator. The HTTP layer maps these to status
/// codes in one place; server-side variants are logged there and never shown to
/// clients.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Malformed or invalid input (400/422).
    #[error("{0}")]
    BadRequest(String),
    /// No or bad credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed (403).
    #[error("{0}")]
    Forbidden(String),
    /// Absent, or another user's (404: existence does not leak).
    #[error("{0}")]
    NotFound(String),
    /// Device taken, name in use, stale write (409).
    #[error("{0}")]
    Conflict(String),
    /// Body or field over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many attempts; retry after this many seconds (429).
    #[error("too many requests; retry in {retry_after_secs}s")]
    RateLimited { retry_after_secs: u64 },
    /// A quota would be exceeded (429).
    #[error("{0}")]
    QuotaExceeded(String),
    /// A `Range` outside a file of `size` bytes (416).
    #[error("range not satisfiable: the file has {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// Not ready yet or a backend is down (503).
    #[error("{0}")]
    Unavailable(String),
    /// Bad configuration at start.
    #[error("configuration: {0}")]
    Config(String),
    /// The database failed or is unusable.
    #[error("database: {0}")]
    Store(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A bug or an unexpected state; logged, shown to clients as "internal error".
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
