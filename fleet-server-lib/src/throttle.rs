//! Slowing down the guessing of role tokens: after too many failed credential checks from
//! one client within a minute, that client's credentialed requests get 429 until the minute
//! is over, without the credentials being checked at all (a guess that happens to be right
//! must not be told apart from a wrong one, or the limit would not slow guessing).
//!
//! A client is the peer address of the connection, as the server's `ConnectInfo` gives it;
//! IPv6 addresses count by their /64 prefix, which one host usually holds whole. Behind a
//! reverse proxy every request comes from the proxy, so all clients share one allowance.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::Extensions;
use axum::http::request::Parts;

/// How long a client's count of failures lasts.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);

/// Most clients tracked at once; past it, windows that are over are dropped, and if every
/// one is still running the oldest goes, so a flood of addresses cannot grow the map.
const MAX_CLIENTS: usize = 10_000;

/// Failed credential checks per client, over fixed windows of [`WINDOW`].
pub(crate) struct AuthThrottle {
    limit: u32,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

#[derive(Clone, Copy)]
struct Window {
    started: Instant,
    failures: u32,
}

impl AuthThrottle {
    /// Allows `limit` failures per client and window; 0 turns the throttle off.
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// When the client may try again, if it has used up its failures.
    pub fn retry_after(&self, client: IpAddr, now: Instant) -> Option<Duration> {
        if self.limit == 0 {
            return None;
        }
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let window = clients.get(&client)?;
        let ends = window.started + WINDOW;
        (window.failures >= self.limit && now < ends).then(|| ends - now)
    }

    /// Counts a failed credential check of the client.
    pub fn failed(&self, client: IpAddr, now: Instant) {
        if self.limit == 0 {
            return;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            clients.retain(|_, w| now < w.started + WINDOW);
            if clients.len() >= MAX_CLIENTS
                && let Some(oldest) = clients.iter().min_by_key(|(_, w)| w.started)
            {
                let oldest = *oldest.0;
                clients.remove(&oldest);
            }
        }
        let window = clients.entry(client).or_insert(Window {
            started: now,
            failures: 0,
        });
        if now >= window.started + WINDOW {
            *window = Window {
                started: now,
                failures: 0,
            };
        }
        window.failures = window.failures.saturating_add(1);
    }
}

/// The client a request counts against: its peer address (IPv6 by /64), or the unspecified
/// address when the router is served without `ConnectInfo`, so that every such request
/// shares one allowance rather than none.
pub(crate) fn client_of(extensions: &Extensions) -> IpAddr {
    let Some(ConnectInfo(peer)) = extensions.get::<ConnectInfo<SocketAddr>>() else {
        return IpAddr::from([0, 0, 0, 0]);
    };
    match peer.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(Ipv6Addr::from(prefix))
            }
        },
        v4 => v4,
    }
}

/// The client a request counts against, as an extractor (see [`client_of`]).
pub(crate) struct Client(pub IpAddr);

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Self(client_of(&parts.extensions)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("address")
    }

    #[test]
    fn a_client_is_held_back_after_its_failures_until_the_window_ends() {
        let throttle = AuthThrottle::new(3);
        let start = Instant::now();
        for _ in 0..2 {
            throttle.failed(ip("10.0.0.1"), start);
        }
        assert_eq!(throttle.retry_after(ip("10.0.0.1"), start), None);
        throttle.failed(ip("10.0.0.1"), start);
        let later = start + Duration::from_secs(20);
        assert_eq!(
            throttle.retry_after(ip("10.0.0.1"), later),
            Some(Duration::from_secs(40))
        );
        // Another client keeps its own allowance.
        assert_eq!(throttle.retry_after(ip("10.0.0.2"), later), None);
        // The next window starts afresh.
        let next = start + WINDOW;
        assert_eq!(throttle.retry_after(ip("10.0.0.1"), next), None);
        throttle.failed(ip("10.0.0.1"), next);
        assert_eq!(throttle.retry_after(ip("10.0.0.1"), next), None);
    }

    #[test]
    fn zero_turns_the_throttle_off() {
        let throttle = AuthThrottle::new(0);
        let now = Instant::now();
        for _ in 0..100 {
            throttle.failed(ip("10.0.0.1"), now);
        }
        assert_eq!(throttle.retry_after(ip("10.0.0.1"), now), None);
    }

    #[test]
    fn the_map_of_clients_stays_bounded() {
        let throttle = AuthThrottle::new(1);
        let now = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 50) {
            throttle.failed(IpAddr::from(i.to_be_bytes()), now);
        }
        let clients = throttle.clients.lock().expect("lock");
        assert_eq!(clients.len(), MAX_CLIENTS);
        // The newest client is tracked: a flood does not open a way around the limit.
        let newest = IpAddr::from((MAX_CLIENTS as u32 + 49).to_be_bytes());
        assert!(clients.contains_key(&newest));
    }

    #[test]
    fn ipv6_clients_count_by_their_64_prefix() {
        let mut extensions = Extensions::new();
        let peer: SocketAddr = "[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443"
            .parse()
            .expect("peer");
        extensions.insert(ConnectInfo(peer));
        assert_eq!(client_of(&extensions), ip("2001:db8:1:2::"));
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:443".parse().expect("peer");
        extensions.insert(ConnectInfo(mapped));
        assert_eq!(client_of(&extensions), ip("192.0.2.7"));
        assert_eq!(client_of(&Extensions::new()), ip("0.0.0.0"));
    }
}
