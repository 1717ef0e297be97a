//! Verdicts: can a scanned workload run on a target CPU profile?

use crate::features::{required_xcr0, xstate_component_names};
use crate::profile::CpuProfile;
use crate::scan::{Example, FeatureUse};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Compatible,
    Incompatible,
    Unknown,
}

impl Outcome {
    pub fn exit_code(self) -> i32 {
        match self {
            Outcome::Compatible => 0,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    Ferry,
    Criu,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Missing {
    pub feature: String,
    /// Why the target cannot run it.
    pub reason: String,
    pub instructions: u64,
    pub modules: Vec<String>,
    pub example: Option<Example>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub silent: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct XsaveVerdict {
    pub ok: bool,
    /// Components any thread's xsave area holds in use (XSTATE_BV), or the source's XCR0
    /// under the CRIU policy.
    pub in_use: String,
    pub in_use_components: Vec<String>,
    pub target_xcr0: String,
    pub missing_components: Vec<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub verdict: Outcome,
    pub policy: Policy,
    pub target: String,
    pub source: Option<String>,
    pub missing: Vec<Missing>,
    /// Features reachable code uses that neither the source nor the target offers: the
    /// process cannot run that code on the source either (it would fault there, or CPU
    /// dispatch never sends it there), so the move changes nothing for it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub neither: Vec<Missing>,
    pub unknown: Vec<Example>,
    pub xsave: XsaveVerdict,
    pub reasons: Vec<String>,
}

fn has_label(target: &CpuProfile, label: &str) -> Result<(), String> {
    let alts: Vec<&str> = label.split('|').collect();
    if alts.iter().any(|f| target.has(f)) {
        return Ok(());
    }
    // Say whether it is the CPU or the OS that lacks it.
    let f = alts[0];
    if target.cpuid_features.contains(f) {
        Err(format!(
            "the target CPU has {f} but its OS did not enable the state it needs in XCR0 (needs {:#x}, XCR0 {:#x})",
            required_xcr0(f),
            target.xsave.xcr0
        ))
    } else {
        Err(format!("the target CPU does not report {label}"))
    }
}

/// `target` offers every usable feature and every enabled state component of `source`: a
/// process running on `source` runs there whatever its code holds, and `check_ferry` finds
/// it compatible whatever the scan found (every feature the target lacks, the source lacks
/// too; every state component in use is enabled on the source, so on the target).
pub fn offers_all_of(target: &CpuProfile, source: &CpuProfile) -> bool {
    source.usable_features.is_subset(&target.usable_features)
        && source.xsave.xcr0 & !target.xsave.xcr0 == 0
}

/// Ferry's verdict: every feature the reachable code needs must be usable on the target, every
/// state component in use must be enabled there, and undecodable reachable code makes the
/// answer unknown.
pub fn check_ferry(
    features: &[FeatureUse],
    unknown: &[Example],
    xstate_in_use: Option<u64>,
    target: &CpuProfile,
    source: Option<&CpuProfile>,
) -> Verdict {
    let mut missing = Vec::new();
    let mut neither = Vec::new();
    for f in features {
        if let Err(reason) = has_label(target, &f.feature) {
            // Code for a feature the source lacks too behaves the same on both: it faults on
            // both, runs with the same (silent) meaning on both, or is never dispatched to.
            let on_source = source.map(|s| has_label(s, &f.feature).is_ok());
            let m = Missing {
                feature: f.feature.clone(),
                reason: if on_source == Some(false) {
                    format!("{reason}, nor does the source: no change for the process")
                } else {
                    reason
                },
                instructions: f.instructions,
                modules: f.modules.clone(),
                example: Some(f.example.clone()),
                silent: f.silent.clone(),
            };
            if on_source == Some(false) {
                neither.push(m);
            } else {
                missing.push(m);
            }
        }
    }
    let xsave = xsave_verdict(xstate_in_use, target);
    let mut reasons = Vec::new();
    if !missing.is_empty() {
        reasons.push(format!(
            "{} feature(s) used by reachable code are not usable on {}",
            missing.len(),
            target.name
        ));
    }
    if !xsave.ok {
        reasons.push(xsave.detail.clone());
    }
    let mut unknown: Vec<Example> = unknown.to_vec();
    unknown.retain(|e| !e.address.is_empty());
    // A destination offering everything the source offers runs whatever runs on the source,
    // undecodable bytes included. (Any feature such a destination lacks, the source lacks
    // too: it is in `neither`, never in `missing`.)
    let superset = source.is_some_and(|s| offers_all_of(target, s));
    if !neither.is_empty() {
        reasons.push(format!(
            "{} feature(s) used by reachable code are offered by neither {} nor the source {}: \
             not counted ({})",
            neither.len(),
            target.name,
            source.map(|s| s.name.as_str()).unwrap_or(""),
            neither
                .iter()
                .map(|m| m.feature.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let verdict = if superset && xsave.ok && !unknown.is_empty() {
        reasons.push(format!(
            "{} offers every feature and state component of the source {}: whatever runs there \
             runs here ({} undecodable instruction(s))",
            target.name,
            source.map(|s| s.name.as_str()).unwrap_or(""),
            unknown.len()
        ));
        Outcome::Compatible
    } else if !missing.is_empty() || !xsave.ok {
        Outcome::Incompatible
    } else if !unknown.is_empty() {
        reasons.push(format!(
            "{} undecodable instruction(s) in reachable code: their features cannot be known",
            unknown.len()
        ));
        Outcome::Unknown
    } else {
        Outcome::Compatible
    };
    Verdict {
        verdict,
        policy: Policy::Ferry,
        target: target.name.clone(),
        source: source.map(|s| s.name.clone()),
        missing,
        neither,
        unknown,
        xsave,
        reasons,
    }
}

fn xsave_verdict(in_use: Option<u64>, target: &CpuProfile) -> XsaveVerdict {
    let txcr0 = target.xsave.xcr0;
    match in_use {
        None => XsaveVerdict {
            ok: true,
            in_use: "n/a".into(),
            in_use_components: vec![],
            target_xcr0: format!("{txcr0:#x}"),
            missing_components: vec![],
            detail: "no running process: no register state to carry".into(),
        },
        Some(bv) => {
            let lacking = bv & !txcr0;
            XsaveVerdict {
                ok: lacking == 0,
                in_use: format!("{bv:#x}"),
                in_use_components: xstate_component_names(bv),
                target_xcr0: format!("{txcr0:#x}"),
                missing_components: xstate_component_names(lacking),
                detail: if lacking == 0 {
                    "every state component in use is enabled on the target".into()
                } else {
                    format!(
                        "register state in use that the target cannot hold: {}",
                        xstate_component_names(lacking).join(", ")
                    )
                },
            }
        }
    }
}

/// CRIU's instruction mask, modelled after its x86 cpuinfo check: the instruction-level bits
/// it compares. It includes bits that are not instructions (ERMS) and lacks newer ones
/// (AVX512_FP16, AVX512_BF16, AVX-VNNI, AMX, PKU, CLWB, GFNI, VAES, ...).
pub const CRIU_INS_MASK: &[&str] = &[
    "FPU",
    "TSC",
    "CX8",
    "SEP",
    "CMOV",
    "CLFSH",
    "MMX",
    "FXSR",
    "SSE",
    "SSE2",
    "SYSCALL",
    "MMXEXT",
    "RDTSCP",
    "D3NOWEXT",
    "D3NOW",
    "SSE3",
    "PCLMULQDQ",
    "MONITOR",
    "SSSE3",
    "FMA",
    "CMPXCHG16B",
    "SSE4_1",
    "SSE4_2",
    "MOVBE",
    "POPCNT",
    "AES",
    "XSAVE",
    "OSXSAVE",
    "AVX",
    "F16C",
    "RDRAND",
    "LZCNT",
    "SSE4A",
    "PREFETCHW",
    "XOP",
    "FMA4",
    "TBM",
    "FSGSBASE",
    "BMI1",
    "HLE",
    "AVX2",
    "BMI2",
    "ERMS",
    "RTM",
    "MPX",
    "AVX512F",
    "AVX512DQ",
    "RDSEED",
    "ADX",
    "CLFLUSHOPT",
    "AVX512PF",
    "AVX512ER",
    "AVX512CD",
    "SHA",
    "AVX512BW",
    "AVX512VL",
    "XSAVEOPT",
    "XSAVEC",
    "XGETBV1",
    "XSAVES",
    "AVX512_VBMI",
];

/// The CRIU policy compares hosts, not workloads: fpu (FPU/FXSR/OSXSAVE/XSAVES bits equal,
/// source XCR0 a subset of the target's, xsave sizes equal) and ins (every masked feature of
/// the source present on the target).
pub fn check_criu(source: &CpuProfile, target: &CpuProfile) -> Verdict {
    let mut reasons = Vec::new();
    for f in ["FPU", "FXSR", "OSXSAVE", "XSAVES"] {
        if source.cpuid_features.contains(f) != target.cpuid_features.contains(f) {
            reasons.push(format!("fpu: {f} differs between source and target"));
        }
    }
    let sx = source.xsave.xcr0;
    let tx = target.xsave.xcr0;
    let xs_ok = sx & tx == sx;
    if !xs_ok {
        reasons.push(format!(
            "fpu: xsave features {sx:#x} of the source are not all enabled on the target ({tx:#x})"
        ));
    }
    if source.xsave.size_enabled != target.xsave.size_enabled {
        reasons.push(format!(
            "fpu: xsave size differs ({} vs {})",
            source.xsave.size_enabled, target.xsave.size_enabled
        ));
    }
    if source.xsave.size_max != target.xsave.size_max {
        reasons.push(format!(
            "fpu: maximum xsave size differs ({} vs {})",
            source.xsave.size_max, target.xsave.size_max
        ));
    }
    let mut missing = Vec::new();
    for f in CRIU_INS_MASK {
        if source.cpuid_features.contains(*f) && !target.cpuid_features.contains(*f) {
            missing.push(Missing {
                feature: f.to_string(),
                reason: "ins: in the source's CPUID but not the target's".into(),
                instructions: 0,
                modules: vec![],
                example: None,
                silent: None,
            });
        }
    }
    if !missing.is_empty() {
        reasons.push(format!("ins: {} masked feature(s) missing", missing.len()));
    }
    let lacking = sx & !tx;
    Verdict {
        verdict: if reasons.is_empty() {
            Outcome::Compatible
        } else {
            Outcome::Incompatible
        },
        policy: Policy::Criu,
        target: target.name.clone(),
        source: Some(source.name.clone()),
        missing,
        neither: Vec::new(),
        unknown: vec![],
        xsave: XsaveVerdict {
            ok: xs_ok,
            in_use: format!("{sx:#x}"),
            in_use_components: xstate_component_names(sx),
            target_xcr0: format!("{tx:#x}"),
            missing_components: xstate_component_names(lacking),
            detail: "CRIU compares the hosts' XCR0 and xsave sizes".into(),
        },
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUMP: &str = include_str!("../../ferry-eval/data/qemu72_user_cpu_models_cpuid_dump.txt");

    fn model(m: &str, xcr0: u64) -> CpuProfile {
        CpuProfile::from_cpuid_dump(DUMP, m, "test", Some(xcr0)).unwrap()
    }

    fn uses(feature: &str) -> FeatureUse {
        FeatureUse {
            feature: feature.into(),
            instructions: 1,
            modules: vec!["m".into()],
            example: Example::default(),
            silent: None,
        }
    }

    #[test]
    fn features_neither_cpu_offers_are_not_counted_against_the_target() {
        let (nehalem, haswell) = (model("Nehalem-v1", 0x3), model("Haswell-v1", 0x7));
        // qemu's models report no AVX-512: a Haswell that has it stands for a newer source.
        let mut newer = haswell.clone();
        newer.usable_features.insert("AVX512F".into());
        assert!(!haswell.has("AVX512F") && newer.has("AVX512F") && !nehalem.has("AVX2"));
        // AVX-512 code is reachable; the source (Haswell) cannot run it either.
        let v = check_ferry(&[uses("AVX512F")], &[], Some(0x3), &nehalem, Some(&haswell));
        assert_eq!(v.verdict, Outcome::Compatible, "{:?}", v.reasons);
        assert_eq!(v.neither.len(), 1);
        assert!(v.missing.is_empty());
        // AVX2 the source has and the target lacks still counts, beside it.
        let v = check_ferry(
            &[uses("AVX512F"), uses("AVX2")],
            &[],
            Some(0x3),
            &nehalem,
            Some(&haswell),
        );
        assert_eq!(v.verdict, Outcome::Incompatible);
        assert_eq!(v.missing.len(), 1);
        assert_eq!(v.missing[0].feature, "AVX2");
        // From a source that has AVX-512, it counts.
        let v = check_ferry(&[uses("AVX512F")], &[], Some(0x7), &haswell, Some(&newer));
        assert_eq!(v.verdict, Outcome::Incompatible);
        // With no source known, everything the target lacks counts.
        let v = check_ferry(&[uses("AVX512F")], &[], Some(0x3), &nehalem, None);
        assert_eq!(v.verdict, Outcome::Incompatible);
        assert!(v.neither.is_empty());
    }

    /// The gate's shortcut: a target offering all of the source's features and state
    /// components is compatible for any scan, and only then.
    #[test]
    fn a_target_offering_all_of_the_source_is_compatible_whatever_the_code() {
        let (nehalem, haswell) = (model("Nehalem-v1", 0x3), model("Haswell-v1", 0x7));
        assert!(offers_all_of(&haswell, &nehalem));
        assert!(offers_all_of(&haswell, &haswell));
        assert!(!offers_all_of(&nehalem, &haswell));
        // The same CPU with AVX state not enabled by its OS offers less.
        let no_avx_state = model("Haswell-v1", 0x3);
        assert!(!offers_all_of(&no_avx_state, &haswell));
        let odd = Example {
            address: "0x1000".into(),
            ..Example::default()
        };
        for scan in [
            vec![uses("AVX2"), uses("AVX512F"), uses("SSE4_2")],
            vec![uses("AMX-TILE")],
        ] {
            for unknown in [vec![], vec![odd.clone()]] {
                for in_use in [0x3, 0x7] {
                    let v = check_ferry(&scan, &unknown, Some(in_use), &haswell, Some(&haswell));
                    assert_eq!(v.verdict, Outcome::Compatible, "{:?}", v.reasons);
                    if in_use == 0x3 {
                        let v =
                            check_ferry(&scan, &unknown, Some(in_use), &haswell, Some(&nehalem));
                        assert_eq!(v.verdict, Outcome::Compatible, "{:?}", v.reasons);
                    }
                }
            }
        }
        // Not a superset: the scan decides.
        let v = check_ferry(&[uses("AVX2")], &[], Some(0x3), &nehalem, Some(&haswell));
        assert_eq!(v.verdict, Outcome::Incompatible);
    }
}
