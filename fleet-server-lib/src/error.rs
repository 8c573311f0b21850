//! The control plane's error type and how each error looks to a client.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fleet_core::ValidationErrors;

/// Everything that can go wrong in the control plane.
///
/// Clients see a stable body `{"error": {"code", "message"}}` (plus `details` for invalid
/// input). Database and internal errors are logged with their detail and shown as a generic
/// `internal` error: a client never sees SQL, a stack trace or a secret.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable credentials (or a signature that does not verify): 401.
    #[error("unauthorized")]
    Unauthorized,
    /// Credentials are valid but the role is not enough: 403.
    #[error("forbidden")]
    Forbidden,
    /// The instance must be enrolled before it may send heartbeats: 403.
    #[error("instance is not enrolled")]
    NotEnrolled,
    /// Nothing at that path or id: 404.
    #[error("not found")]
    NotFound,
    /// It existed but was deleted on purpose (command output past its retention): 410,
    /// with what happened.
    #[error("{0}")]
    Gone(String),
    /// The request conflicts with the current state (a rollout batch still running, a
    /// duplicate release, an incompatible plugin): 409.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The body is over the limit: 413.
    #[error("body exceeds the limit of {limit} bytes")]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
    /// The input breaks the schema or a limit: 422, with every problem and its path.
    #[error("{0}")]
    Invalid(ValidationErrors),
    /// A malformed request (bad query parameter, bad form): 400.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Too many failed credential checks from this client: 429, with `Retry-After`.
    #[error("too many failed credential checks; retry in {retry_after_secs} s")]
    TooManyAttempts {
        /// Seconds until the client may try again.
        retry_after_secs: u64,
    },
    /// The control plane is stopping or overloaded: 503.
    #[error("service unavailable")]
    Unavailable,
    /// Configuration values that cannot be used; each entry names one problem.
    #[error("invalid configuration: {}", .0.join("; "))]
    Config(Vec<String>),
    /// A database error (shown to clients as `internal`).
    #[error("database error: {}", database_error_text(.0))]
    Database(#[from] sqlx::Error),
    /// An error of the SQLite connection that records heartbeats (shown to clients as
    /// `internal`).
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database's schema could not be brought to this version (shown to clients as
    /// `internal`).
    #[error("{}", migration_error_text(.0))]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A bug or broken invariant (shown to clients as `internal`).
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a database error says, for logs and the operator. An error the database answered is
/// its message and SQLSTATE code: sqlx's own text adds "at line N", the line of PostgreSQL's
/// C source that raised it, which reads as if it were a line of the query or of a file.
fn database_error_text(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("{} (SQLSTATE {code})", db.message()),
            None => db.message().to_owned(),
        },
        other => other.to_string(),
    }
}

/// What a failed migration means to the operator who started the server. sqlx's own texts
/// speak of "resolved migrations"; the usual cause of that one is a control plane rolled
/// back to a version older than the one that last migrated the database.
fn migration_error_text(err: &sqlx::migrate::MigrateError) -> String {
    use sqlx::migrate::MigrateError;
    let version = crate::plugins::CONTROL_PLANE_VERSION;
    match err {
        MigrateError::Execute(db) => {
            format!(
                "migration error: {}{}",
                database_error_text(db),
                privilege_hint(db)
            )
        }
        MigrateError::ExecuteMigration(db, number) => format!(
            "migration {number} failed: {}{}",
            database_error_text(db),
            privilege_hint(db)
        ),
        MigrateError::VersionMissing(number) => format!(
            "the database has migration {number}, which fleet-server {version} does not know: \
             a newer fleet-server has migrated it. Run that version or a newer one, or restore \
             the database from before the upgrade"
        ),
        MigrateError::VersionMismatch(number) => format!(
            "the database's migration {number} differs from the one of fleet-server {version}: \
             another build has migrated it. Run the build that did"
        ),
        other => format!("migration error: {other}"),
    }
}

/// For a migration refused for want of a privilege: which one the server's role needs.
fn privilege_hint(err: &sqlx::Error) -> &'static str {
    match err {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("42501") => {
            ". fleet-server creates and alters its tables when it starts: its database role \
             needs CREATE on the schema (for example, by owning the database)"
        }
        _ => "",
    }
}

/// `Result` with the control plane's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether doing the same work again at once would only wait again, rather than the
    /// database refusing the data: it could not be reached (down, restarting, no connection
    /// within the pool's acquire timeout), or a row lock held elsewhere outlasted
    /// `lock_timeout`.
    pub(crate) fn retry_would_wait(&self) -> bool {
        let Self::Database(err) = self else {
            return false;
        };
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // SQLSTATE class 08 (connection exception), 57P (the server shutting down or
            // starting up) and 55P03 (lock not available).
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "55P03"),
            _ => false,
        }
    }

    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden | Self::NotEnrolled => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::Gone(_) => StatusCode::GONE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::TooManyAttempts { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Database(_) if self.retry_would_wait() => StatusCode::SERVICE_UNAVAILABLE,
            Self::Config(_)
            | Self::Database(_)
            | Self::Sqlite(_)
            | Self::Migrate(_)
            | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code in the response body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::NotEnrolled => "not_enrolled",
            Self::NotFound => "not_found",
            Self::Gone(_) => "gone",
            Self::Conflict(_) => "conflict",
            Self::TooLarge { .. } => "payload_too_large",
            Self::Invalid(_) => "invalid",
            Self::BadRequest(_) => "bad_request",
            Self::TooManyAttempts { .. } => "too_many_attempts",
            Self::Unavailable => "unavailable",
            Self::Database(_) if self.retry_would_wait() => "unavailable",
            Self::Config(_)
            | Self::Database(_)
            | Self::Sqlite(_)
            | Self::Migrate(_)
            | Self::Internal(_) => "internal",
        }
    }

    /// Adds the headers this error's answer carries besides its body: `Retry-After` for
    /// [`Error::TooManyAttempts`]. Shared by the JSON answer and the dashboard's page.
    pub(crate) fn add_headers(&self, response: &mut Response) {
        if let Self::TooManyAttempts { retry_after_secs } = self {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*retry_after_secs).into());
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable | Self::Database(_) | Self::Sqlite(_) | Self::Internal(_)
        )
    }

    /// What a client is told, logging what it is not: a server error's detail (SQL, a
    /// connection's address) is logged and shown as "internal error", and a database that
    /// cannot answer now is logged as a warning and shown as such.
    pub(crate) fn client_message(&self) -> String {
        match self.status() {
            StatusCode::SERVICE_UNAVAILABLE if matches!(self, Self::Database(_)) => {
                tracing::warn!(error = %self, "the database could not answer in time");
                "the database is unreachable or busy; retry later".to_owned()
            }
            status if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE => {
                tracing::error!(error = %self, "request failed");
                "internal error".to_owned()
            }
            _ => self.to_string(),
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = self.client_message();
        let mut error = serde_json::json!({ "code": self.code(), "message": message });
        if let Self::Invalid(errors) = &self {
            error["details"] = serde_json::json!(errors.violations);
        }
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": error }))).into_response();
        self.add_headers(&mut response);
        response
    }
}

/// Whether `response` is one of axum's own rejections (a body over the transport limit, an
/// unreadable body, a malformed path): a client error in plain text. These are rewritten
/// into the `{"error": {"code", "message"}}` body every other error has, so clients and the
/// OpenAPI document can rely on one error shape.
pub(crate) fn is_plain_rejection(response: &Response) -> bool {
    response.status().is_client_error()
        && response
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/plain"))
}

/// The JSON form of a response [`is_plain_rejection`] picked.
pub(crate) async fn json_rejection(response: Response) -> Response {
    let status = response.status();
    let (mut parts, body) = response.into_parts();
    // Rejection texts are one short line; the cap only guards against a surprise.
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "bad_request",
    };
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let json = axum::Json(serde_json::json!({ "error": { "code": code, "message": text } }));
    (parts, json).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_told_from_refused_data() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(Error::Database(sqlx::Error::Io(refused)).retry_would_wait());
        assert!(Error::Database(sqlx::Error::PoolTimedOut).retry_would_wait());
        assert!(!Error::Database(sqlx::Error::RowNotFound).retry_would_wait());
        assert!(!Error::NotFound.retry_would_wait());
    }

    #[test]
    fn a_database_migrated_by_a_newer_version_is_named_as_such() {
        let text = Error::Migrate(sqlx::migrate::MigrateError::VersionMissing(99)).to_string();
        assert!(
            text.contains("the database has migration 99")
                && text.contains("a newer fleet-server has migrated it"),
            "{text}"
        );
        let text = Error::Migrate(sqlx::migrate::MigrateError::VersionMismatch(3)).to_string();
        assert!(text.contains("another build has migrated it"), "{text}");
    }
}
