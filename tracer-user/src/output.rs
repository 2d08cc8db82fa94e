//! Printing results: bindings as table, JSON lines or CSV; times; aligned tables.

use std::io::{self, Write};
use std::net::IpAddr;

use chrono::{DateTime, SecondsFormat};
use serde::Serialize;

use crate::binding::{Binding, proto_name};

/// Output format of `query`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    #[default]
    Table,
    /// One JSON object per line.
    Json,
    /// Comma-separated values with a header line.
    Csv,
}

/// Output format of `coverage` and `stats`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// A time as printed in JSON and CSV: RFC 3339, UTC, always 9 fraction digits
/// (`2026-11-02T10:14:07.000000000Z`).
#[must_use]
pub fn format_time(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Nanos, true)
}

/// A time as printed for people: RFC 3339, UTC, milliseconds (`2026-11-02T10:14:07.000Z`).
#[must_use]
pub fn format_time_ms(ns: i64) -> String {
    DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// A time as printed in messages: RFC 3339, UTC, fraction digits only as needed
/// (`2026-11-02T10:14:05Z`, `2026-11-02T10:14:05.5Z`).
#[must_use]
pub fn format_time_short(ns: i64) -> String {
    let s = DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(SecondsFormat::Nanos, true);
    // "…:05.500000000Z" -> "…:05.5Z", "…:05.000000000Z" -> "…:05Z"
    let (main, _) = s.split_once('Z').unwrap_or((&s, ""));
    let trimmed = main.trim_end_matches('0').trim_end_matches('.');
    format!("{trimmed}Z")
}

/// A protocol as printed: its name, or the number.
#[must_use]
pub fn proto_label(proto: u8) -> String {
    proto_name(proto).map_or_else(|| proto.to_string(), str::to_owned)
}

/// One binding as printed in JSON and CSV (the field order is the column order).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BindingRow {
    /// Binding id.
    pub id: u64,
    /// "tcp", "udp", "icmp", "icmpv6", or the number.
    pub proto: String,
    /// Subscriber address.
    pub internal_ip: IpAddr,
    /// Subscriber port (ICMP echo identifier for ICMP).
    pub internal_port: u16,
    /// Public address.
    pub external_ip: IpAddr,
    /// Public port.
    pub external_port: u16,
    /// Remote peer address.
    pub destination_ip: IpAddr,
    /// Remote peer port (0 for ICMP echo).
    pub destination_port: u16,
    /// Start, [`format_time`].
    pub start: String,
    /// End, [`format_time`]; `None` while open.
    pub end: Option<String>,
    /// The start is approximate.
    pub start_approximate: bool,
    /// The end is approximate.
    pub end_approximate: bool,
    /// "ring", "destroy" or "dump".
    pub start_source: &'static str,
    /// conntrack zone.
    pub zone: u16,
    /// conntrack mark.
    pub mark: u32,
    /// Packets subscriber to destination, if known.
    pub packets_out: Option<u64>,
    /// Bytes subscriber to destination, if known.
    pub bytes_out: Option<u64>,
    /// Packets destination to subscriber, if known.
    pub packets_in: Option<u64>,
    /// Bytes destination to subscriber, if known.
    pub bytes_in: Option<u64>,
}

/// Column names of [`BindingRow`], in order.
pub const BINDING_COLUMNS: [&str; 19] = [
    "id",
    "proto",
    "internal_ip",
    "internal_port",
    "external_ip",
    "external_port",
    "destination_ip",
    "destination_port",
    "start",
    "end",
    "start_approximate",
    "end_approximate",
    "start_source",
    "zone",
    "mark",
    "packets_out",
    "bytes_out",
    "packets_in",
    "bytes_in",
];

impl From<&Binding> for BindingRow {
    fn from(b: &Binding) -> Self {
        let (internal_ip, internal_port) = b.internal();
        let (external_ip, external_port) = b.external();
        let (destination_ip, destination_port) = b.destination();
        Self {
            id: b.id,
            proto: proto_label(b.proto),
            internal_ip,
            internal_port,
            external_ip,
            external_port,
            destination_ip,
            destination_port,
            start: format_time(b.start_ns),
            end: b.end_ns.map(format_time),
            start_approximate: b.start_approximate,
            end_approximate: b.end_approximate,
            start_source: b.start_source.as_str(),
            zone: b.zone,
            mark: b.mark,
            packets_out: b.orig_counters.map(|c| c.packets),
            bytes_out: b.orig_counters.map(|c| c.bytes),
            packets_in: b.reply_counters.map(|c| c.packets),
            bytes_in: b.reply_counters.map(|c| c.bytes),
        }
    }
}

impl BindingRow {
    /// The CSV fields, in [`BINDING_COLUMNS`] order (empty for unknown values).
    fn csv_fields(&self) -> [String; 19] {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        [
            self.id.to_string(),
            self.proto.clone(),
            self.internal_ip.to_string(),
            self.internal_port.to_string(),
            self.external_ip.to_string(),
            self.external_port.to_string(),
            self.destination_ip.to_string(),
            self.destination_port.to_string(),
            self.start.clone(),
            self.end.clone().unwrap_or_default(),
            self.start_approximate.to_string(),
            self.end_approximate.to_string(),
            self.start_source.to_owned(),
            self.zone.to_string(),
            self.mark.to_string(),
            opt(self.packets_out),
            opt(self.bytes_out),
            opt(self.packets_in),
            opt(self.bytes_in),
        ]
    }
}

/// Writes `bindings` in `format` (table: nothing at all when empty).
pub fn write_bindings(out: &mut dyn Write, format: Format, bindings: &[Binding]) -> io::Result<()> {
    match format {
        Format::Json => {
            for b in bindings {
                serde_json::to_writer(&mut *out, &BindingRow::from(b))?;
                out.write_all(b"\n")?;
            }
        }
        Format::Csv => {
            writeln!(out, "{}", BINDING_COLUMNS.join(","))?;
            for b in bindings {
                let fields = BindingRow::from(b).csv_fields();
                let fields: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
                writeln!(out, "{}", fields.join(","))?;
            }
        }
        Format::Table => {
            if bindings.is_empty() {
                return Ok(());
            }
            let header = [
                "START",
                "END",
                "PROTO",
                "INTERNAL",
                "PORT",
                "EXTERNAL",
                "PORT",
                "DESTINATION",
                "PORT",
                "SOURCE",
                "ID",
            ];
            let rows: Vec<Vec<String>> = bindings.iter().map(table_row).collect();
            write_table(out, &header, &rows)?;
            if bindings
                .iter()
                .any(|b| b.start_approximate || b.end_approximate)
            {
                writeln!(out, "(~ approximate time)")?;
            }
        }
    }
    Ok(())
}

fn table_row(b: &Binding) -> Vec<String> {
    let time =
        |ns: i64, approx: bool| format!("{}{}", if approx { "~" } else { "" }, format_time_ms(ns));
    let (iip, iport) = b.internal();
    let (eip, eport) = b.external();
    let (dip, dport) = b.destination();
    vec![
        time(b.start_ns, b.start_approximate),
        b.end_ns
            .map_or_else(|| "open".to_owned(), |e| time(e, b.end_approximate)),
        proto_label(b.proto),
        iip.to_string(),
        iport.to_string(),
        eip.to_string(),
        eport.to_string(),
        dip.to_string(),
        dport.to_string(),
        b.start_source.as_str().to_owned(),
        b.id.to_string(),
    ]
}

/// Writes an aligned table: a header line, then one line per row, columns separated by two
/// spaces, the last column not padded.
pub fn write_table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut dyn Write, cells: &mut dyn Iterator<Item = &str>| -> io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i > 0 {
                s.push_str("  ");
            }
            s.push_str(cell);
            s.extend(std::iter::repeat_n(' ', w - cell.chars().count()));
        }
        writeln!(out, "{}", s.trim_end())
    };
    line(out, &mut header.iter().copied())?;
    for row in rows {
        line(out, &mut row.iter().map(String::as_str))?;
    }
    Ok(())
}

/// `s` as a CSV field: quoted (with doubled quotes) when it holds a comma, quote or newline.
#[must_use]
pub fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{Counters, IPPROTO_ICMPV6, IPS_SRC_NAT, StartSource, Tuple};

    const T: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z

    fn v6_binding() -> Binding {
        Binding {
            id: 5,
            proto: IPPROTO_ICMPV6,
            zone: 1,
            mark: 2,
            status: IPS_SRC_NAT,
            orig: Tuple {
                src: "2001:db8::10".parse().unwrap(),
                dst: "2001:db8:1::1".parse().unwrap(),
                src_port: 7,
                dst_port: 0,
            },
            reply: Tuple {
                src: "2001:db8:1::1".parse().unwrap(),
                dst: "2001:db8:ff::7".parse().unwrap(),
                src_port: 9,
                dst_port: 0,
            },
            start_ns: T + 1,
            start_approximate: true,
            start_source: StartSource::Dump,
            end_ns: None,
            end_approximate: false,
            orig_counters: Some(Counters {
                packets: 3,
                bytes: 252,
            }),
            reply_counters: None,
        }
    }

    #[test]
    fn times() {
        assert_eq!(format_time(T), "2026-11-02T10:14:07.000000000Z");
        assert_eq!(format_time(T + 1), "2026-11-02T10:14:07.000000001Z");
        assert_eq!(format_time_ms(T + 1_500_000), "2026-11-02T10:14:07.001Z");
        assert_eq!(format_time_short(T), "2026-11-02T10:14:07Z");
        assert_eq!(format_time_short(T + 500_000_000), "2026-11-02T10:14:07.5Z");
        assert_eq!(format_time_short(T + 10), "2026-11-02T10:14:07.00000001Z");
        assert_eq!(format_time_short(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let mut out = Vec::new();
        write_bindings(&mut out, Format::Json, &[v6_binding()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = BINDING_COLUMNS.to_vec();
        expected.sort_unstable();
        let mut keys_sorted = keys.clone();
        keys_sorted.sort_unstable();
        assert_eq!(keys_sorted, expected);
        assert_eq!(v["proto"], "icmpv6");
        assert_eq!(v["internal_ip"], "2001:db8::10");
        assert_eq!(v["internal_port"], 7);
        assert_eq!(v["external_ip"], "2001:db8:ff::7");
        assert_eq!(v["external_port"], 9);
        assert_eq!(v["destination_port"], 0);
        assert_eq!(v["start"], "2026-11-02T10:14:07.000000001Z");
        assert_eq!(v["end"], serde_json::Value::Null);
        assert_eq!(v["start_source"], "dump");
        assert_eq!(v["packets_out"], 3);
        assert_eq!(v["bytes_in"], serde_json::Value::Null);
        // Field order as documented.
        assert!(
            text.starts_with("{\"id\":5,\"proto\":\"icmpv6\",\"internal_ip\""),
            "{text}"
        );
    }

    #[test]
    fn csv_has_header_and_empty_unknowns() {
        let mut b = v6_binding();
        // A protocol without a name, with ports: the external port is the reply's
        // destination port (for ICMP it was the echo id in the reply's source port).
        b.proto = 132;
        b.reply.dst_port = 9;
        let mut out = Vec::new();
        write_bindings(&mut out, Format::Csv, &[b]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], BINDING_COLUMNS.join(","));
        assert_eq!(
            lines[1],
            "5,132,2001:db8::10,7,2001:db8:ff::7,9,2001:db8:1::1,0,2026-11-02T10:14:07.000000001Z,,true,false,dump,1,2,3,252,,"
        );
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }

    #[test]
    fn table_is_aligned_and_marks_approximate_times() {
        let mut out = Vec::new();
        write_bindings(&mut out, Format::Table, &[v6_binding()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("START                      END   PROTO"),
            "{text}"
        );
        assert!(
            lines[1].starts_with("~2026-11-02T10:14:07.000Z  open  icmpv6"),
            "{text}"
        );
        assert_eq!(lines[2], "(~ approximate time)");
        let mut out = Vec::new();
        write_bindings(&mut out, Format::Table, &[]).unwrap();
        assert!(out.is_empty());
    }
}
