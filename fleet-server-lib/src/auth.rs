//! Roles and who holds them.
//!
//! Three roles, each including the one below: `support` reads, `ops` also operates
//! (acknowledges alerts), `admin` may do everything. A caller proves a role with a token,
//! `Authorization: Bearer <token>` (API clients) or the ERP's `x-cp-admin-token` header
//! (admin), or with the session cookie `cp_token` that `/login` sets after checking a token
//! (browsers; see `sessions.rs`). The cookie holds a session id, never a token, and neither
//! is accepted in the other's place. Tokens are compared in constant time, and every
//! configured token is compared every time, so timing says nothing about which one matched.
//! A client that fails too many checks in a minute is held back (see `throttle.rs`).

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::header::{AUTHORIZATION, COOKIE, SET_COOKIE};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Redirect, Response};
use fleet_core::signing::constant_time_eq;
use serde::Serialize;

use crate::{AppState, Error, Shared};

/// A role, ordered: `Support < Ops < Admin`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything.
    Support = 0,
    /// Support, plus operating: acknowledging alerts.
    Ops = 1,
    /// Everything, including enrolling installations.
    Admin = 2,
}

impl Role {
    /// `support`, `ops` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Support => "support",
            Self::Ops => "ops",
            Self::Admin => "admin",
        }
    }

    /// Parses a role name.
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "support" => Self::Support,
            "ops" => Self::Ops,
            "admin" => Self::Admin,
            _ => return None,
        })
    }

    fn from_level(level: u8) -> Self {
        match level {
            0 => Self::Support,
            1 => Self::Ops,
            _ => Self::Admin,
        }
    }
}

/// The token of each role (`CONTROL_PLANE_{SUPPORT,OPS,ADMIN}_TOKEN`). A role without a
/// token cannot be used. `Debug` never prints a token.
#[derive(Clone, Default)]
pub struct RoleTokens {
    /// Token of the `support` role.
    pub support: Option<String>,
    /// Token of the `ops` role.
    pub ops: Option<String>,
    /// Token of the `admin` role.
    pub admin: Option<String>,
}

impl std::fmt::Debug for RoleTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = |t: &Option<String>| t.as_ref().map(|_| "[redacted]");
        f.debug_struct("RoleTokens")
            .field("support", &shown(&self.support))
            .field("ops", &shown(&self.ops))
            .field("admin", &shown(&self.admin))
            .finish()
    }
}

impl RoleTokens {
    /// `role`'s token, unless it has none.
    pub(crate) fn token(&self, role: Role) -> Option<&str> {
        match role {
            Role::Support => self.support.as_deref(),
            Role::Ops => self.ops.as_deref(),
            Role::Admin => self.admin.as_deref(),
        }
        .filter(|t| !t.is_empty())
    }

    /// Whether `presented` is `role`'s token (constant time).
    pub fn matches(&self, role: Role, presented: &str) -> bool {
        self.token(role)
            .is_some_and(|t| constant_time_eq(t.as_bytes(), presented.as_bytes()))
    }

    /// The highest role whose token is `presented`.
    pub fn role_of(&self, presented: &str) -> Option<Role> {
        let mut found = None;
        // No early exit: all three comparisons always run.
        for role in [Role::Support, Role::Ops, Role::Admin] {
            if self.matches(role, presented) {
                found = Some(role);
            }
        }
        found
    }

    /// The role the request's token proves, if any: a Bearer token or the ERP's admin
    /// header. The session cookie is not a token and is not looked at here.
    pub fn caller(&self, headers: &HeaderMap) -> Option<Role> {
        let mut best: Option<Role> = None;
        if let Some(token) = header(headers, AUTHORIZATION.as_str())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
        {
            best = best.max(self.role_of(token));
        }
        if let Some(token) = header(headers, "x-cp-admin-token")
            && self.matches(Role::Admin, token.trim())
        {
            best = Some(Role::Admin);
        }
        best
    }
}

/// The cookie holding a browser's session id (the ERP's name for its login cookie).
const SESSION_COOKIE: &str = "cp_token";

/// The cookie in which the ERP, and this control plane before sessions, named the role of
/// the token in `cp_token`. No longer set or read; cleared with the session cookie, so a
/// browser from before the upgrade is left with nothing stale.
const LEGACY_ROLE_COOKIE: &str = "cp_role";

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// The value of cookie `name`, percent-decoded (browsers and the ERP's Next.js encode them).
pub(crate) fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
}

pub(crate) fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = text.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub(crate) use fleet_core::percent_encode;

/// An API caller holding at least role level `MIN` (0 support, 1 ops, 2 admin). Without
/// credentials: 401; with a lower role: 403.
#[derive(Debug, Clone, Copy)]
pub struct Authed<const MIN: u8>(pub Role);

/// At least `support`.
pub type Support = Authed<0>;
/// At least `ops`.
pub type Ops = Authed<1>;
/// `admin`.
pub type Admin = Authed<2>;

/// Whether the request carries anything that claims a role: a Bearer token, the ERP's
/// admin header or the session cookie. Only such requests are checked, and only their
/// failures count towards the client's limit.
fn presents_credentials(headers: &HeaderMap) -> bool {
    header(headers, AUTHORIZATION.as_str()).is_some_and(|v| v.starts_with("Bearer "))
        || headers.contains_key("x-cp-admin-token")
        || has_login_cookie(headers)
}

/// The role the request's credentials prove (`None` without credentials or with wrong
/// ones: an unknown, expired or ended session is wrong too), or [`Error::TooManyAttempts`]
/// when the client used up its failed checks: then the credentials are not looked at. A
/// failed check counts against the client. A store that cannot look the session up is the
/// store's error, not a failed check.
pub(crate) async fn caller_of(state: &AppState, parts: &Parts) -> Result<Option<Role>, Error> {
    if !presents_credentials(&parts.headers) {
        return Ok(None);
    }
    let client = crate::throttle::client_of(parts, &state.settings);
    attempt(state, client, async {
        let mut best = state.tokens.caller(&parts.headers);
        if let Some(id) = session_id(&parts.headers) {
            let now = fleet_core::unix_now();
            best = best.max(crate::sessions::role_of(state, &id, now).await?);
        }
        Ok(best)
    })
    .await
}

/// Runs one credential check for `client` under its limit (see [`crate::throttle`]); the
/// check does not start when the client is held back.
pub(crate) async fn attempt(
    state: &AppState,
    client: std::net::IpAddr,
    check: impl Future<Output = Result<Option<Role>, Error>>,
) -> Result<Option<Role>, Error> {
    let now = std::time::Instant::now();
    if let Some(wait) = state.auth_throttle.retry_after(client, now) {
        let retry_after_secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        return Err(Error::TooManyAttempts { retry_after_secs });
    }
    let role = check.await?;
    if role.is_none() {
        state.auth_throttle.failed(client, now);
        // The address is the operator's lead; the presented token or session id is never
        // logged.
        tracing::info!(%client, "role token or session refused");
    }
    Ok(role)
}

impl<const MIN: u8> FromRequestParts<Shared> for Authed<MIN> {
    type Rejection = Error;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        match caller_of(state, parts).await? {
            None => Err(Error::Unauthorized),
            Some(role) if role < Role::from_level(MIN) => Err(Error::Forbidden),
            Some(role) => Ok(Self(role)),
        }
    }
}

/// A dashboard viewer holding at least role level `MIN`. Without credentials the browser
/// is sent to `/login`; with a lower role it gets a 403 page.
#[derive(Debug, Clone, Copy)]
pub struct Viewer<const MIN: u8>(pub Role);

impl<const MIN: u8> FromRequestParts<Shared> for Viewer<MIN> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        let caller = caller_of(state, parts)
            .await
            .map_err(crate::dashboard::error_page)?;
        match caller {
            // A stale session cookie is dropped by the login page, which says why.
            None => Err(Redirect::to("/login").into_response()),
            Some(role) if role < Role::from_level(MIN) => Err(crate::dashboard::forbidden_page()),
            Some(role) => Ok(Self(role)),
        }
    }
}

/// The `Set-Cookie` value that gives a browser its session. No `Max-Age`: the browser
/// forgets it when it closes, and the server refuses it once the session expired.
pub(crate) fn login_cookie(session_id: &str, secure: bool) -> String {
    // Hex: no character of the id needs encoding in a cookie.
    format!("{SESSION_COOKIE}={session_id}; {}", cookie_attrs(secure))
}

/// The session id the request's cookie holds (valid or not).
pub(crate) fn session_id(headers: &HeaderMap) -> Option<String> {
    cookie(headers, SESSION_COOKIE)
}

/// Whether the request carries the session cookie (valid or not).
pub(crate) fn has_login_cookie(headers: &HeaderMap) -> bool {
    session_id(headers).is_some()
}

/// Adds the `Set-Cookie` headers that log a browser out to `response`.
pub(crate) fn clear_login_cookies(response: &mut Response, secure: bool) {
    for c in logout_cookies(secure) {
        if let Ok(value) = c.parse() {
            response.headers_mut().append(SET_COOKIE, value);
        }
    }
}

/// `Set-Cookie` values that log a browser out.
fn logout_cookies(secure: bool) -> [String; 2] {
    let attrs = cookie_attrs(secure);
    [
        format!("{LEGACY_ROLE_COOKIE}=; {attrs}; Max-Age=0"),
        format!("{SESSION_COOKIE}=; {attrs}; Max-Age=0"),
    ]
}

fn cookie_attrs(secure: bool) -> &'static str {
    // HttpOnly: scripts cannot read the session id. SameSite=Strict: other sites cannot make
    // the browser send it, which is what protects the dashboard's POST forms.
    if secure {
        "Path=/; HttpOnly; SameSite=Strict; Secure"
    } else {
        "Path=/; HttpOnly; SameSite=Strict"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> RoleTokens {
        RoleTokens {
            support: Some("sup".into()),
            ops: Some("ops-token".into()),
            admin: Some("adm".into()),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().expect("header value"));
        }
        h
    }

    #[test]
    fn bearer_and_admin_header_but_never_a_cookie() {
        let t = tokens();
        assert_eq!(
            t.caller(&headers(&[("authorization", "Bearer ops-token")])),
            Some(Role::Ops)
        );
        assert_eq!(
            t.caller(&headers(&[("x-cp-admin-token", "adm")])),
            Some(Role::Admin)
        );
        assert_eq!(t.caller(&headers(&[("x-cp-admin-token", "sup")])), None);
        // A role token in the cookie, as this control plane set it before sessions, is not
        // a token here: the cookie holds a session id, looked up elsewhere.
        assert_eq!(
            t.caller(&headers(&[(
                "cookie",
                "a=b; cp_role=ops; cp_token=ops%2Dtoken"
            )])),
            None
        );
        assert_eq!(
            t.caller(&headers(&[("authorization", "Bearer nope")])),
            None
        );
    }

    #[test]
    fn unset_roles_never_match() {
        let t = RoleTokens {
            admin: Some("adm".into()),
            ..Default::default()
        };
        assert_eq!(t.role_of(""), None);
        assert!(!format!("{t:?}").contains("adm\""));
    }

    #[test]
    fn percent_round_trip() {
        let raw = "a b;c=d/é";
        assert_eq!(percent_decode(&percent_encode(raw)), raw);
    }
}
