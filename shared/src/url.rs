//! The one rule for where Herald fetches from or points people at: `https:` anywhere,
//! plain `http:` only to this machine (loopback), for development. Browser pages,
//! package downloads (checked by the CLI, the API and the agent alike) and the
//! forwarder's SMTP relay all use it.

use std::net::IpAddr;

/// `localhost`, 127.0.0.0/8 or ::1, with or without the brackets of a URL's IPv6 host.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host of an `http://` or `https://` URL (brackets kept off an IPv6 host), and
/// whether it is https; `None` for any other scheme or a URL without a host.
pub fn http_host(url: &str) -> Option<(&str, bool)> {
    let (rest, https) = if url.len() >= 8 && url[..8].eq_ignore_ascii_case("https://") {
        (&url[8..], true)
    } else if url.len() >= 7 && url[..7].eq_ignore_ascii_case("http://") {
        (&url[7..], false)
    } else {
        return None;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split_once(']').map(|(host, _)| host)?
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    (!host.is_empty()).then_some((host, https))
}

/// A package download URL: `https:`, or `http:` to loopback.
pub fn check_download_url(url: &str) -> Result<(), String> {
    match http_host(url) {
        Some((_, true)) => Ok(()),
        Some((host, false)) if is_loopback_host(host) => Ok(()),
        _ => Err(format!(
            "download URL {url:?} must be https: (http: only to loopback, for development)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts_are_localhost_127_and_ipv6_one() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.8.9.10",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "example.org",
            "10.0.0.1",
            "::2",
            "[::ffff:8.8.8.8]",
            "localhost.example",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn downloads_are_https_or_loopback_http() {
        for url in [
            "https://example.org/a.tar.gz",
            "HTTPS://example.org/a",
            "http://127.0.0.1:8080/a",
            "http://localhost/a",
            "http://[::1]:9/a",
        ] {
            assert!(check_download_url(url).is_ok(), "{url}");
        }
        for url in [
            "http://example.org/a",
            "ftp://127.0.0.1/a",
            "file:///etc/passwd",
            "http://",
            "http://127.0.0.1.example.org/a",
            "http://example.org@127.0.0.1.evil/a",
        ] {
            assert!(check_download_url(url).is_err(), "{url}");
        }
    }
}
