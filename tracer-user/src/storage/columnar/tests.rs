use super::*;
use crate::binding::{
    IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_CONFIRMED, IPS_DST_NAT, IPS_SRC_NAT,
};
use crate::storage::testutil::binding;

fn header() -> SegmentHeader {
    SegmentHeader {
        seq: 3,
        writer_id: [7; 16],
        prev_seq: 2,
        prev_root: [9; 32],
        window_start_ns: 1_000_000_000_000,
        window_end_ns: 1_000_003_600_000_000_000 / 1000,
    }
}

fn row(b: Binding) -> Row {
    Row {
        binding: b,
        carried: false,
    }
}

/// A mixed set: TCP with and without ends, shared ports, UDP mapping-only, ICMP, DNAT,
/// IPv6, a raw-tuple SNAT+DNAT, carried rows.
fn sample() -> Vec<Row> {
    let mut rows = Vec::new();
    for i in 0..40_000u64 {
        let port = 20_000 + (i % 5000) as u16;
        let start = 1_000_000_000_000 + (i as i64) * 7_000_000;
        let end = (i % 7 != 0).then_some(start + (i as i64 % 300) * 1_000_000_000);
        let mut b = binding(i + 1, port, start, end);
        b.orig.src = format!("100.64.{}.{}", (i / 250) % 4, i % 250)
            .parse()
            .unwrap();
        b.orig.src_port = if i % 10 == 0 {
            1024 + (i % 60000) as u16
        } else {
            port
        };
        b.orig.dst = format!("192.0.2.{}", i % 50).parse().unwrap();
        b.reply.src = b.orig.dst;
        if i % 3 == 0 {
            b.proto = IPPROTO_UDP;
            b.orig.dst_port = 53;
            b.reply.src_port = 53;
        }
        if i % 11 == 0 {
            b.reply.dst = "203.0.113.8".parse().unwrap();
        }
        rows.push(Row {
            binding: b,
            carried: i % 13 == 0,
        });
    }
    // ICMP echo
    let mut b = binding(900_001, 7, 1_000_000_000_000, None);
    b.proto = IPPROTO_ICMP;
    b.orig.src_port = 4242;
    b.orig.dst_port = 0;
    b.reply.src_port = 7;
    b.reply.dst_port = 0;
    rows.push(row(b));
    // DNAT only
    let mut b = binding(900_002, 8080, 1_000_000_000_000, Some(1_000_500_000_000));
    b.status = IPS_DST_NAT | IPS_CONFIRMED;
    b.orig = Tuple {
        src: "198.51.100.9".parse().unwrap(),
        dst: "203.0.113.7".parse().unwrap(),
        src_port: 5555,
        dst_port: 8080,
    };
    b.reply = Tuple {
        src: "100.64.0.10".parse().unwrap(),
        dst: "198.51.100.9".parse().unwrap(),
        src_port: 80,
        dst_port: 5555,
    };
    rows.push(row(b));
    // SNAT + DNAT: reply.src differs from orig.dst: stored raw
    let mut b = binding(900_003, 30_000, 1_000_000_000_000, None);
    b.status = IPS_SRC_NAT | IPS_DST_NAT;
    b.reply.src = "100.64.9.9".parse().unwrap();
    rows.push(row(b));
    // IPv6, mapping-only (unspecified destination), approximate times, zone, mark
    let mut b = binding(900_004, 40_000, 1_000_100_000_000, Some(1_000_200_000_000));
    b.orig.src = "2001:db8::10".parse().unwrap();
    b.orig.dst = "::".parse().unwrap();
    b.orig.dst_port = 0;
    b.reply.src = "::".parse().unwrap();
    b.reply.src_port = 0;
    b.reply.dst = "2001:db8:1::7".parse().unwrap();
    b.start_approximate = true;
    b.end_approximate = true;
    b.start_source = StartSource::Dump;
    b.zone = 3;
    b.mark = 0xdead_beef;
    b.orig_counters = None;
    b.reply_counters = Some(Counters {
        packets: 1 << 40,
        bytes: u64::MAX,
    });
    rows.push(row(b));
    rows
}

fn sorted(mut rows: Vec<Row>) -> Vec<Row> {
    rows.sort_by(|a, b| row_order(&a.binding, &b.binding));
    rows
}

#[test]
fn segment_round_trips_every_field() {
    let rows = sample();
    let events = vec![
        CoverageEvent::Attached {
            t_ns: 5,
            backend: "netfilter".into(),
        },
        CoverageEvent::Heartbeat { t_ns: 6 },
    ];
    let (file, root) = encode_segment(&header(), rows.clone(), &events);
    let seg = SealedSegment::open(&file).unwrap();
    assert_eq!(seg.header, header());
    assert_eq!(seg.summary.root, root);
    assert_eq!(seg.summary.rows, rows.len() as u64);
    assert_eq!(seg.summary.blocks, 3);
    assert_eq!(seg.events(&file).unwrap(), events);
    let fences = seg.fences(&file).unwrap();
    let mut back = Vec::new();
    let mut leaves = Vec::new();
    for f in &fences {
        let rows = seg.read_block(&file, f).unwrap();
        let block_leaves: Vec<_> = rows.iter().map(crate::storage::record::leaf).collect();
        assert_eq!(
            merkle::root(&block_leaves),
            f.leaf,
            "a block's root is over its records"
        );
        leaves.extend(block_leaves);
        back.extend(rows);
    }
    assert_eq!(
        seg.summary.events_leaf,
        crate::storage::record::events_leaf_of_records(
            &crate::storage::record::events_data(&events)[1..]
        )
    );
    leaves.push(seg.summary.events_leaf);
    assert_eq!(
        merkle::root(&leaves),
        root,
        "the root is over every record, then the events"
    );
    let want = sorted(rows);
    assert_eq!(back.len(), want.len());
    for (a, b) in back.iter().zip(&want) {
        assert_eq!(a, b);
    }
    // Fences: key ranges in order, each row within its block's range and interval.
    let mut i = 0;
    for f in &fences {
        for r in &back[i..i + f.rows as usize] {
            assert!(f.may_hold_key(r.binding.external()));
            let (lo, hi) = answer_interval(r, header().window_start_ns, header().window_end_ns);
            assert!(f.t_lo_ns <= lo && hi <= f.t_hi_ns);
        }
        i += f.rows as usize;
    }
}

#[test]
fn filters_hold_every_key() {
    let rows = sample();
    let (file, _) = encode_segment(&header(), rows.clone(), &[]);
    let seg = SealedSegment::open(&file).unwrap();
    let ext = seg.ext_filter(&file).unwrap();
    let int = seg.int_filter(&file).unwrap();
    for r in &rows {
        let (ip, port) = r.binding.external();
        assert!(ext.contains(filter::key(ip, port)));
        assert!(int.contains(filter::key(r.binding.internal().0, 0)));
    }
}

#[test]
fn empty_segment_is_valid() {
    let (file, root) = encode_segment(&header(), Vec::new(), &[]);
    let seg = SealedSegment::open(&file).unwrap();
    assert_eq!(seg.summary.rows, 0);
    assert_eq!(seg.summary.blocks, 0);
    assert!(seg.fences(&file).unwrap().is_empty());
    assert_eq!(root, merkle::root(&[seg.summary.events_leaf]));
    assert!(!seg.ext_filter(&file).unwrap().contains(1));
}

/// Reads everything of a segment; the first problem found, if any.
fn read_everything(f: &Vec<u8>) -> Option<String> {
    let seg = match SealedSegment::open(f) {
        Ok(s) => s,
        Err((_, e)) => return Some(e.to_string()),
    };
    let fences = match seg.fences(f) {
        Ok(x) => x,
        Err((_, e)) => return Some(e.to_string()),
    };
    for fence in &fences {
        if let Err((_, e)) = seg.read_block(f, fence) {
            return Some(e.to_string());
        }
    }
    seg.events(f)
        .err()
        .or_else(|| seg.ext_filter(f).err())
        .or_else(|| seg.int_filter(f).err())
        .map(|(_, e)| e.to_string())
}

#[test]
fn every_flipped_byte_is_detected() {
    let rows: Vec<Row> = sample().into_iter().step_by(40).collect();
    let (file, _) = encode_segment(&header(), rows, &[CoverageEvent::Heartbeat { t_ns: 1 }]);
    assert_eq!(read_everything(&file), None);
    let step = (file.len() / 1500).max(1);
    for at in (0..file.len()).step_by(step).chain([file.len() - 1]) {
        let mut f = file.clone();
        f[at] ^= 0x40;
        assert!(
            read_everything(&f).is_some(),
            "flip at {at} of {} not detected",
            file.len()
        );
    }
    for cut in [0, 10, HEADER_LEN, file.len() / 2, file.len() - 1] {
        assert!(SealedSegment::open(&file[..cut].to_vec()).is_err());
    }
}

#[test]
fn block_decoder_survives_garbage() {
    let mut seed = 0x1234_5678_u64;
    for len in 0..400 {
        let mut b = Vec::with_capacity(len);
        for _ in 0..len {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            b.push((seed >> 33) as u8);
        }
        let _ = decode_block(&b);
    }
}

#[test]
fn zigzag_round_trips() {
    for v in [0, 1, -1, 63, -64, i64::MAX, i64::MIN] {
        assert_eq!(unzigzag(zigzag(v)), v);
    }
    let mut b = Vec::new();
    put_varint(&mut b, u64::MAX);
    assert_eq!(b.len(), 10);
}

#[test]
fn times_round_outward() {
    assert_eq!(floor_time(1_999_999), 1_000_000);
    assert_eq!(ceil_time(1_000_001), 2_000_000);
    assert_eq!(ceil_time(2_000_000), 2_000_000);
    assert_eq!(floor_time(-1), -1_000_000);
}

#[test]
fn tcp_constant_is_six() {
    // The sample relies on the testutil binding being TCP SNAT.
    assert_eq!(binding(1, 1, 0, None).proto, IPPROTO_TCP);
}

/// Inputs found by reading the decoder (fuzzing report): each must be an error, not a panic
/// or a huge allocation.
#[test]
fn crafted_blocks_are_errors() {
    let hex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    // Second row's external-port delta is u64::MAX.
    let ext_port_overflow = hex(
        "02000000000000000000000011010005000000050000000200020000000200000003000b0000000b0000000400010000000100000005000100000001000000060005000000050000000700010000000100000008000100000001000000090005000000050000000a0001000000010000000b0001000000010000000c0001000000010000000d0001000000010000000e0001000000010000000f000100000001000000100001000000010000001100010000000100000004cb007107000201ffffffffffffffffff010000046440000a000004c00002020000060000000000",
    );
    assert!(decode_block(&ext_port_overflow).is_err());
    // Internal-port delta is zigzag(i64::MAX).
    let int_port_overflow = hex(
        "010000000000000000000000110100050000000500000002000200000002000000030001000000010000000400010000000100000005000100000001000000060005000000050000000700010000000100000008000a0000000a000000090005000000050000000a0001000000010000000b0001000000010000000c0001000000010000000d0001000000010000000e0001000000010000000f000100000001000000100001000000010000001100010000000100000004cb0071070001010000046440000a00feffffffffffffffff0104c00002020000060000000000",
    );
    assert!(decode_block(&int_port_overflow).is_err());
    // Columns that each decompress to 64 MiB: refused before decompressing past the limit.
    let zeros = zstd::bulk::compress(&vec![0u8; MAX_BLOCK_LEN], 19).unwrap();
    let mut bomb = Vec::new();
    bomb.extend_from_slice(&1u32.to_le_bytes());
    bomb.extend_from_slice(&0i64.to_le_bytes());
    bomb.push(3);
    for id in 1..=3u8 {
        bomb.push(id);
        bomb.push(METHOD_ZSTD);
        bomb.extend_from_slice(&(zeros.len() as u32).to_le_bytes());
        bomb.extend_from_slice(&(MAX_BLOCK_LEN as u32).to_le_bytes());
    }
    for _ in 0..3 {
        bomb.extend_from_slice(&zeros);
    }
    let err = block_columns(&bomb).unwrap_err().to_string();
    assert!(err.contains("column 2"), "{err}");
}

#[test]
fn decoding_only_some_rows_gives_the_same_rows_and_ids() {
    let rows = sample();
    let (file, _) = encode_segment(&header(), rows, &[]);
    let seg = SealedSegment::open(&file).unwrap();
    for fence in seg.fences(&file).unwrap() {
        let all = seg.read_block(&file, &fence).unwrap();
        for pick in [0, 1, 7, all.len() / 2, all.len() - 1] {
            let key = all[pick].binding.external();
            let want: Vec<Row> = all
                .iter()
                .filter(|r| r.binding.external() == key)
                .cloned()
                .collect();
            let keep = |k: ExtKey, _: i64, _: Option<i64>| k == key;
            let got = seg.read_block_where(&file, &fence, &keep).unwrap();
            assert_eq!(got, want);
        }
        // Many rows (the sorted path) too.
        let ip = all[0].binding.external().0;
        let keep = |k: ExtKey, _: i64, _: Option<i64>| k.0 == ip;
        let got = seg.read_block_where(&file, &fence, &keep).unwrap();
        let want: Vec<Row> = all
            .iter()
            .filter(|r| r.binding.external().0 == ip)
            .cloned()
            .collect();
        assert_eq!(got, want);
    }
}
