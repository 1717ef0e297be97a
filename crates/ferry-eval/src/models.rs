//! Destination profiles for qemu's CPU models.
//!
//! qemu-user's CPUID for a model claims some features its TCG cannot execute (AVX-512, PKU,
//! SHA, ...). The destination is "TCG emulating the model", so its profile is the model's
//! CPUID dump with those bits cleared, as measured by the single-instruction probes of the
//! gating matrix, and with the XCR0 that xgetbv returns under that model.

use anyhow::{anyhow, bail, Result};
use ferry_cpu::features::{Reg, CPUID_BITS};
use ferry_cpu::profile::{parse_cpuid_dump, Leaf};
use ferry_cpu::CpuProfile;

pub const CPUID_DUMP: &str = include_str!("../data/qemu72_user_cpu_models_cpuid_dump.txt");
pub const GATING_MATRIX: &str = include_str!("../data/qemu72_tcg_feature_gating_matrix.csv");

/// Probe name in the matrix -> the feature it exercises.
const PROBES: &[(&str, &str)] = &[
    ("ssse3", "SSSE3"),
    ("sse41", "SSE4_1"),
    ("sse42", "SSE4_2"),
    ("popcnt", "POPCNT"),
    ("cmpxchg16b", "CMPXCHG16B"),
    ("aes", "AES"),
    ("pclmul", "PCLMULQDQ"),
    ("avx", "AVX"),
    ("f16c", "F16C"),
    ("rdrand", "RDRAND"),
    ("avx2", "AVX2"),
    ("fma", "FMA"),
    ("bmi1", "BMI1"),
    ("bmi2", "BMI2"),
    ("lzcnt", "LZCNT"),
    ("movbe", "MOVBE"),
    ("adx", "ADX"),
    ("rdseed", "RDSEED"),
    ("sha", "SHA"),
    ("rdtscp", "RDTSCP"),
    ("rdpid", "RDPID"),
    ("xsave_xgetbv", "XSAVE"),
    ("fsgsbase", "FSGSBASE"),
    ("pku", "PKU"),
    ("clflushopt", "CLFLUSHOPT"),
    ("clwb", "CLWB"),
    ("gfni_sse", "GFNI"),
    ("vaes256", "VAES"),
    ("vpclmul256", "VPCLMULQDQ"),
    ("avx512f", "AVX512F"),
    ("avx512vl", "AVX512VL"),
    ("avx512bw", "AVX512BW"),
    ("avx512vnni", "AVX512_VNNI"),
    ("avx512fp16", "AVX512_FP16"),
    ("avx512bf16", "AVX512_BF16"),
    ("avxvnni", "AVX_VNNI"),
    ("movdiri", "MOVDIRI"),
    ("serialize", "SERIALIZE"),
    ("xtest", "RTM"),
    ("amx_tilerelease", "AMX_TILE"),
];

/// A probe cell: ran (with its printed value, if any) or trapped.
fn cell_ok(cell: &str) -> (bool, Option<&str>) {
    let ok = cell.starts_with("ok");
    let val = cell.find('(').and_then(|i| cell[i + 1..].strip_suffix(')'));
    (ok, val)
}

fn clear_bit(leaves: &mut [Leaf], feature: &str) {
    for &(n, leaf, sub, reg, bit) in CPUID_BITS {
        if n != feature {
            continue;
        }
        for l in leaves
            .iter_mut()
            .filter(|l| l.leaf == leaf && l.subleaf == sub)
        {
            let r = match reg {
                Reg::Eax => &mut l.eax,
                Reg::Ebx => &mut l.ebx,
                Reg::Ecx => &mut l.ecx,
                Reg::Edx => &mut l.edx,
            };
            *r &= !(1u32 << bit);
        }
    }
}

pub fn destination_profiles() -> Result<Vec<CpuProfile>> {
    let dump = parse_cpuid_dump(CPUID_DUMP)?;
    let mut lines = GATING_MATRIX.lines();
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| anyhow!("empty gating matrix"))?
        .split(',')
        .collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let mut out = Vec::new();
    for (col, model) in header.iter().enumerate().skip(1) {
        let Some((_, leaves)) = dump.iter().find(|(m, _)| m == model) else {
            bail!("model {model} of the gating matrix is not in the CPUID dump");
        };
        let mut leaves = leaves.clone();
        let mut xcr0 = 0b11u64;
        for row in &rows {
            let Some(&cell) = row.get(col) else { continue };
            let (ok, val) = cell_ok(cell);
            if row[0] == "xsave_xgetbv" {
                if let Some(v) = val.filter(|v| !v.is_empty()) {
                    xcr0 = u64::from_str_radix(v, 16)?;
                }
            }
            let Some(&(_, feature)) = PROBES.iter().find(|(p, _)| *p == row[0]) else {
                continue;
            };
            // LZCNT "ok(0)" ran as BSR: the feature is not there.
            let really = ok && !(feature == "LZCNT" && val == Some("0"));
            if !really {
                clear_bit(&mut leaves, feature);
                if feature == "RTM" {
                    clear_bit(&mut leaves, "HLE");
                }
            }
        }
        let origin = format!(
            "qemu-x86_64 7.2 TCG, -cpu {model}: CPUID dump minus features the gating matrix shows trapping"
        );
        out.push(CpuProfile::from_leaves(
            model,
            &origin,
            &leaves,
            Some((xcr0, "xgetbv under qemu (gating matrix)")),
            None,
        )?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_profiles_reflect_tcg() {
        let ps = destination_profiles().unwrap();
        let get = |n: &str| ps.iter().find(|p| p.name == n).unwrap();
        let hsw = get("Haswell-v1");
        assert!(hsw.has("AVX2") && hsw.has("LZCNT") && hsw.has("MOVBE"));
        assert!(!hsw.has("ADX"));
        let nhm = get("Nehalem-v1");
        assert!(!nhm.has("AVX") && !nhm.has("LZCNT") && nhm.has("SSE4_2"));
        // Skylake-Server claims AVX-512 but TCG cannot run it and XCR0 lacks its state.
        let skx = get("Skylake-Server-v1");
        assert!(skx.cpuid_features.contains("AVX2"));
        assert!(!skx.has("AVX512F"));
        let q = get("qemu64");
        assert!(!q.has("SSSE3") && !q.has("POPCNT"));
        assert_eq!(ps.len(), 14);
    }
}
