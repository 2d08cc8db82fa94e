//! Parsing of command-line values: TIME, DUR, IP[:PORT] and protocol.
//!
//! The error messages name the value; the caller prefixes the flag (`--at: invalid time …`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::binding::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

/// A command-line value that cannot be parsed.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// Neither RFC 3339 nor unix seconds.
    #[error(
        "invalid time '{value}': expected RFC 3339 with an offset (2026-11-02T10:14:07Z, \
         2026-11-02T11:14:07.5+01:00) or unix seconds (1793614447.25)"
    )]
    Time {
        /// The value given.
        value: String,
    },
    /// A valid time outside what nanoseconds since 1970 in 64 bits hold (1677 to 2262).
    #[error("time '{value}' is out of range (1677-09-21 to 2262-04-11)")]
    TimeRange {
        /// The value given.
        value: String,
    },
    /// Not a duration.
    #[error("invalid duration '{value}': expected e.g. 2s, 500ms, 1m")]
    Duration {
        /// The value given.
        value: String,
        /// Why humantime rejected it.
        #[source]
        source: humantime::DurationError,
    },
    /// A duration too long to be useful (above 292 years).
    #[error("duration '{value}' is too long")]
    DurationRange {
        /// The value given.
        value: String,
    },
    /// Not an address (with or without port).
    #[error(
        "invalid address '{value}': expected IP or IP:PORT, IPv6 with a port as [2001:db8::1]:40123"
    )]
    Address {
        /// The value given.
        value: String,
    },
    /// The port is a number above 65535.
    #[error("port {port} in '{value}' is out of range (0-65535)")]
    PortRange {
        /// The value given.
        value: String,
        /// The port part.
        port: String,
    },
    /// The address needs a port and has none.
    #[error("'{value}' has no port: expected IP:PORT, IPv6 as [2001:db8::1]:40123")]
    MissingPort {
        /// The value given.
        value: String,
    },
    /// Not a protocol name or number.
    #[error("unknown protocol '{value}': expected tcp, udp, icmp, icmpv6 or a number 0-255")]
    Proto {
        /// The value given.
        value: String,
    },
}

/// Parses TIME: RFC 3339 with any offset (`2026-11-02T10:14:07Z`, `2026-11-02T11:14:07.25+01:00`;
/// `t`/`z` in lower case and a space instead of `T` are accepted) or unix seconds with an
/// optional fraction of up to 9 digits (`1763820000`, `1763820000.25`). Returns nanoseconds
/// since the Unix epoch.
pub fn parse_time(s: &str) -> Result<i64, ParseError> {
    let value = s.trim();
    let bad = || ParseError::Time {
        value: s.to_owned(),
    };
    let range = || ParseError::TimeRange {
        value: s.to_owned(),
    };
    if value.bytes().next().is_some_and(|c| c.is_ascii_digit())
        && value.bytes().all(|c| c.is_ascii_digit() || c == b'.')
    {
        let (int, frac) = value.split_once('.').unwrap_or((value, ""));
        if int.is_empty() || frac.len() > 9 || frac.contains('.') || (value.ends_with('.')) {
            return Err(bad());
        }
        let secs: i64 = int.parse().map_err(|_| range())?;
        let nanos: i64 = if frac.is_empty() {
            0
        } else {
            format!("{frac:0<9}").parse().map_err(|_| bad())?
        };
        return secs
            .checked_mul(1_000_000_000)
            .and_then(|n| n.checked_add(nanos))
            .ok_or_else(range);
    }
    let t = chrono::DateTime::parse_from_rfc3339(value).map_err(|_| bad())?;
    t.timestamp_nanos_opt().ok_or_else(range)
}

/// Parses DUR with humantime (`2s`, `500ms`, `1m`, `1h 30m`). Returns nanoseconds.
pub fn parse_duration(s: &str) -> Result<i64, ParseError> {
    let d = humantime::parse_duration(s.trim()).map_err(|source| ParseError::Duration {
        value: s.to_owned(),
        source,
    })?;
    i64::try_from(d.as_nanos()).map_err(|_| ParseError::DurationRange {
        value: s.to_owned(),
    })
}

/// An address with an optional port as [`parse_endpoint`] reads it back:
/// `203.0.113.7:40123`, `203.0.113.7`, `[2001:db8::1]:40123`.
#[must_use]
pub fn format_endpoint((ip, port): (IpAddr, Option<u16>)) -> String {
    match (ip, port) {
        (ip, None) => ip.to_string(),
        (IpAddr::V4(ip), Some(p)) => format!("{ip}:{p}"),
        (IpAddr::V6(ip), Some(p)) => format!("[{ip}]:{p}"),
    }
}

/// Parses `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT` (a bare IPv6 address has no port).
/// With `port_required`, a value without port is an error.
pub fn parse_endpoint(s: &str, port_required: bool) -> Result<(IpAddr, Option<u16>), ParseError> {
    let value = s.trim();
    let bad = || ParseError::Address {
        value: s.to_owned(),
    };
    let (ip, port) = if let Some(rest) = value.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        let ip: Ipv6Addr = inner.parse().map_err(|_| bad())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad)?),
        };
        (IpAddr::V6(ip), port)
    } else if let Ok(ip) = value.parse::<IpAddr>() {
        (ip, None)
    } else {
        let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
        let ip: Ipv4Addr = host.parse().map_err(|_| bad())?;
        (IpAddr::V4(ip), Some(port))
    };
    let port = match port {
        None if port_required => {
            return Err(ParseError::MissingPort {
                value: s.to_owned(),
            });
        }
        None => None,
        Some(p) => Some(parse_port(s, p)?),
    };
    Ok((ip, port))
}

fn parse_port(value: &str, p: &str) -> Result<u16, ParseError> {
    if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
        return Err(ParseError::Address {
            value: value.to_owned(),
        });
    }
    p.parse().map_err(|_| ParseError::PortRange {
        value: value.to_owned(),
        port: p.to_owned(),
    })
}

/// Parses a protocol: `tcp`, `udp`, `icmp`, `icmpv6` (any case) or a number 0-255.
pub fn parse_proto(s: &str) -> Result<u8, ParseError> {
    let value = s.trim();
    match value.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "icmp" => Ok(IPPROTO_ICMP),
        "icmpv6" | "ipv6-icmp" => Ok(IPPROTO_ICMPV6),
        n => n.parse().map_err(|_| ParseError::Proto {
            value: s.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z

    #[test]
    fn times_with_offsets_and_fractions() {
        assert_eq!(parse_time("2026-11-02T10:14:07Z").unwrap(), T);
        assert_eq!(parse_time("2026-11-02T11:14:07+01:00").unwrap(), T);
        assert_eq!(
            parse_time("2026-11-02T05:14:07.5-05:00").unwrap(),
            T + 500_000_000
        );
        assert_eq!(
            parse_time("2026-11-02t10:14:07.123456789z").unwrap(),
            T + 123_456_789
        );
        assert_eq!(parse_time("2026-11-02 10:14:07Z").unwrap(), T);
        assert_eq!(parse_time("1793614447").unwrap(), T);
        assert_eq!(parse_time("1793614447.25").unwrap(), T + 250_000_000);
        assert_eq!(parse_time("1793614447.000000001").unwrap(), T + 1);
        assert_eq!(parse_time(" 0 ").unwrap(), 0);
    }

    #[test]
    fn bad_times() {
        for bad in [
            "",
            "yesterday",
            "2026-11-02T10:14:07",
            "2026-11-02",
            "2026-13-02T10:14:07Z",
            "1793614447.",
            ".5",
            "1.2.3",
            "1793614447.1234567891",
            "-5",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(matches!(e, ParseError::Time { .. }), "{bad}: {e:?}");
            assert!(e.to_string().contains(&format!("'{bad}'")), "{e}");
        }
        assert!(matches!(
            parse_time("99999999999"),
            Err(ParseError::TimeRange { .. })
        ));
        assert!(matches!(
            parse_time("2263-01-01T00:00:00Z"),
            Err(ParseError::TimeRange { .. })
        ));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s").unwrap(), 2_000_000_000);
        assert_eq!(parse_duration("500ms").unwrap(), 500_000_000);
        assert_eq!(parse_duration("1m").unwrap(), 60_000_000_000);
        assert_eq!(parse_duration("0s").unwrap(), 0);
        let e = parse_duration("2 parsecs").unwrap_err();
        assert!(
            e.to_string().starts_with("invalid duration '2 parsecs'"),
            "{e}"
        );
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn endpoints() {
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            parse_endpoint("203.0.113.7:40123", true).unwrap(),
            (v4, Some(40123))
        );
        assert_eq!(
            parse_endpoint("[2001:db8::1]:40123", true).unwrap(),
            (v6, Some(40123))
        );
        assert_eq!(parse_endpoint("203.0.113.7", false).unwrap(), (v4, None));
        assert_eq!(parse_endpoint("2001:db8::1", false).unwrap(), (v6, None));
        assert_eq!(parse_endpoint("[2001:db8::1]", false).unwrap(), (v6, None));
        assert_eq!(
            parse_endpoint("203.0.113.7:0", true).unwrap(),
            (v4, Some(0))
        );
        assert_eq!(
            parse_endpoint("203.0.113.7:65535", true).unwrap(),
            (v4, Some(65535))
        );
    }

    #[test]
    fn bad_endpoints() {
        let e = parse_endpoint("203.0.113.7:70000", true).unwrap_err();
        assert!(matches!(e, ParseError::PortRange { .. }), "{e:?}");
        assert_eq!(
            e.to_string(),
            "port 70000 in '203.0.113.7:70000' is out of range (0-65535)"
        );
        assert!(matches!(
            parse_endpoint("[2001:db8::1]:99999999999999999999", true),
            Err(ParseError::PortRange { .. })
        ));
        assert!(matches!(
            parse_endpoint("203.0.113.7", true),
            Err(ParseError::MissingPort { .. })
        ));
        assert!(matches!(
            parse_endpoint("2001:db8::1", true),
            Err(ParseError::MissingPort { .. })
        ));
        for bad in [
            "",
            "host:80",
            "203.0.113:80",
            "[203.0.113.7]:80",
            "[2001:db8::1]80",
            "[2001:db8::1",
            "1.2.3.4:",
            "1.2.3.4:-1",
            "1.2.3.4:8x",
        ] {
            assert!(
                matches!(parse_endpoint(bad, false), Err(ParseError::Address { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn protocols() {
        assert_eq!(parse_proto("tcp").unwrap(), 6);
        assert_eq!(parse_proto("UDP").unwrap(), 17);
        assert_eq!(parse_proto("icmp").unwrap(), 1);
        assert_eq!(parse_proto("icmpv6").unwrap(), 58);
        assert_eq!(parse_proto("132").unwrap(), 132);
        assert!(matches!(parse_proto("256"), Err(ParseError::Proto { .. })));
        assert!(matches!(
            parse_proto("sctpx"),
            Err(ParseError::Proto { .. })
        ));
    }
}
