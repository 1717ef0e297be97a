//! The evaluation itself as a test: Ferry's verdicts against qemu's CPU models.

use ferry_cpu::check::Outcome;
use ferry_eval::{evaluate, EvalArgs};

#[test]
fn ferry_is_never_wrong_when_it_says_compatible() {
    let r = evaluate(&EvalArgs {
        models: vec![],
        only: vec![],
        no_real: true,
        workdir: None,
        json: false,
    })
    .unwrap();
    // The harness really discriminates: a v3 build traps on Nehalem and runs on Haswell.
    let truth = |w: &str, m: &str| {
        r.pairs
            .iter()
            .find(|p| p.workload == w && p.model == m)
            .unwrap()
            .truth
    };
    assert_eq!(truth("march-v3", "Nehalem-v1"), Outcome::Incompatible);
    assert_eq!(truth("march-v3", "Haswell-v1"), Outcome::Compatible);
    assert_eq!(
        truth("lzcnt0", "Nehalem-v1"),
        Outcome::Incompatible,
        "LZCNT as BSR gives another result"
    );
    assert_eq!(truth("avx512-never", "Nehalem-v1"), Outcome::Compatible);
    // An x86-64-v4 build has no native reference on a host without AVX-512: skipped, and said.
    let host = ferry_cpu::CpuProfile::host().unwrap();
    assert_eq!(
        r.skipped.iter().any(|s| s.workload == "march-v4"),
        !host.has("AVX512F"),
        "{:?}",
        r.skipped
    );
    assert_eq!(
        r.workloads.iter().any(|w| w == "march-v4"),
        host.has("AVX512F")
    );
    // Code that nothing reaches: `paths` sees it is dead, `full` cannot. Nehalem lacks even
    // the AVX2 the dead function's reduction uses, which every source here has: on a source
    // without AVX-512, AVX-512 alone would not be counted (neither CPU has it).
    let dead = r
        .pairs
        .iter()
        .find(|p| p.workload == "dead-avx512" && p.model == "Nehalem-v1")
        .unwrap();
    assert_eq!(
        (dead.truth, dead.paths, dead.full),
        (
            Outcome::Compatible,
            Outcome::Compatible,
            Outcome::Incompatible
        )
    );
    for pred in ["paths", "full", "criu"] {
        let s = &r.scores[pred]["overall"];
        assert_eq!(
            s.false_positives,
            0,
            "{pred} said compatible where the workload fails: {:#?}",
            r.pairs
                .iter()
                .filter(|p| p.truth != Outcome::Compatible)
                .filter(|p| match pred {
                    "paths" => p.paths,
                    "full" => p.full,
                    _ => p.criu,
                } == Outcome::Compatible)
                .collect::<Vec<_>>()
        );
    }
    let paths = &r.scores["paths"]["overall"];
    assert!(paths.truly_compatible > 0);
    assert!(paths.recall.unwrap() > r.scores["criu"]["overall"].recall.unwrap_or(0.0));
    eprintln!(
        "paths: precision {:?} recall {:?}",
        paths.precision, paths.recall
    );
}

#[test]
fn real_programs_are_judged_without_false_compatibles() {
    let r = evaluate(&EvalArgs {
        models: vec!["Nehalem-v1".into(), "Haswell-v1".into(), "max".into()],
        only: vec![
            "python3".into(),
            "zstd".into(),
            "openssl".into(),
            "redis-server".into(),
        ],
        no_real: false,
        workdir: None,
        json: false,
    })
    .unwrap();
    assert!(r.workloads.len() >= 3, "{:?}", r.workloads);
    for p in &r.pairs {
        if p.paths == Outcome::Compatible || p.full == Outcome::Compatible {
            assert_eq!(p.truth, Outcome::Compatible, "{p:#?}");
        }
    }
}
