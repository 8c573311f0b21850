//! Dashboard sessions: what the login cookie stands for.
//!
//! `/login` checks a role token once and gives the browser a random session id in its place,
//! so the cookie is never the long-lived role token: a stolen cookie is not a Bearer token,
//! `/logout` revokes it, and it expires (`Settings::session_lifetime`). The store keeps the
//! id's SHA-256 only, and a session is found by that hash (no secret is compared byte by
//! byte, so timing says nothing about it). A session proves its role only while the role's
//! current token is the one it was created with: rotating a token and restarting logs out
//! every browser of that role.

use sha2::{Digest, Sha256};

use crate::auth::Role;
use crate::store::DashboardSession;
use crate::{AppState, Error, Result};

/// Random bytes in a session id: 256 bits, far past guessing.
const ID_BYTES: usize = 32;

/// Starts a session for `role`, proven with `token` at `now`, and returns its id, which only
/// the browser keeps.
pub(crate) async fn start(state: &AppState, role: Role, token: &str, now: i64) -> Result<String> {
    let mut bytes = [0u8; ID_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| Error::Internal(format!("no randomness: {e}")))?;
    let id = hex::encode(bytes);
    let lifetime = i64::try_from(state.settings.session_lifetime.as_secs()).unwrap_or(i64::MAX);
    let session = DashboardSession {
        id_hash: id_hash(&id),
        role: role.as_str().to_owned(),
        token_fingerprint: token_fingerprint(&id, token),
        created_at: now,
        expires_at: now.saturating_add(lifetime),
    };
    state.store.create_session(&session).await?;
    Ok(id)
}

/// The role the session `id` proves at `now`: `None` when there is no such session, it
/// expired, or its role's token is no longer the one it was created with.
pub(crate) async fn role_of(state: &AppState, id: &str, now: i64) -> Result<Option<Role>> {
    let Some(session) = state.store.session(&id_hash(id), now).await? else {
        return Ok(None);
    };
    let Some(role) = Role::parse(&session.role) else {
        return Ok(None);
    };
    let current = state
        .tokens
        .token(role)
        .map(|token| token_fingerprint(id, token));
    let unchanged = current.is_some_and(|fingerprint| {
        fleet_core::signing::constant_time_eq(
            fingerprint.as_bytes(),
            session.token_fingerprint.as_bytes(),
        )
    });
    Ok(unchanged.then_some(role))
}

/// Ends the session `id`, if there is one.
pub(crate) async fn end(state: &AppState, id: &str) -> Result<()> {
    state.store.delete_session(&id_hash(id)).await
}

/// The key a session is stored under: the hex SHA-256 of its id.
fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

/// What ties a session to the role token it was created with. Keyed with the session id,
/// which the database does not hold: a plain hash of the token would let a copy of the
/// database test guesses at the token offline.
fn token_fingerprint(id: &str, token: &str) -> String {
    let mut hasher = Sha256::new();
    // Lengths first, so no other (id, token) pair gives the same bytes to hash.
    for part in [id.as_bytes(), token.as_bytes()] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fingerprint_depends_on_the_session_and_the_token() {
        let base = token_fingerprint("session-a", "token");
        assert_ne!(base, token_fingerprint("session-b", "token"));
        assert_ne!(base, token_fingerprint("session-a", "token2"));
        // The boundary between id and token counts.
        assert_ne!(token_fingerprint("ab", "c"), token_fingerprint("a", "bc"));
        assert_eq!(base, token_fingerprint("session-a", "token"));
    }

    #[test]
    fn the_stored_key_is_not_the_id() {
        let id = "0123abcd";
        assert_ne!(id_hash(id), id);
        assert_eq!(id_hash(id).len(), 64);
    }
}
