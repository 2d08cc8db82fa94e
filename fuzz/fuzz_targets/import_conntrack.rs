//! Arbitrary bytes as `conntrack -E -o timestamp,extended` text, through what
//! `nattrace import --format conntrack` does with it: each line parsed
//! (`import::conntrack::parse_conntrack_line`), the events merged into bindings (`Merger`),
//! and every binding written and read back (`nattrace_fuzz::assert_storable`). Nothing may
//! panic; every NEW and every DESTROY ends up in exactly one binding.
//!
//! Seeds: fuzz/seeds/import_conntrack/.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nattrace_fuzz::{assert_storable, shown};
use tracer_user::import::conntrack::{CtLine, EventKind, Merger, parse_conntrack_line};

fuzz_target!(|data: &[u8]| {
    let mut merger = Merger::new();
    let mut bindings = Vec::new();
    let (mut news, mut destroys) = (0usize, 0usize);
    for line in data.split_inclusive(|&c| c == b'\n') {
        match parse_conntrack_line(line) {
            Ok(CtLine::Event(ev)) => {
                match ev.kind {
                    EventKind::New => news += 1,
                    EventKind::Destroy => destroys += 1,
                }
                let _ = ev.key();
                merger.push(ev, &mut bindings);
            }
            Ok(_) => {}
            Err(e) => shown(e),
        }
    }
    merger.finish(&mut bindings);
    // A NEW and its DESTROY make one binding; an unmatched one makes one alone.
    assert!(
        news.max(destroys) <= bindings.len() && bindings.len() <= news + destroys,
        "{news} NEW and {destroys} DESTROY events gave {} bindings",
        bindings.len()
    );
    assert_storable(&bindings);
});
