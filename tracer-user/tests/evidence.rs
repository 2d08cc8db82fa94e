//! Evidence bundles end to end, without privileges: bindings written through the agent's
//! writer with a signing key, exported with `nattrace export`'s code, verified offline from
//! a fresh directory, and tampered with part by part.
//!
//! The truth here is what `nattrace query` answers for the same question (its CSV output must
//! be byte-equal to the bundle's `records.csv`), and the bindings as they were written.

use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use tracer_user::binding::{Binding, Counters, IPS_SRC_NAT, Tuple};
use tracer_user::evidence::check::verify_bundle;
use tracer_user::evidence::export::{ExportArgs, export};
use tracer_user::evidence::{Files, MANIFEST, PROOFS, RECORDS_CSV};
use tracer_user::exit::{Status, UserError};
use tracer_user::output::Format;
use tracer_user::query::{self, QueryArgs, Question};
use tracer_user::signing::{self, Note, SignerKey, VerifierKey};
use tracer_user::storage::{Writer, WriterOptions};

/// 2026-11-02T10:00:00Z.
const T0: i64 = 1_793_613_600_000_000_000;
const SEC: i64 = 1_000_000_000;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Binding `i`: subscriber 100.64.0.(i % 7 + 1), public 203.0.113.(i % 2 + 1) port
/// 20000 + i % 5 (so ports are reused over time), starting every 10 s, lasting 4 s.
fn binding(id: u64, i: u64) -> Binding {
    let start = T0 + i as i64 * 10 * SEC;
    let int = ip(&format!("100.64.0.{}", i % 7 + 1));
    let ext = ip(&format!("203.0.113.{}", i % 2 + 1));
    let dst = ip("198.51.100.20");
    let ext_port = 20_000 + (i % 5) as u16;
    Binding {
        id,
        proto: 6,
        status: IPS_SRC_NAT,
        orig: Tuple {
            src: int,
            dst,
            src_port: 40_000 + i as u16,
            dst_port: 443,
        },
        reply: Tuple {
            src: dst,
            dst: ext,
            src_port: 443,
            dst_port: ext_port,
        },
        start_ns: start,
        end_ns: Some(start + 4 * SEC),
        orig_counters: Some(Counters {
            packets: 10 + i,
            bytes: 1000 + i,
        }),
        reply_counters: Some(Counters {
            packets: 8,
            bytes: 800,
        }),
        ..Binding::EMPTY
    }
}

struct Lab {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    key_file: PathBuf,
    verifier: VerifierKey,
}

/// A data directory with `n` bindings in segments of `per_segment`, some carried across a
/// rotation (written open, ended in the next segment), all sealed and signed.
fn lab(n: u64, per_segment: u64) -> Lab {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let keys = tmp.path().join("keys");
    let key = SignerKey::generate("cgnat-test-1").unwrap();
    let (key_file, _) = signing::write_key_pair(&keys, &key).unwrap();
    let verifier = key.verifier();
    let options = WriterOptions {
        max_segment_records: per_segment,
        ..WriterOptions::default()
    };
    let mut w = Writer::open_with_options(&dir, options).unwrap();
    w.sign_with(Arc::new(key)).unwrap();
    let mut pending: Option<Binding> = None;
    for i in 0..n {
        let id = w.next_binding_id();
        let b = binding(id, i);
        if i % 4 == 3 {
            // Written open now, ended two bindings later: carried over a rotation.
            let mut open = b.clone();
            open.end_ns = None;
            w.append_binding(&open);
            if let Some(p) = pending.replace(b) {
                w.append_binding(&p);
            }
        } else {
            w.append_binding(&b);
        }
        w.flush().unwrap();
    }
    if let Some(p) = pending {
        w.append_binding(&p);
    }
    w.close().unwrap();
    Lab {
        _tmp: tmp,
        dir,
        key_file,
        verifier,
    }
}

fn export_args(
    lab: &Lab,
    out: &Path,
    external: &str,
    at: Option<&str>,
    window: Option<(&str, &str)>,
) -> ExportArgs {
    ExportArgs {
        data_dir: lab.dir.clone(),
        case: "CASE-2026-0042".to_owned(),
        out: out.to_owned(),
        reason: None,
        sign_key: Some(lab.key_file.clone()),
        question: Question {
            external: Some(external.to_owned()),
            at: at.map(str::to_owned),
            slack: at.map(|_| "2s".to_owned()),
            from: window.map(|w| w.0.to_owned()),
            to: window.map(|w| w.1.to_owned()),
            ..Question::default()
        },
    }
}

fn query_csv(args: &ExportArgs, now: i64) -> Vec<u8> {
    let q = QueryArgs {
        data_dir: args.data_dir.clone(),
        question: args.question.clone(),
        case: Some(args.case.clone()),
        reason: args.reason.clone(),
        format: Format::Csv,
    };
    let mut out = Vec::new();
    let mut err = Vec::new();
    let _ = query::execute(&q, now, &mut out, &mut err).unwrap();
    out
}

fn now() -> i64 {
    T0 + 86_400 * SEC
}

fn at(i: u64, plus_s: i64) -> String {
    format!("{}", (T0 + i as i64 * 10 * SEC + plus_s * SEC) / SEC)
}

fn rewrite(bundle: &[u8], f: impl FnOnce(&mut Files)) -> Vec<u8> {
    let (mut files, mtime) = Files::read_tar_with_mtime(bundle).unwrap();
    f(&mut files);
    let mut out = Vec::new();
    files.write_tar(&mut out, mtime).unwrap();
    out
}

fn entry<'a>(files: &'a mut Files, name: &str) -> &'a mut Vec<u8> {
    &mut files
        .entries
        .iter_mut()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} in the bundle"))
        .1
}

fn problems(bundle: &[u8], key: &VerifierKey) -> Vec<String> {
    verify_bundle(bundle, key, &[]).problems
}

#[test]
fn point_query_bundle_verifies_offline_and_holds_only_the_answer() {
    let lab = lab(40, 6);
    let out = lab.dir.parent().unwrap().join("case.nattrace");
    // Binding 11: 203.0.113.2:20001 at T0 + 110 s (port 20001 is reused by bindings 1, 21,
    // 31 at other times).
    let args = export_args(&lab, &out, "203.0.113.2:20001", Some(&at(11, 1)), None);
    let mut err = Vec::new();
    let e = export(&args, now(), &mut err).unwrap();
    assert_eq!(e.manifest.bindings, 1, "{}", String::from_utf8_lossy(&err));
    let bundle = fs::read(&out).unwrap();

    // Verified in a fresh directory, with nothing but the bundle and the public key.
    let elsewhere = tempfile::tempdir().unwrap();
    let copy = elsewhere.path().join("bundle");
    fs::write(&copy, &bundle).unwrap();
    let report = verify_bundle(&fs::read(&copy).unwrap(), &lab.verifier, &[]);
    assert!(report.is_verified(), "{:?}", report.problems);
    assert_eq!(report.records_verified, e.manifest.records);
    assert_eq!(report.bindings, 1);
    assert_eq!(report.case.as_deref(), Some("CASE-2026-0042"));

    // The readable answer is exactly what `nattrace query` prints for the same question.
    let files = Files::read_tar(bundle.as_slice()).unwrap();
    assert_eq!(
        files.get(RECORDS_CSV).unwrap(),
        query_csv(&args, now()).as_slice()
    );
    let csv = String::from_utf8(files.get(RECORDS_CSV).unwrap().to_vec()).unwrap();
    assert!(csv.contains("100.64.0.5,40011,203.0.113.2,20001"), "{csv}");
    // No other subscriber's record is disclosed: only binding 11's rows are in the proofs.
    let proofs = String::from_utf8(files.get(PROOFS).unwrap().to_vec()).unwrap();
    let records = proofs.lines().filter(|l| l.contains("\"record\"")).count();
    assert_eq!(records as u64, e.manifest.records);
    assert!(records >= 1);
    // The producer's private key is never in a bundle.
    let secret = fs::read_to_string(&lab.key_file).unwrap();
    let secret = secret.trim().rsplit('+').next().unwrap();
    assert!(
        !String::from_utf8_lossy(&bundle).contains(secret),
        "the private key is in the bundle"
    );
    let bytes_in_bundle = bundle.len();
    println!(
        "bundle for one point query: {bytes_in_bundle} bytes ({} records, {} segments)",
        e.manifest.records,
        e.manifest.segments.len()
    );
    assert!(
        bytes_in_bundle < 64 * 1024,
        "a point query's bundle is small: {bytes_in_bundle}"
    );
}

#[test]
fn every_part_of_a_bundle_is_tamper_evident() {
    let lab = lab(30, 5);
    let out = lab.dir.parent().unwrap().join("b.nattrace");
    let args = export_args(
        &lab,
        &out,
        "203.0.113.1",
        None,
        Some((&at(0, 0), &at(29, 5))),
    );
    let mut a = args.clone();
    a.reason = Some("test: whole day".to_owned());
    export(&a, now(), &mut Vec::new()).unwrap();
    let bundle = fs::read(&out).unwrap();
    let key = &lab.verifier;
    assert!(problems(&bundle, key).is_empty());

    let expect = |b: &[u8], what: &str| {
        let p = problems(b, key);
        assert!(
            p.iter().any(|x| x.contains(what)),
            "expected a problem naming '{what}', got {p:#?}"
        );
    };
    // A record's byte.
    let b = rewrite(&bundle, |f| {
        let p = entry(f, PROOFS);
        let s = String::from_utf8(p.clone()).unwrap();
        let i = s.find("\"record\":\"").unwrap() + 10 + 60;
        let c = if &s[i..=i] == "0" { "1" } else { "0" };
        *p = format!("{}{}{}", &s[..i], c, &s[i + 1..]).into_bytes();
    });
    expect(&b, "record 1 (");
    expect(&b, "inclusion proof does not lead");
    // A proof hash.
    let b = rewrite(&bundle, |f| {
        let p = entry(f, PROOFS);
        let s = String::from_utf8(p.clone()).unwrap();
        let i = s.find("\"path\":[\"").unwrap() + 9;
        let c = if &s[i..=i] == "a" { "b" } else { "a" };
        *p = format!("{}{}{}", &s[..i], c, &s[i + 1..]).into_bytes();
    });
    expect(&b, "inclusion proof does not lead");
    // A record removed from the list.
    let b = rewrite(&bundle, |f| {
        let p = entry(f, PROOFS);
        let s = String::from_utf8(p.clone()).unwrap();
        let rest: Vec<&str> = s.lines().skip(1).collect();
        *p = format!("{}\n", rest.join("\n")).into_bytes();
    });
    expect(&b, "records were added or removed");
    // A checkpoint's root.
    let b = rewrite(&bundle, |f| {
        let name = f
            .entries
            .iter()
            .map(|(n, _)| n.clone())
            .find(|n| n.starts_with("checkpoints/"))
            .unwrap();
        let c = entry(f, &name);
        let mut note = Note::parse(std::str::from_utf8(c).unwrap()).unwrap();
        let mut lines: Vec<String> = note.text.lines().map(str::to_owned).collect();
        lines[1] = format!("{}", lines[1].parse::<u64>().unwrap() + 1);
        note.text = format!("{}\n", lines.join("\n"));
        *c = note.encode().into_bytes();
    });
    expect(&b, "checkpoints/");
    expect(&b, "signature");
    // The manifest's signature.
    let b = rewrite(&bundle, |f| {
        let m = entry(f, MANIFEST);
        let mut note = Note::parse(std::str::from_utf8(m).unwrap()).unwrap();
        note.signatures[0].signature[5] ^= 1;
        *m = note.encode().into_bytes();
    });
    expect(&b, "MANIFEST: signature");
    // The readable CSV.
    let b = rewrite(&bundle, |f| {
        let c = entry(f, RECORDS_CSV);
        let s = String::from_utf8(c.clone())
            .unwrap()
            .replace("100.64.0.", "100.64.9.");
        *c = s.into_bytes();
    });
    expect(&b, "records.csv");
    // Another key, even of the same name.
    let other = SignerKey::generate("cgnat-test-1").unwrap().verifier();
    let p = problems(&bundle, &other);
    assert!(p.iter().any(|x| x.contains("producer.pub")), "{p:#?}");
    assert!(
        p.iter().any(|x| x.contains("MANIFEST: signature")),
        "{p:#?}"
    );
    // The same files in another order, or stamped with another time: the bundle's SHA-256
    // (recorded in the audit log) changes, so verification fails too.
    let b = rewrite(&bundle, |f| f.entries.reverse());
    expect(&b, "altered outside its files");
    let (files, mtime) = Files::read_tar_with_mtime(bundle.as_slice()).unwrap();
    let mut b = Vec::new();
    files.write_tar(&mut b, mtime + 3600).unwrap();
    expect(&b, "altered outside its files");
    // Any single byte: sampled over the whole archive.
    let mut undetected = Vec::new();
    // About 300 flips spread over every file and header of the archive.
    for at in (0..bundle.len()).step_by(bundle.len() / 300 + 1) {
        let mut b = bundle.clone();
        b[at] ^= 0x20;
        if problems(&b, key).is_empty() {
            undetected.push(at);
        }
    }
    assert!(
        undetected.is_empty(),
        "flips at {undetected:?} went undetected"
    );
}

#[test]
fn second_signature_is_added_and_verified() {
    let lab = lab(12, 4);
    let witness_dir = lab.dir.parent().unwrap().join("witness");
    let witness = SignerKey::generate("witness-1").unwrap();
    let (witness_file, _) = signing::write_key_pair(&witness_dir, &witness).unwrap();
    let args = tracer_user::cosign::CosignArgs {
        data_dir: lab.dir.clone(),
        key: witness_file,
        name: "witness-1".to_owned(),
    };
    let mut out = Vec::new();
    assert_eq!(
        tracer_user::cosign::execute(&args, &mut out).unwrap(),
        Status::Ok
    );
    let out_path = lab.dir.parent().unwrap().join("w.nattrace");
    let e = export_args(&lab, &out_path, "203.0.113.2:20001", Some(&at(1, 1)), None);
    export(&e, now(), &mut Vec::new()).unwrap();
    let bundle = fs::read(&out_path).unwrap();
    let r = verify_bundle(&bundle, &lab.verifier, &[witness.verifier()]);
    assert!(r.is_verified(), "{:?}", r.problems);
    assert_eq!(
        r.cosignatures.get("witness-1").map(String::as_str),
        Some("verified")
    );
    // Without the witness key the cosignature is reported, not checked.
    let r = verify_bundle(&bundle, &lab.verifier, &[]);
    assert!(r.cosignatures["witness-1"].starts_with("not checked"));
}

#[test]
fn long_windows_need_a_reason_and_exports_need_a_case_and_a_key() {
    let lab = lab(8, 4);
    let out = lab.dir.parent().unwrap().join("x.nattrace");
    let far = format!("{}", (T0 + 3 * 86_400 * SEC) / SEC);
    let args = export_args(&lab, &out, "203.0.113.1", None, Some((&at(0, 0), &far)));
    let e = export(&args, now(), &mut Vec::new()).unwrap_err();
    let u = e.downcast_ref::<UserError>().expect("a user error");
    assert_eq!(u.status, Status::BadInput);
    assert!(u.message.contains("--reason"), "{}", u.message);
    assert!(!out.exists());
    let mut with_reason = args.clone();
    with_reason.reason = Some("court order 17/2026 covers three days".to_owned());
    export(&with_reason, now(), &mut Vec::new()).unwrap();
    assert!(out.exists());
    // Never overwritten.
    assert!(export(&with_reason, now(), &mut Vec::new()).is_err());
    // A key others can read is refused.
    let mut loose = args.clone();
    loose.out = lab.dir.parent().unwrap().join("y.nattrace");
    loose.reason = with_reason.reason.clone();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&lab.key_file, fs::Permissions::from_mode(0o644)).unwrap();
    let e = export(&loose, now(), &mut Vec::new()).unwrap_err();
    assert!(format!("{e:#}").contains("chmod 600"), "{e:#}");
    // The audit log has the export with the bundle's hash.
    let log = fs::read_to_string(lab.dir.join("audit.log")).unwrap();
    assert!(log.contains("\"command\":\"export\""), "{log}");
    assert!(log.contains("court order 17/2026"), "{log}");
    assert!(log.contains("bundle_sha256"), "{log}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    /// For any question, the bundle's records are exactly what `nattrace query` answers,
    /// and the bundle verifies.
    #[test]
    fn exported_records_equal_the_query_answer(
        n in 6u64..40,
        per_segment in 3u64..9,
        ext in 1u8..3,
        port in proptest::option::of(0u16..5),
        from_i in 0u64..40,
        len_s in 1i64..200,
    ) {
        let lab = lab(n, per_segment);
        let out = lab.dir.parent().unwrap().join("p.nattrace");
        let external = match port {
            Some(p) => format!("203.0.113.{ext}:{}", 20_000 + p),
            None => format!("203.0.113.{ext}"),
        };
        let from = at(from_i, 0);
        let to = at(from_i, len_s);
        let args = export_args(&lab, &out, &external, None, Some((&from, &to)));
        match export(&args, now(), &mut Vec::new()) {
            Ok(_) => {
                let bundle = fs::read(&out).unwrap();
                let files = Files::read_tar(bundle.as_slice()).unwrap();
                let want = query_csv(&args, now());
                prop_assert_eq!(files.get(RECORDS_CSV).unwrap(), want.as_slice());
                let r = verify_bundle(&bundle, &lab.verifier, &[]);
                prop_assert!(r.is_verified(), "{:?}", r.problems);
            }
            Err(e) => prop_assert!(false, "export failed: {e:#}"),
        }
    }
}

#[derive(Debug, clap::Parser)]
struct VerifyCli {
    #[command(flatten)]
    args: tracer_user::verify::VerifyArgs,
}

fn verify_dir_with_key(dir: &Path, key: &Path) -> (Status, String) {
    use clap::Parser;
    let args = VerifyCli::try_parse_from([
        "verify",
        "--data-dir",
        dir.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ])
    .unwrap()
    .args;
    let mut out = Vec::new();
    let status = tracer_user::verify::execute(&args, &mut out).unwrap();
    (status, String::from_utf8(out).unwrap())
}

#[test]
fn data_dir_verify_checks_every_checkpoint_against_the_key() {
    let lab = lab(12, 4);
    let pubkey = lab.key_file.with_extension("pub");
    let (status, out) = verify_dir_with_key(&lab.dir, &pubkey);
    assert_eq!(status, Status::Ok, "{out}");
    assert!(out.contains("checkpoints verified with the key"), "{out}");
    // A checkpoint removed, another altered: both named.
    let seg_dir = lab.dir.join("segments");
    let mut cps: Vec<PathBuf> = fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "checkpoint"))
        .collect();
    cps.sort();
    assert!(cps.len() >= 3, "{cps:?}");
    fs::remove_file(&cps[0]).unwrap();
    let text = fs::read_to_string(&cps[1]).unwrap();
    let mut note = Note::parse(&text).unwrap();
    note.text = note.text.replacen("window ", "window 1", 1);
    fs::write(&cps[1], note.encode()).unwrap();
    let (status, out) = verify_dir_with_key(&lab.dir, &pubkey);
    assert_eq!(status, Status::Partial, "{out}");
    assert!(out.contains("has no signed checkpoint"), "{out}");
    assert!(out.contains("does not describe segment"), "{out}");
    // Another key: every signature fails.
    let other = lab.dir.parent().unwrap().join("other");
    let k = SignerKey::generate("cgnat-test-1").unwrap();
    let (_, other_pub) = signing::write_key_pair(&other, &k).unwrap();
    let (status, out) = verify_dir_with_key(&lab.dir, &other_pub);
    assert_eq!(status, Status::Partial, "{out}");
    assert!(out.contains("signature by cgnat-test-1"), "{out}");
}

#[test]
fn a_lost_checkpoint_after_a_signed_one_is_not_signed_again() {
    let lab = lab(12, 4);
    let seg_dir = lab.dir.join("segments");
    let mut cps: Vec<PathBuf> = fs::read_dir(&seg_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "checkpoint"))
        .collect();
    cps.sort();
    let (first, last) = (cps[0].clone(), cps[cps.len() - 1].clone());
    fs::remove_file(&first).unwrap();
    fs::remove_file(&last).unwrap();
    // The next start signs what precedes every signed checkpoint (the chain pins it), not
    // the newest segment, whose content nothing else pins.
    let key = SignerKey::load(&lab.key_file).unwrap();
    let mut w = Writer::open(&lab.dir).unwrap();
    assert_eq!(w.sign_with(Arc::new(key)).unwrap(), 1);
    w.close().unwrap();
    assert!(first.exists());
    assert!(!last.exists());
}
