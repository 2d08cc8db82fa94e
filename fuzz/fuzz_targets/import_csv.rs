//! Arbitrary bytes as a CSV file, through what `nattrace import --format csv` does with it:
//! the first line as the header (`import::csv::parse_csv_header`; when it is not usable, the
//! columns of `nattrace query --format csv` are used so that records are still read), then
//! every further line, and the rest of the input as one record (quoted line breaks), through
//! `parse_csv_record`; every binding is written and read back
//! (`nattrace_fuzz::assert_storable`). Nothing may panic.
//!
//! Seeds: fuzz/seeds/import_csv/.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nattrace_fuzz::{assert_storable, shown};
use tracer_user::import::csv::{parse_csv_header, parse_csv_record};

/// The header of `nattrace query --format csv`.
const QUERY_HEADER: &[u8] = b"id,proto,internal_ip,internal_port,external_ip,external_port,destination_ip,destination_port,start,end,start_approximate,end_approximate,start_source,zone,mark,packets_out,bytes_out,packets_in,bytes_in";

fuzz_target!(|data: &[u8]| {
    let (header, body) = match data.iter().position(|&c| c == b'\n') {
        Some(i) => (&data[..=i], &data[i + 1..]),
        None => (data, &data[data.len()..]),
    };
    let columns = match parse_csv_header(header) {
        Ok(c) => c,
        Err(e) => {
            shown(e);
            parse_csv_header(QUERY_HEADER).expect("the query header is a valid header")
        }
    };
    let mut bindings = Vec::new();
    let lines = body.split_inclusive(|&c| c == b'\n');
    for record in lines.chain(std::iter::once(body)) {
        match parse_csv_record(&columns, record) {
            Ok(b) => bindings.push(b),
            Err(e) => shown(e),
        }
    }
    assert_storable(&bindings);
});
