//! Slowing down the guessing of role tokens: after too many failed credential checks from
//! one client within a minute, that client's credentialed requests get 429 until the minute
//! is over, without the credentials being checked at all (a guess that happens to be right
//! must not be told apart from a wrong one, or the limit would not slow guessing).
//!
//! A client is the peer address of the connection, as the server's `ConnectInfo` gives it.
//! When the peer is a trusted proxy (`Settings::trusted_proxies`), the client is the
//! rightmost address that is not a trusted proxy in the header the proxies write
//! (`Settings::proxy_header`: `X-Forwarded-For`, or `Forwarded` of RFC 7239): entries
//! further left were written by the client itself and prove nothing. Only the configured
//! header is read, because the other one passes through a proxy untouched and says whatever
//! the client wrote. IPv6 addresses count by their /64 prefix, which one host usually holds
//! whole. Behind a proxy that is not trusted, every request comes from the proxy, so all
//! clients share one allowance.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;

use crate::{Settings, Shared};

/// How long a client's count of failures lasts.
const WINDOW: Duration = Duration::from_secs(60);

/// Most clients tracked at once; past it, windows that are over are dropped, and if every
/// one is still running the oldest goes, so a flood of addresses cannot grow the map.
const MAX_CLIENTS: usize = 10_000;

/// How often a process adds its clients' new failures to the count the replicas share.
const SHARE_INTERVAL: Duration = Duration::from_secs(1);

/// Failed credential checks per client, over fixed windows of [`WINDOW`].
pub(crate) struct AuthThrottle {
    limit: u32,
    clients: Mutex<HashMap<IpAddr, Window>>,
}

struct Window {
    started: Instant,
    failures: u32,
    /// Failures not yet added to the count the replicas share (they outlive the window).
    unshared: u64,
    /// Held back until then whatever this process counted: the replicas sharing the
    /// database counted the client's failures past the limit together.
    held_until: Option<Instant>,
}

impl Window {
    fn starting(now: Instant) -> Self {
        Self {
            started: now,
            failures: 0,
            unshared: 0,
            held_until: None,
        }
    }

    fn is_over(&self, now: Instant) -> bool {
        now >= self.started + WINDOW && self.held_until.is_none_or(|until| now >= until)
    }
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
        self.held_until(window, now).map(|until| until - now)
    }

    /// Until when `window`'s client is held back, if it is at `now`.
    fn held_until(&self, window: &Window, now: Instant) -> Option<Instant> {
        let ends = window.started + WINDOW;
        let counted = (window.failures >= self.limit && now < ends).then_some(ends);
        let held = window.held_until.filter(|until| now < *until);
        counted.max(held)
    }

    /// Counts a failed credential check of the client, here and (at the next share) in the
    /// count the replicas keep together.
    pub fn failed(&self, client: IpAddr, now: Instant) {
        self.update(client, now, |window| {
            window.failures = window.failures.saturating_add(1);
            window.unshared += 1;
        });
    }

    /// What to share, in client order: each client's failures since the last share.
    fn to_share(&self) -> Vec<(IpAddr, u64)> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        let mut share: Vec<(IpAddr, u64)> = clients
            .iter_mut()
            .filter(|(_, window)| window.unshared > 0)
            .map(|(client, window)| (*client, std::mem::take(&mut window.unshared)))
            .collect();
        share.sort_unstable();
        share
    }

    /// Holds the client back until `until`, whatever this process counted.
    pub fn hold(&self, client: IpAddr, now: Instant, until: Instant) {
        self.update(client, now, |window| {
            window.held_until = window.held_until.max(Some(until));
        });
    }

    fn update(&self, client: IpAddr, now: Instant, change: impl FnOnce(&mut Window)) {
        if self.limit == 0 {
            return;
        }
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.len() >= MAX_CLIENTS && !clients.contains_key(&client) {
            clients.retain(|_, w| !w.is_over(now));
            if clients.len() >= MAX_CLIENTS
                && let Some(oldest) = clients.iter().min_by_key(|(_, w)| w.started)
            {
                let oldest = *oldest.0;
                clients.remove(&oldest);
            }
        }
        let window = clients
            .entry(client)
            .or_insert_with(|| Window::starting(now));
        if now >= window.started + WINDOW {
            (window.started, window.failures) = (now, 0);
        }
        change(window);
    }
}

/// Shares this process's failed checks with the replicas on the same database, once a
/// second until the control plane is dropped: the new failures of each client are added to
/// the store's count for the current minute, in one transaction whatever their number; then
/// every client whose count reached the limit is held back here until the minute ends,
/// including clients that never failed here. So a guesser spread over N replicas gets about
/// one allowance, not N, and moving to another replica does not start a new one. A flood of
/// failures costs the database one transaction a second, and each replica reads the
/// clients held back once a second. When the database does not answer, each process's own
/// count still applies.
pub(crate) fn spawn_sharing(state: std::sync::Weak<crate::AppState>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SHARE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Warn when sharing starts failing, not at every second it goes on failing.
        let mut failing = false;
        loop {
            tick.tick().await;
            let Some(state) = state.upgrade() else { return };
            let throttle = &state.auth_throttle;
            if throttle.limit == 0 {
                return;
            }
            let unix = fleet_core::unix_now();
            let minute = unix - unix.rem_euclid(60);
            match share_once(&state, minute).await {
                Ok(held) => {
                    if failing {
                        tracing::info!(
                            "sharing failed role-token checks with the replicas works again"
                        );
                        failing = false;
                    }
                    let now = Instant::now();
                    let until = now + Duration::from_secs((minute + 60 - unix).max(0) as u64);
                    for client in held {
                        throttle.hold(client, now, until);
                    }
                }
                Err(err) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = %err,
                        "sharing failed role-token checks with the replicas failed; each process's count applies"
                    );
                }
                Err(_) => {}
            }
        }
    });
}

/// Adds this process's new failures to the shared count of `minute`, then reads which
/// clients the replicas together counted past the limit. In client order, the same for
/// every replica, so that two sharing at once wait for each other instead of deadlocking on
/// each other's rows.
async fn share_once(state: &crate::AppState, minute: i64) -> crate::Result<Vec<IpAddr>> {
    let throttle = &state.auth_throttle;
    let failures: Vec<(String, u64)> = throttle
        .to_share()
        .into_iter()
        .map(|(client, n)| (client.to_string(), n))
        .collect();
    if !failures.is_empty() {
        state.store.count_auth_failures(minute, &failures).await?;
    }
    let held = state
        .store
        .clients_over_auth_limit(minute, u64::from(throttle.limit), MAX_CLIENTS)
        .await?;
    // Addresses are written by `IpAddr`'s `Display`; anything else is not ours to act on.
    Ok(held.iter().filter_map(|c| c.parse().ok()).collect())
}

/// The header in which trusted reverse proxies name the client they forward for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyHeader {
    /// `X-Forwarded-For: client, proxy1, …`, as nginx, HAProxy and most load balancers
    /// write it.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1, …` (RFC 7239); quoted IPv6 addresses and ports
    /// (`for="[2001:db8::1]:4711"`) are understood.
    Forwarded,
}

impl ProxyHeader {
    fn name(self) -> &'static str {
        match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        }
    }

    /// The address of one comma-separated entry of the header, `None` when it names none
    /// (`unknown`, an obfuscated name, anything malformed).
    fn address_of(self, entry: &str) -> Option<IpAddr> {
        match self {
            Self::XForwardedFor => entry.trim().parse().ok(),
            Self::Forwarded => forwarded_for(entry),
        }
    }
}

/// The `for` parameter of one `Forwarded` element (`for=192.0.2.1;proto=https`) as an
/// address. Splitting the header at commas without reading its quoted strings is on
/// purpose: a client could open a quote that swallows the entries the proxies append, and
/// no address contains a comma.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let value = element.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if let Some(bracketed) = node.strip_prefix('[') {
        let (v6, port) = bracketed.split_once(']')?;
        if !(port.is_empty() || port.starts_with(':')) {
            return None;
        }
        return v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let host = node.split_once(':').map_or(node, |(host, _port)| host);
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

/// The client a request counts against: its peer address, or behind trusted proxies the
/// address they forwarded (see the module's documentation), IPv6 by /64. Served without
/// `ConnectInfo`, every request is the unspecified address, so that all share one allowance
/// rather than none.
pub(crate) fn client_of(parts: &Parts, settings: &Settings) -> IpAddr {
    let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() else {
        return IpAddr::from([0, 0, 0, 0]);
    };
    let (trusted, header) = (&settings.trusted_proxies, settings.proxy_header);
    let is_trusted = |addr: &IpAddr| trusted.iter().any(|net| net.contains(addr));
    let mut client = canonical(peer.ip());
    if is_trusted(&client) {
        // Later proxies append, so the last entry is the one the trusted peer wrote.
        let forwarded = parts.headers.get_all(header.name()).iter().rev();
        'hops: for value in forwarded {
            let Ok(value) = value.to_str() else { break };
            for entry in value.rsplit(',') {
                // An entry that is not an address ends the walk at the last hop trusted.
                let Some(addr) = header.address_of(entry) else {
                    break 'hops;
                };
                client = canonical(addr);
                if !is_trusted(&client) {
                    break 'hops;
                }
            }
        }
    }
    match client {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        v4 => v4,
    }
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// The client a request counts against, as an extractor (see [`client_of`]).
pub(crate) struct Client(pub IpAddr);

impl FromRequestParts<Shared> for Client {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Shared,
    ) -> Result<Self, Self::Rejection> {
        Ok(Self(client_of(parts, &state.settings)))
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
    fn a_hold_from_the_shared_count_lasts_until_it_ends_whatever_was_counted_here() {
        let throttle = AuthThrottle::new(3);
        let start = Instant::now();
        throttle.failed(ip("10.0.0.1"), start);
        throttle.hold(ip("10.0.0.1"), start, start + Duration::from_secs(90));
        assert_eq!(
            throttle.retry_after(ip("10.0.0.1"), start + Duration::from_secs(70)),
            Some(Duration::from_secs(20)),
            "the hold outlasts this process's own window"
        );
        assert_eq!(
            throttle.retry_after(ip("10.0.0.1"), start + Duration::from_secs(90)),
            None
        );
        assert_eq!(throttle.retry_after(ip("10.0.0.2"), start), None);
    }

    #[test]
    fn what_is_shared_is_each_clients_failures_since_the_last_share() {
        let throttle = AuthThrottle::new(3);
        let start = Instant::now();
        throttle.failed(ip("10.0.0.2"), start);
        throttle.failed(ip("10.0.0.1"), start);
        throttle.failed(ip("10.0.0.1"), start);
        assert_eq!(
            throttle.to_share(),
            [(ip("10.0.0.1"), 2), (ip("10.0.0.2"), 1)],
            "in client order"
        );
        assert!(throttle.to_share().is_empty(), "nothing new");
        throttle.failed(ip("10.0.0.1"), start + WINDOW);
        assert_eq!(
            throttle.to_share(),
            [(ip("10.0.0.1"), 1)],
            "a new window's failure"
        );
        // A hold from the shared count is not a failure of this process.
        throttle.hold(ip("10.0.0.3"), start, start + WINDOW);
        assert!(throttle.to_share().is_empty());
        assert!(AuthThrottle::new(0).to_share().is_empty());
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

    /// The parts of a request from `peer` with these headers.
    fn request(peer: &str, headers: &[(&str, &str)]) -> Parts {
        let mut builder = axum::http::Request::builder();
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (mut parts, ()) = builder.body(()).expect("request").into_parts();
        let peer: SocketAddr = peer.parse().expect("peer");
        parts.extensions.insert(ConnectInfo(peer));
        parts
    }

    /// A request from `peer` with these `X-Forwarded-For` headers.
    fn forwarded_for(peer: &str, values: &[&str]) -> Parts {
        let headers: Vec<_> = values.iter().map(|v| ("x-forwarded-for", *v)).collect();
        request(peer, &headers)
    }

    /// Settings trusting the proxies in `networks`, which write `header`.
    fn behind(networks: &[&str], header: ProxyHeader) -> Settings {
        Settings {
            trusted_proxies: networks.iter().map(|n| n.parse().expect("net")).collect(),
            proxy_header: header,
            ..Settings::default()
        }
    }

    #[test]
    fn ipv6_clients_count_by_their_64_prefix() {
        let direct = Settings::default();
        let v6 = request("[2001:db8:1:2:aaaa:bbbb:cccc:dddd]:443", &[]);
        assert_eq!(client_of(&v6, &direct), ip("2001:db8:1:2::"));
        let mapped = request("[::ffff:192.0.2.7]:443", &[]);
        assert_eq!(client_of(&mapped, &direct), ip("192.0.2.7"));
        let (unserved, ()) = axum::http::Request::new(()).into_parts();
        assert_eq!(client_of(&unserved, &direct), ip("0.0.0.0"));
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_last_address_they_did_not_write() {
        let trusted = behind(&["10.0.0.0/8"], ProxyHeader::XForwardedFor);
        // The client wrote 1.1.1.1 itself; the proxies saw 203.0.113.9 and 10.0.0.7.
        let chain = forwarded_for("10.0.0.2:80", &["1.1.1.1, 203.0.113.9", "10.0.0.7"]);
        assert_eq!(client_of(&chain, &trusted), ip("203.0.113.9"));
        // A peer that is not trusted cannot choose its address.
        let direct = forwarded_for("198.51.100.4:80", &["203.0.113.9"]);
        assert_eq!(client_of(&direct, &trusted), ip("198.51.100.4"));
        // Without proxies configured the header means nothing.
        let untrusted = forwarded_for("10.0.0.2:80", &["203.0.113.9"]);
        assert_eq!(client_of(&untrusted, &Settings::default()), ip("10.0.0.2"));
        // An entry that is not an address stops the walk at the last trusted hop.
        let garbled = forwarded_for("10.0.0.2:80", &["203.0.113.9, unknown, 10.0.0.7"]);
        assert_eq!(client_of(&garbled, &trusted), ip("10.0.0.7"));
        // The proxy's own requests count as the proxy.
        let own = forwarded_for("10.0.0.2:80", &[]);
        assert_eq!(client_of(&own, &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn proxies_writing_the_standard_forwarded_header_are_read_the_same_way() {
        let trusted = behind(&["10.0.0.0/8", "fd00::/8"], ProxyHeader::Forwarded);
        let from = |forwarded: &[&str]| {
            let headers: Vec<_> = forwarded.iter().map(|v| ("forwarded", *v)).collect();
            client_of(&request("10.0.0.2:80", &headers), &trusted)
        };
        // Parameters in any order and case, quoted addresses with ports, IPv6 in brackets.
        assert_eq!(
            from(&[
                "for=1.1.1.1, proto=https;FOR=\"203.0.113.9:4711\"",
                "for=10.0.0.7"
            ]),
            ip("203.0.113.9")
        );
        assert_eq!(
            from(&["for=\"[2001:db8:cafe::17]:4711\";by=10.0.0.7, for=\"[fd00::1]\""]),
            ip("2001:db8:cafe::"),
        );
        // `unknown`, an obfuscated name, an element without `for`, and IPv6 without its
        // brackets name no address: the walk stops at the last trusted hop.
        for stop in [
            "for=unknown",
            "for=_hidden",
            "proto=https",
            "for=2001:db8::1",
        ] {
            assert_eq!(
                from(&[&format!("for=203.0.113.9, {stop}, for=10.0.0.7")]),
                ip("10.0.0.7"),
                "{stop}"
            );
        }
        // A quote the client opened cannot swallow what the proxies appended.
        assert_eq!(from(&["for=\"1.1.1.1, for=203.0.113.9"]), ip("203.0.113.9"));
        // Only the configured header counts: the other passes through proxies untouched.
        let spoofed = request(
            "10.0.0.2:80",
            &[
                ("x-forwarded-for", "192.0.2.1"),
                ("forwarded", "for=203.0.113.9"),
            ],
        );
        assert_eq!(client_of(&spoofed, &trusted), ip("203.0.113.9"));
        let legacy = behind(&["10.0.0.0/8"], ProxyHeader::XForwardedFor);
        assert_eq!(client_of(&spoofed, &legacy), ip("192.0.2.1"));
    }
}
