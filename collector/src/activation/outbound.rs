//! Outbound requests to addresses users chose: admin-configured destinations (webhook
//! URLs, provider base URLs, token URIs, export URLs) and push endpoints that arrive in
//! events (Web Push subscriptions). Without `--allow-private-destinations`, every such
//! request goes to a public address only: an IP in the URL is checked before the
//! request, a host name after DNS resolution, by the HTTP client's own resolver, so a
//! name that resolves to `127.0.0.1` or `169.254.169.254` (or is re-pointed there
//! later) is refused too. No request follows redirects, so there is no second hop to
//! check, and answers are read up to [`MAX_ANSWER_BYTES`].
//!
//! Push endpoints from events must also be `https`, unless their host is on the push
//! service allowlist (`--push-service-hosts`), which exempts it from the public-address
//! rule as well: a self-hosted push service on an internal network.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use serde_json::Value;

/// The most bytes of an answer read (error bodies, token exchanges).
pub const MAX_ANSWER_BYTES: u64 = 64 * 1024;
/// How long a request may take in all.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether `ip` is an address on the public internet: not loopback, private,
/// link-local, shared (CGNAT), unique-local, multicast, documentation, benchmarking,
/// reserved or unspecified, and not an IPv4 one of those mapped into IPv6.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => public_v4(v4),
            None => public_v6(v6),
        },
    }
}

fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 198 && (18..20).contains(&b))
        || a >= 240)
}

fn public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || (first & 0xfe00) == 0xfc00 // unique local
        || (first & 0xffc0) == 0xfe80 // link local
        || first == 0x2001 && ip.segments()[1] == 0x0db8 // documentation
        || first == 0x0064 && ip.segments()[1] == 0xff9b) // NAT64, maps IPv4 back in
}

/// The rules for outbound requests.
#[derive(Debug, Clone, Default)]
pub struct Outbound {
    /// Private, loopback and link-local addresses are allowed (tests, closed networks).
    pub allow_private: bool,
    /// Push service hosts taken from events whatever they resolve to (lower case; a
    /// leading `.` matches every subdomain).
    pub push_hosts: Vec<String>,
}

impl Outbound {
    fn allowlisted(&self, host: &str) -> bool {
        let host = host.to_ascii_lowercase();
        self.push_hosts
            .iter()
            .any(|allowed| match allowed.strip_prefix('.') {
                Some(domain) => host.ends_with(&format!(".{domain}")) || host == domain,
                None => host == *allowed,
            })
    }

    /// Checks a URL an admin configured: `http` or `https`, and, unless private
    /// addresses are allowed, no private IP in it (names are checked when resolved).
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong with it.
    pub fn check_url(&self, url: &str) -> Result<Url, String> {
        let parsed = Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(format!("{url:?} is not an http or https URL"));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(format!("{url:?} carries credentials"));
        }
        match parsed.host() {
            None => Err(format!("{url:?} has no host")),
            Some(host) => {
                if !self.allow_private && !self.host_is_public(&host) {
                    return Err(format!(
                        "{url:?} points at a private, loopback or link-local address \
                         (the collector runs without --allow-private-destinations)"
                    ));
                }
                Ok(parsed)
            }
        }
    }

    /// [`Outbound::check_url`], resolving a host name now too: what a destination is
    /// checked with when it is created, so that a bad one is refused at once.
    ///
    /// # Errors
    ///
    /// As [`Outbound::check_url`], or a name that resolves to no public address.
    pub fn check_url_now(&self, url: &str) -> Result<Url, String> {
        let parsed = self.check_url(url)?;
        if self.allow_private {
            return Ok(parsed);
        }
        if let Some(url::Host::Domain(name)) = parsed.host() {
            let port = parsed.port_or_known_default().unwrap_or(443);
            let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&(name, port))
                .map_err(|e| format!("{name:?} does not resolve: {e}"))?
                .collect();
            if !addrs.iter().any(|a| is_public(a.ip())) {
                return Err(format!(
                    "{name:?} resolves only to private, loopback or link-local addresses"
                ));
            }
        }
        Ok(parsed)
    }

    /// Checks a push endpoint that came in an event: allowlisted, or `https` (plain
    /// `http` too when private addresses are allowed) with no private IP in it.
    ///
    /// # Errors
    ///
    /// A sentence saying what is wrong with it.
    pub fn check_push_endpoint(&self, endpoint: &str) -> Result<Url, String> {
        let parsed = Url::parse(endpoint).map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
        let host = parsed.host_str().unwrap_or_default();
        if self.allowlisted(host) {
            return Ok(parsed);
        }
        if parsed.scheme() != "https" && !(self.allow_private && parsed.scheme() == "http") {
            return Err(format!("the push endpoint {endpoint:?} is not https"));
        }
        self.check_url(endpoint)
    }

    fn host_is_public(&self, host: &url::Host<&str>) -> bool {
        match host {
            url::Host::Ipv4(ip) => is_public(IpAddr::V4(*ip)),
            url::Host::Ipv6(ip) => is_public(IpAddr::V6(*ip)),
            url::Host::Domain(name) => {
                let name = name.to_ascii_lowercase();
                name != "localhost" && !name.ends_with(".localhost")
            }
        }
    }

    /// An HTTP client builder under these rules: no redirects, timeouts, and (unless
    /// private addresses are allowed) a resolver that only answers public addresses.
    pub fn client(&self) -> reqwest::blocking::ClientBuilder {
        let builder = reqwest::blocking::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT);
        if self.allow_private {
            builder
        } else {
            builder.dns_resolver(Arc::new(PublicOnly(self.clone())))
        }
    }
}

/// A resolver that drops private addresses from every answer, but for allowlisted
/// push service hosts.
struct PublicOnly(Outbound);

impl Resolve for PublicOnly {
    fn resolve(&self, name: Name) -> Resolving {
        let exempt = self.0.allowlisted(name.as_str());
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| exempt || is_public(addr.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host:?} resolves to no public address; the collector does not call private ones"
                )
                .into());
            }
            let addrs: Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

/// An answer's body, read up to [`MAX_ANSWER_BYTES`], as JSON (`null` if it is not).
pub fn answer_json(response: reqwest::blocking::Response) -> Value {
    let mut body = Vec::new();
    let _ = response.take(MAX_ANSWER_BYTES).read_to_end(&mut body);
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_loopback_link_local_and_mapped_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "142.250.1.1"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked_unless_private_addresses_are_allowed() {
        let strict = Outbound::default();
        for bad in [
            "http://127.0.0.1:8080/hook",
            "http://10.0.0.5/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://localhost:9000/",
            "http://api.localhost/",
            "http://user:pw@example.com/",
            "ftp://example.com/",
            "not a url",
        ] {
            assert!(strict.check_url(bad).is_err(), "{bad}");
        }
        assert!(strict.check_url("https://hooks.example.com/x").is_ok());
        let open = Outbound {
            allow_private: true,
            ..Outbound::default()
        };
        assert!(open.check_url("http://127.0.0.1:8080/hook").is_ok());
    }

    #[test]
    fn names_are_checked_after_resolution() {
        let strict = Outbound::default();
        // The machine's own name resolves to a loopback or private address (Debian's
        // /etc/hosts, a container's network): not caught by name, refused once resolved.
        let own = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
        let error = strict
            .check_url_now(&format!("http://{}:8080/", own.trim()))
            .expect_err("the machine's own name");
        assert!(error.contains("resolves only to private"), "{error}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let resolver = PublicOnly(strict);
        let name: Name = "localhost".parse().expect("name");
        assert!(runtime.block_on(resolver.resolve(name)).is_err());
        let exempt = PublicOnly(Outbound {
            allow_private: false,
            push_hosts: vec!["localhost".to_owned()],
        });
        let name: Name = "localhost".parse().expect("name");
        let found: Vec<SocketAddr> = runtime
            .block_on(exempt.resolve(name))
            .expect("allowlisted")
            .collect();
        assert!(found.iter().all(|a| a.ip().is_loopback()) && !found.is_empty());
    }

    #[test]
    fn push_endpoints_need_https_or_the_allowlist() {
        let strict = Outbound {
            allow_private: false,
            push_hosts: vec![".push.internal".to_owned(), "fcm.googleapis.com".to_owned()],
        };
        assert!(
            strict
                .check_push_endpoint("https://fcm.googleapis.com/fcm/send/x")
                .is_ok()
        );
        assert!(
            strict
                .check_push_endpoint("http://updates.example.com/x")
                .is_err()
        );
        assert!(strict.check_push_endpoint("https://127.0.0.1/x").is_err());
        assert!(
            strict
                .check_push_endpoint("http://a.push.internal/x")
                .is_ok()
        );
        assert!(strict.check_push_endpoint("https://10.0.0.1/x").is_err());
        // Another name passes here; the resolver checks what it resolves to.
        assert!(
            strict
                .check_push_endpoint("https://evilpush.internal/x")
                .is_ok()
        );
    }
}
