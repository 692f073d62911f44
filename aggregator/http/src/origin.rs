//! Where users' servers are served: an origin of each user's own
//! (`--user-origin`, e.g. `http://{user}.localhost:{port}` or
//! `https://{user}.users.kcloud.example.org`), never the portal's. A page a server
//! serves then runs on its owner's origin, where the portal's and the API's cookies
//! do not exist, so it cannot act with the API as whoever opens it.
//!
//! Also who the client is behind trusted reverse proxies (`--trusted-proxies`).

use std::net::IpAddr;

use axum::extract::ConnectInfo;
use axum::http::{Extensions, HeaderMap, Uri, header};
use ipnet::IpNet;

use kcloud_core::validate::is_dns_label;
use kcloud_core::{Error, Result};

use crate::listener::Connection;

/// The pattern of users' origins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserOrigins {
    https: bool,
    /// What follows `{user}` in the host name, with its leading dot.
    suffix: String,
    port: Port,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Port {
    /// None given: the scheme's default.
    Default,
    /// `{port}`: the port the request came in on (one listener serves every origin).
    Request,
    Fixed(u16),
}

impl UserOrigins {
    /// Parses `scheme://{user}.rest[:port]`, where port is a number or `{port}`.
    pub fn parse(pattern: &str) -> Result<UserOrigins> {
        let bad = |why: &str| {
            Error::Config(format!(
                "--user-origin {pattern:?}: {why} (e.g. http://{{user}}.localhost:{{port}} or \
                 https://{{user}}.users.example.org)"
            ))
        };
        let (https, rest) = if let Some(r) = pattern.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = pattern.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let host = rest
            .strip_prefix("{user}.")
            .ok_or_else(|| bad("the host must start with {user}."))?;
        let (host, port) = match host.rsplit_once(':') {
            Some((h, "{port}")) => (h, Port::Request),
            Some((h, p)) => (
                h,
                Port::Fixed(p.parse().map_err(|_| bad("the port is not a number"))?),
            ),
            None => (host, Port::Default),
        };
        let ok_host = !host.is_empty()
            && host.len() <= 200
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !ok_host {
            return Err(bad("not a host name after {user}."));
        }
        Ok(UserOrigins {
            https,
            suffix: format!(".{}", host.to_ascii_lowercase()),
            port,
        })
    }

    /// Served over TLS: cookies there are `Secure` and `__Host-` prefixed.
    pub fn secure(&self) -> bool {
        self.https
    }

    /// The user whose origin a request addressed (its `Host`), if any.
    pub fn user_of(&self, authority: &str) -> Option<String> {
        let (host, port) = split_authority(authority)?;
        let host = host.to_ascii_lowercase();
        let user = host.strip_suffix(&self.suffix)?;
        if !is_dns_label(user) {
            return None;
        }
        let port_ok = match self.port {
            Port::Request => true,
            Port::Fixed(p) => port == Some(p),
            Port::Default => port.is_none() || port == Some(if self.https { 443 } else { 80 }),
        };
        port_ok.then(|| user.to_owned())
    }

    /// `user`'s origin, for a request that came in on `request_port`.
    pub fn origin(&self, user: &str, request_port: Option<u16>) -> String {
        let scheme = if self.https { "https" } else { "http" };
        let port = match self.port {
            Port::Default => None,
            Port::Fixed(p) => Some(p),
            Port::Request => request_port,
        };
        match port {
            Some(p) => format!("{scheme}://{user}{}:{p}", self.suffix),
            None => format!("{scheme}://{user}{}", self.suffix),
        }
    }
}

/// The authority a request addressed: `Host`, else the URI's (HTTP/2), else, from a
/// trusted proxy only, `X-Forwarded-Host`.
pub fn authority(headers: &HeaderMap, uri: &Uri, from_trusted_proxy: bool) -> Option<String> {
    let header_str = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if from_trusted_proxy && let Some(h) = header_str("x-forwarded-host") {
        return h.split(',').next().map(|h| h.trim().to_owned());
    }
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.as_str().to_owned()))
}

/// Whether the request's peer (its connection) is one of the trusted reverse proxies.
pub fn from_trusted_proxy(extensions: &Extensions, trusted: &[IpNet]) -> bool {
    extensions
        .get::<ConnectInfo<Connection>>()
        .is_some_and(|c| is_trusted(c.0.addr.ip(), trusted))
}

/// The port the client addressed, from the authority (a `{port}` user origin is on the
/// same one).
pub fn request_port(
    headers: &HeaderMap,
    uri: &Uri,
    extensions: &Extensions,
    trusted: &[IpNet],
) -> Option<u16> {
    authority(headers, uri, from_trusted_proxy(extensions, trusted))
        .as_deref()
        .and_then(split_authority)
        .and_then(|(_, p)| p)
}

/// `(host, port)` of `host[:port]` or `[v6]:port`.
pub fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => Some((h, Some(p.parse().ok()?))),
        None => Some((authority, None)),
    }
}

/// The client behind `peer`: the rightmost `X-Forwarded-For` address that is not a
/// trusted proxy, when `peer` itself is one; otherwise `peer` (a forwarded header from
/// anyone else says nothing).
pub fn client_addr(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| is_trusted(*ip, trusted);
    if !is_trusted(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    forwarded
        .iter()
        .rev()
        .find(|ip| !is_trusted(ip))
        // Every hop trusted: the first one is as close to the client as we know.
        .or(forwarded.first())
        .copied()
        .unwrap_or(peer)
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&canonical(ip)))
}

/// IPv4-mapped IPv6 addresses as IPv4, so that one rule covers both.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_parse_and_match() {
        let local = UserOrigins::parse("http://{user}.localhost:{port}").unwrap();
        assert_eq!(
            local.user_of("alice.localhost:8080").as_deref(),
            Some("alice")
        );
        assert_eq!(local.user_of("Alice.LOCALHOST:1").as_deref(), Some("alice"));
        for not_a_user in [
            "localhost:8080",
            "127.0.0.1:8080",
            "a.b.localhost:8080",
            "-x.localhost:80",
            "alice.localhost.evil.org:80",
            "alice.localhostx:80",
            "[::1]:8080",
        ] {
            assert_eq!(local.user_of(not_a_user), None, "{not_a_user}");
        }
        assert_eq!(local.origin("bob", Some(9000)), "http://bob.localhost:9000");
        assert!(!local.secure());

        let cluster = UserOrigins::parse("https://{user}.users.kcloud.example.org").unwrap();
        assert_eq!(
            cluster.user_of("carol.users.kcloud.example.org").as_deref(),
            Some("carol")
        );
        assert_eq!(
            cluster
                .user_of("carol.users.kcloud.example.org:443")
                .as_deref(),
            Some("carol")
        );
        assert_eq!(cluster.user_of("carol.users.kcloud.example.org:8443"), None);
        assert_eq!(cluster.user_of("kcloud.example.org"), None);
        assert_eq!(
            cluster.origin("carol", Some(8080)),
            "https://carol.users.kcloud.example.org"
        );
        assert!(cluster.secure());

        let fixed = UserOrigins::parse("http://{user}.lab.test:8443/").unwrap();
        assert_eq!(fixed.user_of("d.lab.test:8443").as_deref(), Some("d"));
        assert_eq!(fixed.user_of("d.lab.test:8080"), None);

        for bad in [
            "{user}.localhost",
            "ftp://{user}.x",
            "http://x.{user}.localhost",
            "http://{user}",
            "http://{user}.",
            "http://{user}.a..b",
            "http://{user}.x:port",
            "http://{user}.x/path",
        ] {
            assert!(UserOrigins::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn clients_behind_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("x-forwarded-for", v.parse().unwrap());
            m
        };
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_addr(ip("192.0.2.1"), &h("203.0.113.9"), &trusted),
            ip("192.0.2.1")
        );
        // Rightmost untrusted address, skipping the trusted hops.
        assert_eq!(
            client_addr(
                ip("10.1.1.1"),
                &h("198.51.100.7, 203.0.113.9, 10.2.2.2"),
                &trusted
            ),
            ip("203.0.113.9")
        );
        // A spoofed leftmost entry does not win.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h("1.2.3.4, 198.51.100.7"), &trusted),
            ip("198.51.100.7")
        );
        // Garbage and no header: the peer.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h("nonsense"), &trusted),
            ip("10.1.1.1")
        );
        assert_eq!(
            client_addr(ip("::ffff:10.1.1.1"), &HeaderMap::new(), &trusted),
            ip("::ffff:10.1.1.1")
        );
        assert_eq!(
            client_addr(ip("::ffff:10.1.1.1"), &h("203.0.113.9"), &trusted),
            ip("203.0.113.9"),
            "IPv4-mapped peers count as IPv4"
        );
        // No trusted proxies: always the peer.
        assert_eq!(
            client_addr(ip("10.1.1.1"), &h("203.0.113.9"), &[]),
            ip("10.1.1.1")
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(split_authority("a.b:80"), Some(("a.b", Some(80))));
        assert_eq!(split_authority("a.b"), Some(("a.b", None)));
        assert_eq!(split_authority("[::1]:8080"), Some(("::1", Some(8080))));
        assert_eq!(split_authority("a:b"), None);
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "api:1".parse().unwrap());
        h.insert("x-forwarded-host", "alice.x, proxy".parse().unwrap());
        let uri: Uri = "/p".parse().unwrap();
        assert_eq!(authority(&h, &uri, false).as_deref(), Some("api:1"));
        assert_eq!(authority(&h, &uri, true).as_deref(), Some("alice.x"));
    }
}
