//! The feature vocabulary shared by profiles and scans.
//!
//! Feature names are iced-x86's `CpuidFeature` names (`AVX2`, `AVX512VL`, `LZCNT`, ...), so an
//! instruction's requirement and a CPU's capability are compared without a translation table
//! that could drift. This module maps CPUID bits to those names, says which state component
//! each feature needs enabled in XCR0, and classifies iced features that need nothing.

use iced_x86::CpuidFeature;

/// Register of a CPUID leaf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// One CPUID feature bit: (name, leaf, subleaf, register, bit).
pub type CpuidBit = (&'static str, u32, u32, Reg, u32);

use Reg::*;

/// Every CPUID bit Ferry reads. Names that are not iced features (ERMS, FSRM, OSXSAVE, ...)
/// describe the CPU but no instruction requires them.
pub const CPUID_BITS: &[CpuidBit] = &[
    ("FPU", 1, 0, Edx, 0),
    ("TSC", 1, 0, Edx, 4),
    ("MSR", 1, 0, Edx, 5),
    ("CX8", 1, 0, Edx, 8),
    ("SEP", 1, 0, Edx, 11),
    ("CMOV", 1, 0, Edx, 15),
    ("CLFSH", 1, 0, Edx, 19),
    ("MMX", 1, 0, Edx, 23),
    ("FXSR", 1, 0, Edx, 24),
    ("SSE", 1, 0, Edx, 25),
    ("SSE2", 1, 0, Edx, 26),
    ("SSE3", 1, 0, Ecx, 0),
    ("PCLMULQDQ", 1, 0, Ecx, 1),
    ("MONITOR", 1, 0, Ecx, 3),
    ("VMX", 1, 0, Ecx, 5),
    ("SMX", 1, 0, Ecx, 6),
    ("SSSE3", 1, 0, Ecx, 9),
    ("FMA", 1, 0, Ecx, 12),
    ("CMPXCHG16B", 1, 0, Ecx, 13),
    ("SSE4_1", 1, 0, Ecx, 19),
    ("SSE4_2", 1, 0, Ecx, 20),
    ("MOVBE", 1, 0, Ecx, 22),
    ("POPCNT", 1, 0, Ecx, 23),
    ("AES", 1, 0, Ecx, 25),
    ("XSAVE", 1, 0, Ecx, 26),
    ("OSXSAVE", 1, 0, Ecx, 27),
    ("AVX", 1, 0, Ecx, 28),
    ("F16C", 1, 0, Ecx, 29),
    ("RDRAND", 1, 0, Ecx, 30),
    ("HYPERVISOR", 1, 0, Ecx, 31),
    ("FSGSBASE", 7, 0, Ebx, 0),
    ("BMI1", 7, 0, Ebx, 3),
    ("HLE", 7, 0, Ebx, 4),
    ("AVX2", 7, 0, Ebx, 5),
    ("BMI2", 7, 0, Ebx, 8),
    ("ERMS", 7, 0, Ebx, 9),
    ("INVPCID", 7, 0, Ebx, 10),
    ("RTM", 7, 0, Ebx, 11),
    ("MPX", 7, 0, Ebx, 14),
    ("AVX512F", 7, 0, Ebx, 16),
    ("AVX512DQ", 7, 0, Ebx, 17),
    ("RDSEED", 7, 0, Ebx, 18),
    ("ADX", 7, 0, Ebx, 19),
    ("SMAP", 7, 0, Ebx, 20),
    ("AVX512_IFMA", 7, 0, Ebx, 21),
    ("CLFLUSHOPT", 7, 0, Ebx, 23),
    ("CLWB", 7, 0, Ebx, 24),
    ("AVX512PF", 7, 0, Ebx, 26),
    ("AVX512ER", 7, 0, Ebx, 27),
    ("AVX512CD", 7, 0, Ebx, 28),
    ("SHA", 7, 0, Ebx, 29),
    ("AVX512BW", 7, 0, Ebx, 30),
    ("AVX512VL", 7, 0, Ebx, 31),
    ("PREFETCHWT1", 7, 0, Ecx, 0),
    ("AVX512_VBMI", 7, 0, Ecx, 1),
    ("UMIP", 7, 0, Ecx, 2),
    ("PKU", 7, 0, Ecx, 3),
    ("OSPKE", 7, 0, Ecx, 4),
    ("WAITPKG", 7, 0, Ecx, 5),
    ("AVX512_VBMI2", 7, 0, Ecx, 6),
    ("CET_SS", 7, 0, Ecx, 7),
    ("GFNI", 7, 0, Ecx, 8),
    ("VAES", 7, 0, Ecx, 9),
    ("VPCLMULQDQ", 7, 0, Ecx, 10),
    ("AVX512_VNNI", 7, 0, Ecx, 11),
    ("AVX512_BITALG", 7, 0, Ecx, 12),
    ("AVX512_VPOPCNTDQ", 7, 0, Ecx, 14),
    ("RDPID", 7, 0, Ecx, 22),
    ("KL", 7, 0, Ecx, 23),
    ("CLDEMOTE", 7, 0, Ecx, 25),
    ("MOVDIRI", 7, 0, Ecx, 27),
    ("MOVDIR64B", 7, 0, Ecx, 28),
    ("ENQCMD", 7, 0, Ecx, 29),
    ("AVX512_4VNNIW", 7, 0, Edx, 2),
    ("AVX512_4FMAPS", 7, 0, Edx, 3),
    ("FSRM", 7, 0, Edx, 4),
    ("UINTR", 7, 0, Edx, 5),
    ("AVX512_VP2INTERSECT", 7, 0, Edx, 8),
    ("SERIALIZE", 7, 0, Edx, 14),
    ("TSXLDTRK", 7, 0, Edx, 16),
    ("PCONFIG", 7, 0, Edx, 18),
    ("CET_IBT", 7, 0, Edx, 20),
    ("AMX_BF16", 7, 0, Edx, 22),
    ("AVX512_FP16", 7, 0, Edx, 23),
    ("AMX_TILE", 7, 0, Edx, 24),
    ("AMX_INT8", 7, 0, Edx, 25),
    ("SHA512", 7, 1, Eax, 0),
    ("SM3", 7, 1, Eax, 1),
    ("SM4", 7, 1, Eax, 2),
    ("RAO_INT", 7, 1, Eax, 3),
    ("AVX_VNNI", 7, 1, Eax, 4),
    ("AVX512_BF16", 7, 1, Eax, 5),
    ("CMPCCXADD", 7, 1, Eax, 7),
    ("FRED", 7, 1, Eax, 17),
    ("LKGS", 7, 1, Eax, 18),
    ("WRMSRNS", 7, 1, Eax, 19),
    ("AMX_FP16", 7, 1, Eax, 21),
    ("HRESET", 7, 1, Eax, 22),
    ("AVX_IFMA", 7, 1, Eax, 23),
    ("MSRLIST", 7, 1, Eax, 27),
    ("AVX_VNNI_INT8", 7, 1, Edx, 4),
    ("AVX_NE_CONVERT", 7, 1, Edx, 5),
    ("AMX_COMPLEX", 7, 1, Edx, 8),
    ("AVX_VNNI_INT16", 7, 1, Edx, 10),
    ("PREFETCHITI", 7, 1, Edx, 14),
    ("AVX10", 7, 1, Edx, 19),
    ("APX_F", 7, 1, Edx, 21),
    ("XSAVEOPT", 0xd, 1, Eax, 0),
    ("XSAVEC", 0xd, 1, Eax, 1),
    ("XGETBV1", 0xd, 1, Eax, 2),
    ("XSAVES", 0xd, 1, Eax, 3),
    ("PTWRITE", 0x14, 0, Ebx, 4),
    ("LAHF_LM", 0x8000_0001, 0, Ecx, 0),
    ("SVM", 0x8000_0001, 0, Ecx, 2),
    ("LZCNT", 0x8000_0001, 0, Ecx, 5),
    ("SSE4A", 0x8000_0001, 0, Ecx, 6),
    ("PREFETCHW", 0x8000_0001, 0, Ecx, 8),
    ("XOP", 0x8000_0001, 0, Ecx, 11),
    ("SKINIT", 0x8000_0001, 0, Ecx, 12),
    ("LWP", 0x8000_0001, 0, Ecx, 15),
    ("FMA4", 0x8000_0001, 0, Ecx, 16),
    ("TBM", 0x8000_0001, 0, Ecx, 21),
    ("MONITORX", 0x8000_0001, 0, Ecx, 29),
    ("SYSCALL", 0x8000_0001, 0, Edx, 11),
    ("NX", 0x8000_0001, 0, Edx, 20),
    ("MMXEXT", 0x8000_0001, 0, Edx, 22),
    ("PDPE1GB", 0x8000_0001, 0, Edx, 26),
    ("RDTSCP", 0x8000_0001, 0, Edx, 27),
    ("X64", 0x8000_0001, 0, Edx, 29),
    ("D3NOWEXT", 0x8000_0001, 0, Edx, 30),
    ("D3NOW", 0x8000_0001, 0, Edx, 31),
    ("CLZERO", 0x8000_0008, 0, Ebx, 0),
    ("RDPRU", 0x8000_0008, 0, Ebx, 4),
    ("MCOMMIT", 0x8000_0008, 0, Ebx, 8),
    ("WBNOINVD", 0x8000_0008, 0, Ebx, 9),
];

/// XCR0 state components, by bit.
pub const XSTATE_COMPONENTS: &[(u32, &str)] = &[
    (0, "x87"),
    (1, "sse"),
    (2, "avx (ymm_hi128)"),
    (3, "mpx bndregs"),
    (4, "mpx bndcsr"),
    (5, "avx512 opmask"),
    (6, "avx512 zmm_hi256"),
    (7, "avx512 hi16_zmm"),
    (9, "pkru"),
    (11, "cet_u"),
    (12, "cet_s"),
    (17, "amx tilecfg"),
    (18, "amx tiledata"),
    (19, "apx"),
];

pub fn xstate_component_names(mask: u64) -> Vec<String> {
    (0..64)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            XSTATE_COMPONENTS
                .iter()
                .find(|(bit, _)| *bit == b)
                .map(|(_, n)| n.to_string())
                .unwrap_or_else(|| format!("component {b}"))
        })
        .collect()
}

pub const XCR0_SSE_AVX: u64 = 0b110;
pub const XCR0_AVX512: u64 = 0b1110_0110;
pub const XCR0_AMX: u64 = 0b11 << 17;
pub const XCR0_PKRU: u64 = 1 << 9;
pub const XCR0_APX: u64 = 1 << 19;

/// The XCR0 bits the OS must have enabled for an instruction of this feature to run
/// (otherwise it raises #UD even when CPUID has the bit).
pub fn required_xcr0(feature: &str) -> u64 {
    if feature.starts_with("AVX512") {
        XCR0_AVX512
    } else if feature.starts_with("AMX") {
        XCR0_AMX
    } else if feature == "PKU" {
        XCR0_PKRU
    } else if feature == "APX_F" {
        XCR0_APX
    } else if feature.starts_with("AVX") || matches!(feature, "FMA" | "F16C" | "FMA4" | "XOP") {
        XCR0_SSE_AVX
    } else {
        0
    }
}

/// What an instruction's iced feature asks of a CPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Need {
    /// Every x86-64 CPU runs it.
    Baseline,
    /// Runs as a NOP (hint space) where the feature is absent: nothing required.
    Hint,
    /// The CPU must have this feature.
    Feature(&'static str),
    /// Any one of these suffices.
    AnyOf(&'static [&'static str]),
}

impl Need {
    pub fn label(&self) -> Option<String> {
        match self {
            Need::Feature(f) => Some((*f).to_string()),
            Need::AnyOf(fs) => Some(fs.join("|")),
            _ => None,
        }
    }
}

/// Features that, where absent, change results silently instead of trapping.
pub fn silent_when_missing(feature: &str) -> Option<&'static str> {
    match feature {
        "LZCNT" => Some("runs as BSR on CPUs without LZCNT: no SIGILL, a different result"),
        "BMI1" => Some("TZCNT runs as BSF on CPUs without BMI1: no SIGILL, a different result"),
        _ => None,
    }
}

/// Map one iced feature to what it needs of the CPU.
pub fn need_of(f: CpuidFeature) -> Need {
    use CpuidFeature as C;
    match f {
        C::INTEL8086 | C::INTEL186 | C::INTEL286 | C::INTEL386 | C::INTEL486 | C::X64 => {
            Need::Baseline
        }
        C::FPU | C::FPU287 | C::FPU387 | C::CMOV | C::CX8 | C::CPUID | C::TSC | C::MMX => {
            Need::Baseline
        }
        C::SSE | C::SSE2 | C::FXSR | C::SYSCALL | C::CLFSH | C::PAUSE | C::MULTIBYTENOP => {
            Need::Baseline
        }
        C::SEP => Need::Baseline,
        // ENDBR64 and the shadow-stack reads live in the hint (NOP) space; prefetch hints and
        // cldemote too.
        C::CET_IBT | C::CET_SS | C::PREFETCHW | C::PREFETCHWT1 | C::CLDEMOTE | C::PREFETCHITI => {
            Need::Hint
        }
        C::HLE_or_RTM => Need::AnyOf(&["HLE", "RTM"]),
        C::HLE => Need::Hint,
        other => Need::Feature(iced_name(other)),
    }
}

/// iced's name of a feature as a `'static str`.
pub fn iced_name(f: CpuidFeature) -> &'static str {
    // The Debug names of CpuidFeature are stable identifiers; leak-free interning through a
    // table built once.
    use std::sync::OnceLock;
    static NAMES: OnceLock<Vec<&'static str>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        CpuidFeature::values()
            .map(|v| &*Box::leak(format!("{v:?}").into_boxed_str()))
            .collect()
    });
    names[f as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_iced() {
        assert_eq!(iced_name(CpuidFeature::AVX512VL), "AVX512VL");
        assert_eq!(need_of(CpuidFeature::AVX2), Need::Feature("AVX2"));
        assert_eq!(need_of(CpuidFeature::SSE2), Need::Baseline);
        assert_eq!(need_of(CpuidFeature::CET_IBT), Need::Hint);
    }

    #[test]
    fn every_cpuid_name_that_is_an_iced_feature_is_spelled_like_iced() {
        // A typo in CPUID_BITS would make a feature never available: catch it here.
        let iced: Vec<String> = CpuidFeature::values().map(|v| format!("{v:?}")).collect();
        let descriptive = [
            "OSXSAVE",
            "HYPERVISOR",
            "ERMS",
            "UMIP",
            "OSPKE",
            "FSRM",
            "AVX10",
            "APX_F",
            "XGETBV1",
            "LAHF_LM",
            "NX",
            "MMXEXT",
            "PDPE1GB",
            "SMAP",
            "INVPCID",
        ];
        for (n, ..) in CPUID_BITS {
            assert!(
                iced.iter().any(|i| i == n) || descriptive.contains(n),
                "{n} is neither an iced feature nor a known descriptive bit"
            );
        }
    }

    #[test]
    fn xcr0_gating() {
        assert_eq!(required_xcr0("AVX2"), XCR0_SSE_AVX);
        assert_eq!(required_xcr0("AVX512_FP16"), XCR0_AVX512);
        assert_eq!(required_xcr0("AMX_TILE"), XCR0_AMX);
        assert_eq!(required_xcr0("POPCNT"), 0);
        assert_eq!(required_xcr0("AVX_VNNI"), XCR0_SSE_AVX);
    }
}
