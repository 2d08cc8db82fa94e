//! CSV input: a header line naming the columns, then one SNAT binding per record.
//!
//! Required columns, in any order: [`REQUIRED_COLUMNS`]. Optional: [`OPTIONAL_COLUMNS`]
//! (`start_approximate`, `end_approximate`, `zone`, `mark`). Any other column is ignored,
//! so the output of `nattrace query --format csv` imports back unchanged (its `id` and
//! `start_source` are not kept: ids are assigned anew and the source becomes `import`).
//!
//! Values: `proto` tcp, udp, icmp, icmpv6 or a number; times RFC 3339 with any offset or
//! unix seconds with a fraction; `destination_ip` empty for a mapping-only record (RFC 6888
//! REQ-12); `end` empty for a binding still open; counters empty when unknown, packets and
//! bytes of one direction together. Fields may be quoted; lines may end in CRLF.

use std::io::BufRead;
use std::net::IpAddr;

use ::csv::{ByteRecord, ReaderBuilder};

use super::{Context, Counted, LineError, invalid, snat_tuples};
use crate::binding::{
    Binding, Counters, IPS_CONFIRMED, IPS_SRC_NAT, StartSource, is_icmp, proto_name,
};
use crate::cliparse::{self, ParseError};
use crate::exit::UserError;

/// Columns a CSV header line must name.
pub const REQUIRED_COLUMNS: [&str; 13] = [
    "proto",
    "internal_ip",
    "internal_port",
    "external_ip",
    "external_port",
    "destination_ip",
    "destination_port",
    "start",
    "end",
    "packets_out",
    "bytes_out",
    "packets_in",
    "bytes_in",
];

/// Columns read when present (those of `nattrace query --format csv` that the importer keeps).
pub const OPTIONAL_COLUMNS: [&str; 4] = ["start_approximate", "end_approximate", "zone", "mark"];

// Indexes into REQUIRED_COLUMNS.
const PROTO: usize = 0;
const INTERNAL_IP: usize = 1;
const INTERNAL_PORT: usize = 2;
const EXTERNAL_IP: usize = 3;
const EXTERNAL_PORT: usize = 4;
const DESTINATION_IP: usize = 5;
const DESTINATION_PORT: usize = 6;
const START: usize = 7;
const END: usize = 8;
const PACKETS_OUT: usize = 9;
const BYTES_OUT: usize = 10;
const PACKETS_IN: usize = 11;
const BYTES_IN: usize = 12;
// Indexes into OPTIONAL_COLUMNS.
const START_APPROXIMATE: usize = 0;
const END_APPROXIMATE: usize = 1;
const ZONE: usize = 2;
const MARK: usize = 3;

/// Why a CSV header line is not usable: nothing is imported (exit status 2).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The first line names none of the required columns.
    #[error(
        "the first line is not a CSV header line: it must name the columns, at least {}",
        REQUIRED_COLUMNS.join(",")
    )]
    NotAHeader,
    /// Required columns are not named.
    #[error(
        "the CSV header line lacks {}: the first line must name the columns, at least {}",
        list_columns(.missing),
        REQUIRED_COLUMNS.join(",")
    )]
    Missing {
        /// The required columns not named, in [`REQUIRED_COLUMNS`] order.
        missing: Vec<&'static str>,
    },
    /// A column the importer reads is named twice.
    #[error("column {0} appears twice in the CSV header line")]
    Duplicate(&'static str),
    /// The header line could not be read as CSV.
    #[error("unreadable CSV header line: {0}")]
    Unreadable(String),
}

fn list_columns(cols: &[&str]) -> String {
    match cols {
        [one] => format!("column {one}"),
        _ => format!("columns {}", cols.join(", ")),
    }
}

/// Where the columns the importer reads are in a record, from the header line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CsvColumns {
    required: [usize; REQUIRED_COLUMNS.len()],
    optional: [Option<usize>; OPTIONAL_COLUMNS.len()],
    /// Number of fields of the header line (every record must have as many).
    width: usize,
}

impl CsvColumns {
    /// The columns named by the fields of a header line. Names are compared without case
    /// and surrounding spaces; a UTF-8 byte order mark before the first is ignored.
    pub fn from_fields<'f>(
        fields: impl IntoIterator<Item = &'f [u8]>,
    ) -> Result<Self, HeaderError> {
        let mut required = [None; REQUIRED_COLUMNS.len()];
        let mut optional = [None; OPTIONAL_COLUMNS.len()];
        let mut width = 0;
        for (i, raw) in fields.into_iter().enumerate() {
            width += 1;
            let raw = if i == 0 {
                raw.strip_prefix(b"\xef\xbb\xbf").unwrap_or(raw)
            } else {
                raw
            };
            let name = String::from_utf8_lossy(raw).trim().to_ascii_lowercase();
            let slot = if let Some(k) = REQUIRED_COLUMNS.iter().position(|c| *c == name) {
                Some((&mut required[k], REQUIRED_COLUMNS[k]))
            } else {
                OPTIONAL_COLUMNS
                    .iter()
                    .position(|c| *c == name)
                    .map(|k| (&mut optional[k], OPTIONAL_COLUMNS[k]))
            };
            if let Some((slot, column)) = slot {
                if slot.is_some() {
                    return Err(HeaderError::Duplicate(column));
                }
                *slot = Some(i);
            }
        }
        let missing: Vec<&'static str> = REQUIRED_COLUMNS
            .iter()
            .zip(&required)
            .filter(|(_, at)| at.is_none())
            .map(|(c, _)| *c)
            .collect();
        if missing.len() == REQUIRED_COLUMNS.len() {
            return Err(HeaderError::NotAHeader);
        }
        if !missing.is_empty() {
            return Err(HeaderError::Missing { missing });
        }
        Ok(Self {
            required: required.map(|at| at.unwrap_or_default()),
            optional,
            width,
        })
    }

    /// Number of fields every record must have.
    #[must_use]
    pub fn width(&self) -> usize {
        self.width
    }
}

/// Parses a header line (CSV text, the first record of `line`).
pub fn parse_csv_header(line: &[u8]) -> Result<CsvColumns, HeaderError> {
    let mut rec = ByteRecord::new();
    match reader(line).read_byte_record(&mut rec) {
        Ok(true) => CsvColumns::from_fields(rec.iter()),
        Ok(false) => Err(HeaderError::NotAHeader),
        Err(e) => Err(HeaderError::Unreadable(e.to_string())),
    }
}

/// Parses one record (CSV text, the first record of `record`) into a binding with id 0,
/// `start_source` import. Never panics.
pub fn parse_csv_record(columns: &CsvColumns, record: &[u8]) -> Result<Binding, LineError> {
    let mut rec = ByteRecord::new();
    match reader(record).read_byte_record(&mut rec) {
        Ok(true) => binding_of(columns, &rec),
        Ok(false) => Err(LineError::FieldCount {
            found: 0,
            expected: columns.width,
        }),
        Err(e) => Err(LineError::Csv(e.to_string())),
    }
}

fn reader<R: std::io::Read>(input: R) -> ::csv::Reader<R> {
    ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_reader(input)
}

/// The binding of one record.
pub(crate) fn binding_of(cols: &CsvColumns, rec: &ByteRecord) -> Result<Binding, LineError> {
    if rec.len() != cols.width {
        return Err(LineError::FieldCount {
            found: rec.len(),
            expected: cols.width,
        });
    }
    let field = |k: usize| text(rec, cols.required[k]);
    let opt_field = |k: usize| cols.optional[k].map(|i| text(rec, i)).transpose();

    let proto_s = required(REQUIRED_COLUMNS[PROTO], field(PROTO)?)?;
    let proto = cliparse::parse_proto(proto_s).map_err(|_| {
        invalid(
            "proto",
            proto_s,
            "tcp, udp, icmp, icmpv6 or a protocol number 0-255",
        )
    })?;
    let internal = (
        ip("internal_ip", required("internal_ip", field(INTERNAL_IP)?)?)?,
        port(
            "internal_port",
            required("internal_port", field(INTERNAL_PORT)?)?,
        )?,
    );
    let external = (
        ip("external_ip", required("external_ip", field(EXTERNAL_IP)?)?)?,
        port(
            "external_port",
            required("external_port", field(EXTERNAL_PORT)?)?,
        )?,
    );
    let dest_ip = optional(field(DESTINATION_IP)?)
        .map(|s| ip("destination_ip", s))
        .transpose()?;
    let dest_port = optional(field(DESTINATION_PORT)?)
        .map(|s| port("destination_port", s))
        .transpose()?
        .unwrap_or(0);
    let destination = match dest_ip {
        Some(d) => Some((d, dest_port)),
        None if dest_port != 0 => return Err(LineError::PortWithoutAddress { port: dest_port }),
        None => None,
    };
    if is_icmp(proto) && dest_port != 0 {
        return Err(LineError::IcmpDestinationPort {
            port: dest_port,
            proto: proto_name(proto).unwrap_or("icmp"),
        });
    }
    let v6 = internal.0.is_ipv6();
    if external.0.is_ipv6() != v6 || destination.is_some_and(|(d, _)| d.is_ipv6() != v6) {
        return Err(LineError::MixedFamilies);
    }

    let start_s = required("start", field(START)?)?;
    let start_ns = time("start", start_s)?;
    let end_ns = match optional(field(END)?) {
        None => None,
        Some(end_s) => {
            let end = time("end", end_s)?;
            if end < start_ns {
                return Err(LineError::EndBeforeStart {
                    start: super::quoted(start_s),
                    end: super::quoted(end_s),
                });
            }
            Some(end)
        }
    };
    let orig_counters = counters(
        ("packets_out", field(PACKETS_OUT)?),
        ("bytes_out", field(BYTES_OUT)?),
    )?;
    let reply_counters = counters(
        ("packets_in", field(PACKETS_IN)?),
        ("bytes_in", field(BYTES_IN)?),
    )?;
    let start_approximate = opt_field(START_APPROXIMATE)?
        .and_then(optional)
        .map(|s| boolean("start_approximate", s))
        .transpose()?
        .unwrap_or(false);
    let end_approximate = opt_field(END_APPROXIMATE)?
        .and_then(optional)
        .map(|s| boolean("end_approximate", s))
        .transpose()?
        .unwrap_or(false);
    let zone = opt_field(ZONE)?
        .and_then(optional)
        .map(|s| number::<u16>("zone", s, "a conntrack zone 0-65535"))
        .transpose()?
        .unwrap_or(0);
    let mark = opt_field(MARK)?
        .and_then(optional)
        .map(|s| number::<u32>("mark", s, "a conntrack mark 0-4294967295"))
        .transpose()?
        .unwrap_or(0);

    let (orig, reply) = snat_tuples(proto, internal, external, destination);
    Ok(Binding {
        id: 0,
        proto,
        zone,
        mark,
        status: IPS_SRC_NAT | IPS_CONFIRMED,
        orig,
        reply,
        start_ns,
        start_approximate,
        start_source: StartSource::Import,
        end_ns,
        end_approximate,
        orig_counters,
        reply_counters,
    })
}

/// Field `i` as trimmed text.
fn text(rec: &ByteRecord, i: usize) -> Result<&str, LineError> {
    let raw = rec.get(i).unwrap_or_default();
    std::str::from_utf8(raw)
        .map(str::trim)
        .map_err(|_| LineError::NotUtf8)
}

fn required<'s>(field: &'static str, s: &'s str) -> Result<&'s str, LineError> {
    if s.is_empty() {
        Err(LineError::Empty { field })
    } else {
        Ok(s)
    }
}

fn optional(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

fn ip(field: &'static str, s: &str) -> Result<IpAddr, LineError> {
    s.parse()
        .map_err(|_| invalid(field, s, "an IPv4 or IPv6 address"))
}

fn port(field: &'static str, s: &str) -> Result<u16, LineError> {
    number(field, s, "a port 0-65535")
}

fn number<T: std::str::FromStr>(
    field: &'static str,
    s: &str,
    expected: &'static str,
) -> Result<T, LineError> {
    if !s.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(field, s, expected));
    }
    s.parse().map_err(|_| invalid(field, s, expected))
}

fn time(field: &'static str, s: &str) -> Result<i64, LineError> {
    cliparse::parse_time(s).map_err(|e| match e {
        ParseError::TimeRange { .. } => invalid(field, s, "a time between 1677 and 2262"),
        _ => invalid(
            field,
            s,
            "RFC 3339 with an offset (2026-11-02T10:14:07Z) or unix seconds (1793614447.25)",
        ),
    })
}

fn boolean(field: &'static str, s: &str) -> Result<bool, LineError> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(invalid(field, s, "true or false")),
    }
}

/// The counters of one direction: both fields, or neither.
fn counters(
    (pf, packets): (&'static str, &str),
    (bf, bytes): (&'static str, &str),
) -> Result<Option<Counters>, LineError> {
    let packets = optional(packets)
        .map(|s| number::<u64>(pf, s, "a count"))
        .transpose()?;
    let bytes = optional(bytes)
        .map(|s| number::<u64>(bf, s, "a count"))
        .transpose()?;
    match (packets, bytes) {
        (Some(packets), Some(bytes)) => Ok(Some(Counters { packets, bytes })),
        (None, None) => Ok(None),
        (Some(_), None) => Err(LineError::Unpaired {
            present: pf,
            missing: bf,
        }),
        (None, Some(_)) => Err(LineError::Unpaired {
            present: bf,
            missing: pf,
        }),
    }
}

/// Reads CSV from `input` into `ctx`: the header line (a missing column is a user error,
/// exit status 2, before anything is written), then every record.
pub(crate) fn import(input: &mut dyn BufRead, ctx: &mut Context<'_>) -> anyhow::Result<()> {
    let mut rdr = reader(Counted::new(input));
    let mut rec = ByteRecord::new();
    let header = match rdr.read_byte_record(&mut rec) {
        Ok(true) => CsvColumns::from_fields(rec.iter()),
        Ok(false) => {
            // Empty input: nothing to do, and nothing wrong.
            ctx.summary.lines = rdr.get_ref().lines();
            return Ok(());
        }
        Err(e) if e.is_io_error() => return Err(read_error(ctx, e)),
        Err(e) => Err(HeaderError::Unreadable(e.to_string())),
    };
    let cols = header.map_err(|e| UserError::bad_input(format!("{}: {e}", ctx.input_name())))?;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                ctx.summary.content_lines += 1;
                let line = record_line(&mut rdr, rec.position());
                match binding_of(&cols, &rec) {
                    Ok(b) => ctx.write(b)?,
                    Err(e) => ctx.bad(line, &e)?,
                }
            }
            Err(e) if e.is_io_error() => return Err(read_error(ctx, e)),
            Err(e) => {
                ctx.summary.content_lines += 1;
                let line = record_line(&mut rdr, e.position());
                ctx.bad(line, &LineError::Csv(e.to_string()))?;
            }
        }
        let counted = rdr.get_ref();
        ctx.summary.lines = counted.lines();
        ctx.progress(counted.bytes);
    }
    ctx.summary.lines = rdr.get_ref().lines();
    Ok(())
}

/// The line a record starts on.
fn record_line<R: std::io::Read>(
    rdr: &mut ::csv::Reader<Counted<R>>,
    at: Option<&::csv::Position>,
) -> u64 {
    at.map_or(0, |p| rdr.get_mut().line_of_record_at(p.byte()))
}

fn read_error(ctx: &Context<'_>, e: ::csv::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(format!("cannot read {}", ctx.input_name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::binding::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};
    use crate::import::tests::ip;

    const HEADER: &str = "proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,end,packets_out,bytes_out,packets_in,bytes_in";
    const T: i64 = 1_793_614_447_000_000_000; // 2026-11-02T10:14:07Z
    const S: i64 = 1_000_000_000;

    fn cols() -> CsvColumns {
        parse_csv_header(HEADER.as_bytes()).unwrap()
    }

    fn record(line: &str) -> Result<Binding, LineError> {
        parse_csv_record(&cols(), line.as_bytes())
    }

    #[test]
    fn parses_a_tcp_record() {
        let b = record("tcp,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,2026-11-02T10:14:07Z,2026-11-02T11:14:08.5+01:00,10,1000,8,9000").unwrap();
        assert_eq!(b.proto, IPPROTO_TCP);
        assert_eq!(b.internal(), (ip("100.64.0.10"), 40000));
        assert_eq!(b.external(), (ip("203.0.113.7"), 20001));
        assert_eq!(b.destination(), (ip("192.0.2.2"), 443));
        assert_eq!(b.start_ns, T);
        assert_eq!(b.end_ns, Some(T + S + S / 2));
        assert_eq!(b.status, IPS_SRC_NAT | IPS_CONFIRMED);
        assert_eq!(b.start_source, StartSource::Import);
        assert!(!b.start_approximate && !b.end_approximate);
        assert_eq!((b.zone, b.mark, b.id), (0, 0, 0));
        assert_eq!(
            b.orig_counters,
            Some(Counters {
                packets: 10,
                bytes: 1000
            })
        );
        assert_eq!(
            b.reply_counters,
            Some(Counters {
                packets: 8,
                bytes: 9000
            })
        );
    }

    #[test]
    fn parses_udp_icmp_ipv6_numbers_and_unix_times() {
        let b = record(
            "UDP,2001:db8::10,5353,2001:db8:ff::7,61000,2001:db8:1::1,53,1793614447.25,,,,,",
        )
        .unwrap();
        assert_eq!(b.proto, IPPROTO_UDP);
        assert_eq!(b.internal(), (ip("2001:db8::10"), 5353));
        assert_eq!(b.external(), (ip("2001:db8:ff::7"), 61000));
        assert_eq!(b.destination(), (ip("2001:db8:1::1"), 53));
        assert_eq!(b.start_ns, T + S / 4);
        assert_eq!(b.end_ns, None);
        assert_eq!((b.orig_counters, b.reply_counters), (None, None));

        let b =
            record("icmp,100.64.0.10,7,203.0.113.7,9,192.0.2.2,0,1793614447,1793614448,1,84,1,84")
                .unwrap();
        assert_eq!(b.proto, IPPROTO_ICMP);
        assert_eq!(b.internal(), (ip("100.64.0.10"), 7));
        assert_eq!(b.external(), (ip("203.0.113.7"), 9));
        assert_eq!(b.destination(), (ip("192.0.2.2"), 0));
        assert_eq!((b.orig.dst_port, b.reply.dst_port), (0, 0));

        let b = record("132,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,0,,,,,").unwrap();
        assert_eq!(b.proto, 132);
        assert_eq!(b.destination(), (ip("192.0.2.2"), 3));
    }

    #[test]
    fn mapping_only_records_have_an_unspecified_destination() {
        for line in [
            "udp,100.64.0.10,5353,203.0.113.7,61000,,,0,,,,,",
            "udp,100.64.0.10,5353,203.0.113.7,61000,,0,0,,,,,",
            "udp,100.64.0.10,5353,203.0.113.7,61000,0.0.0.0,0,0,,,,,",
        ] {
            let b = record(line).unwrap();
            assert_eq!(b.destination(), (ip("0.0.0.0"), 0), "{line}");
            assert_eq!(b.external(), (ip("203.0.113.7"), 61000), "{line}");
        }
        let b = record("tcp,2001:db8::10,1,2001:db8::7,2,,,0,,,,,").unwrap();
        assert_eq!(b.destination(), (ip("::"), 0));
        assert_eq!(
            record("udp,100.64.0.10,5353,203.0.113.7,61000,,53,0,,,,,"),
            Err(LineError::PortWithoutAddress { port: 53 })
        );
    }

    #[test]
    fn header_in_another_order_with_extra_columns_and_optional_ones() {
        let header = "\u{feff}Note, end,start,bytes_in,packets_in,bytes_out,packets_out,destination_port,destination_ip,external_port,external_ip,internal_port,internal_ip,PROTO,zone,mark,start_approximate,end_approximate,id";
        let cols = parse_csv_header(header.as_bytes()).unwrap();
        assert_eq!(cols.width(), 19);
        let b = parse_csv_record(
            &cols,
            b"\"hello, world\",,1793614447,,,,,443,192.0.2.2,20001,203.0.113.7,40000,100.64.0.10,tcp,3,7,true,FALSE,99",
        )
        .unwrap();
        assert_eq!(b.internal(), (ip("100.64.0.10"), 40000));
        assert_eq!(b.external(), (ip("203.0.113.7"), 20001));
        assert_eq!(b.destination(), (ip("192.0.2.2"), 443));
        assert_eq!((b.zone, b.mark), (3, 7));
        assert!(b.start_approximate && !b.end_approximate);
        assert_eq!(b.id, 0, "the id column is not kept");
    }

    #[test]
    fn header_errors_name_the_columns() {
        let e = parse_csv_header(b"proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,packets_out,bytes_out,packets_in").unwrap_err();
        assert_eq!(
            e,
            HeaderError::Missing {
                missing: vec!["end", "bytes_in"]
            }
        );
        assert!(
            e.to_string()
                .starts_with("the CSV header line lacks columns end, bytes_in: "),
            "{e}"
        );
        assert_eq!(
            parse_csv_header(b"tcp,100.64.0.10,1"),
            Err(HeaderError::NotAHeader)
        );
        assert_eq!(
            parse_csv_header(format!("{HEADER},zone,Zone").as_bytes()),
            Err(HeaderError::Duplicate("zone"))
        );
        assert_eq!(parse_csv_header(b""), Err(HeaderError::NotAHeader));
    }

    #[test]
    fn bad_records() {
        let e = |line: &str| record(line).unwrap_err();
        assert_eq!(
            e("tcp,100.64.0.10,40000"),
            LineError::FieldCount {
                found: 3,
                expected: 13
            }
        );
        assert_eq!(
            e("tcp,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,,"),
            LineError::FieldCount {
                found: 14,
                expected: 13
            }
        );
        assert_eq!(
            e(",100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,"),
            LineError::Empty { field: "proto" }
        );
        assert_eq!(
            e("sctpx,100.64.0.10,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,").to_string(),
            "proto: invalid value 'sctpx': expected tcp, udp, icmp, icmpv6 or a protocol number 0-255"
        );
        assert_eq!(
            e("tcp,100.64.0,40000,203.0.113.7,20001,192.0.2.2,443,0,,,,,").to_string(),
            "internal_ip: invalid value '100.64.0': expected an IPv4 or IPv6 address"
        );
        assert_eq!(
            e("tcp,100.64.0.10,70000,203.0.113.7,20001,192.0.2.2,443,0,,,,,").to_string(),
            "internal_port: invalid value '70000': expected a port 0-65535"
        );
        assert_eq!(
            e("tcp,100.64.0.10,-1,203.0.113.7,20001,192.0.2.2,443,0,,,,,").to_string(),
            "internal_port: invalid value '-1': expected a port 0-65535"
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,,192.0.2.2,443,0,,,,,"),
            LineError::Empty {
                field: "external_port"
            }
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,x,0,,,,,").to_string(),
            "destination_port: invalid value 'x': expected a port 0-65535"
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,,,,,,"),
            LineError::Empty { field: "start" }
        );
        assert!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,yesterday,,,,,")
                .to_string()
                .starts_with("start: invalid value 'yesterday': expected RFC 3339")
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,99999999999,,,,,").to_string(),
            "start: invalid value '99999999999': expected a time between 1677 and 2262"
        );
        assert!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,0,2026-11-02,,,,")
                .to_string()
                .starts_with("end: invalid value '2026-11-02'")
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,10,9.5,,,,"),
            LineError::EndBeforeStart {
                start: "10".into(),
                end: "9.5".into()
            }
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,10,11,5,,,"),
            LineError::Unpaired {
                present: "packets_out",
                missing: "bytes_out"
            }
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,10,11,,,,5"),
            LineError::Unpaired {
                present: "bytes_in",
                missing: "packets_in"
            }
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,10,11,1.5,3,,").to_string(),
            "packets_out: invalid value '1.5': expected a count"
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,2001:db8::7,2,192.0.2.2,3,10,,,,,"),
            LineError::MixedFamilies
        );
        assert_eq!(
            e("tcp,100.64.0.10,1,203.0.113.7,2,2001:db8::2,3,10,,,,,"),
            LineError::MixedFamilies
        );
        assert_eq!(
            e("icmp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,10,,,,,"),
            LineError::IcmpDestinationPort {
                port: 3,
                proto: "icmp"
            }
        );
        assert_eq!(
            parse_csv_record(
                &cols(),
                b"tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,\xff,,,,,"
            ),
            Err(LineError::NotUtf8)
        );
        let with_flags =
            parse_csv_header(format!("{HEADER},start_approximate,zone").as_bytes()).unwrap();
        assert_eq!(
            parse_csv_record(
                &with_flags,
                b"tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,0,,,,,,maybe,1"
            )
            .unwrap_err()
            .to_string(),
            "start_approximate: invalid value 'maybe': expected true or false"
        );
        assert_eq!(
            parse_csv_record(
                &with_flags,
                b"tcp,100.64.0.10,1,203.0.113.7,2,192.0.2.2,3,0,,,,,,,65536"
            )
            .unwrap_err()
            .to_string(),
            "zone: invalid value '65536': expected a conntrack zone 0-65535"
        );
    }

    #[test]
    fn quoted_fields_spaces_and_crlf() {
        let b = record("\"tcp\", 100.64.0.10 ,\"40000\",203.0.113.7,20001,\"192.0.2.2\",443,\"2026-11-02T10:14:07Z\",,,,,\r\n").unwrap();
        assert_eq!(b.internal(), (ip("100.64.0.10"), 40000));
        assert_eq!(b.start_ns, T);
    }

    #[test]
    fn mutated_records_and_headers_never_panic() {
        let with_flags = parse_csv_header(
            format!("{HEADER},start_approximate,end_approximate,zone,mark").as_bytes(),
        )
        .unwrap();
        crate::import::tests::mutations(
            b"\"icmpv6\",2001:db8::10,7,2001:db8:ff::7,9,2001:db8:1::1,0,2026-11-02T11:14:07.5+01:00,1793614448.25,1,84,1,84,true,false,3,7\r\n",
            4_000,
            |input| {
                let _ = parse_csv_record(&with_flags, input);
            },
        );
        crate::import::tests::mutations(HEADER.as_bytes(), 1_000, |input| {
            let _ = parse_csv_header(input);
        });
    }

    #[test]
    fn never_panics_on_odd_input() {
        let c = cols();
        for input in [
            &b""[..],
            b"\"",
            b",,,,,,,,,,,,",
            b"\"\"\"\",,,\n\n\n",
            b"\xff\xfe",
            b"tcp,::,0,::,0,::,0,-0,,,,,",
            b"tcp,1.2.3.4,0,1.2.3.4,0,1.2.3.4,0,9223372036.854775807,,,,,",
        ] {
            let _ = parse_csv_record(&c, input);
            let _ = parse_csv_header(input);
        }
    }
}
