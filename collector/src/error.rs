//! The collector's two error layers: [`StoreError`] for what goes wrong inside, and
//! [`ApiError`], the one type whose [`IntoResponse`] decides every HTTP status and
//! error body (`{"error": {"code": "...", "message": "..."}}`).

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A failure of the embedded store or of its encoding.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    /// The storage backend failed (disk full, I/O error, corruption); retry later.
    #[error("storage: {0}")]
    Storage(String),
    /// A stored record could not be encoded or decoded.
    #[error("encoding: {0}")]
    Encoding(#[from] serde_json::Error),
    /// A stored record is not in the expected format.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The log writer has stopped (the collector is shutting down).
    #[error("the collector is shutting down")]
    ShuttingDown,
    /// A background thread could not be started.
    #[error("cannot start {0}")]
    Start(String),
    /// The group commit this request was part of failed (logged with its cause).
    #[error("the group commit failed")]
    CommitFailed,
}

impl StoreError {
    /// Whether the error is about the data at hand (a record that cannot be encoded or
    /// decoded) rather than the storage itself: retrying cannot help, so the pipeline
    /// quarantines the event instead.
    pub fn is_about_data(&self) -> bool {
        matches!(self, StoreError::Encoding(_) | StoreError::Corrupt(_))
    }
}

/// An error answered to an HTTP client. Each variant is one thing the client can do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed; fix it and do not retry as is.
    #[error("{message}")]
    Invalid {
        /// Stable, machine-readable reason.
        code: &'static str,
        /// A sentence for the developer.
        message: String,
    },
    /// 401: the write key or admin token is missing or wrong.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 408: the request's body did not arrive in time; send it again, faster.
    #[error("{0}")]
    Timeout(String),
    /// 413: the body, batch or event is over a limit; split it.
    #[error("{message}")]
    TooLarge {
        /// Stable, machine-readable reason.
        code: &'static str,
        /// A sentence for the developer.
        message: String,
    },
    /// 429: the write key is over its rate; retry after this many seconds.
    #[error("rate limit exceeded, retry in {retry_after_secs} s")]
    RateLimited {
        /// Seconds until a retry may succeed.
        retry_after_secs: u64,
    },
    /// 503: the collector cannot take the request now; retry later.
    #[error("{0}")]
    Unavailable(String),
}

impl ApiError {
    /// A 400 with the given code.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            code,
            message: message.into(),
        }
    }

    /// A 413 with the given code.
    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::TooLarge {
            code,
            message: message.into(),
        }
    }

    /// The stable code sent in the error body and counted in the stats.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::Invalid { code, .. } | ApiError::TooLarge { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::NotFound(_) => "not_found",
            ApiError::Timeout(_) => "request_timeout",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl ApiError {
    /// `body` read as JSON into `T`, or a 400 with `code` that says why.
    pub fn json_body<T: serde::de::DeserializeOwned>(
        body: &[u8],
        code: &'static str,
    ) -> Result<T, Self> {
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(code, e.to_string()))
    }
}

impl ApiError {
    /// A 400 `unreadable_definition` unless `value` reads back as the store writes it
    /// (see [`crate::store::reads_back`]): checked before any definition is stored.
    ///
    /// # Errors
    ///
    /// The 400.
    pub fn unless_reads_back<T>(value: &T, what: &str) -> Result<(), Self>
    where
        T: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq,
    {
        if crate::store::reads_back(value) {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "unreadable_definition",
                format!(
                    "the {what} cannot be stored in a form that reads back (nested too deeply?)"
                ),
            ))
        }
    }
}

/// A query string that does not fit its handler's query type.
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::invalid("invalid_query", rejection.body_text())
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        tracing::error!(%error, "store failure answered with 503");
        ApiError::Unavailable(match error {
            StoreError::ShuttingDown => error.to_string(),
            _ => "storage is unavailable, retry later".to_owned(),
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        let mut response = (self.status(), body).into_response();
        let retry_after = match self {
            ApiError::RateLimited { retry_after_secs } => Some(retry_after_secs),
            ApiError::Unavailable(_) => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
