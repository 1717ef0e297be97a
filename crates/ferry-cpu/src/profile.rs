//! CPU profiles: what a host's CPU offers, from live CPUID or from a recorded CPUID dump.
//!
//! A profile keeps the raw leaves as evidence and derives everything else from them with one
//! function (`CpuProfile::from_leaves`), so the host's profile and one built from a dump are
//! computed identically.

use crate::features::{self, Reg, CPUID_BITS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::Path;

pub const PROFILE_FORMAT: &str = "ferry-cpu-profile";
pub const PROFILE_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Leaf {
    pub leaf: u32,
    pub subleaf: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl Leaf {
    fn reg(&self, r: Reg) -> u32 {
        match r {
            Reg::Eax => self.eax,
            Reg::Ebx => self.ebx,
            Reg::Ecx => self.ecx,
            Reg::Edx => self.edx,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct XsaveInfo {
    /// XCR0: the state components the OS enabled.
    pub xcr0: u64,
    pub xcr0_components: Vec<String>,
    /// Where XCR0 came from: `xgetbv`, `given`, or `assumed from CPUID leaf 0xD`.
    pub xcr0_source: String,
    /// Components the CPU supports (CPUID 0xD.0 EDX:EAX).
    pub supported: u64,
    /// Size of the standard-format xsave area for the enabled components (0xD.0 EBX).
    pub size_enabled: u32,
    /// Size for every supported component (0xD.0 ECX).
    pub size_max: u32,
    /// Size of the compacted (XSAVES) area (0xD.1 EBX).
    pub size_compacted: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CpuProfile {
    pub format: String,
    pub version: u32,
    /// A name for reports: host name, qemu model, instance type.
    pub name: String,
    /// How the profile was made: `host`, or `cpuid-dump FILE model NAME`.
    pub origin: String,
    pub vendor: String,
    pub family: u32,
    pub model: u32,
    pub stepping: u32,
    pub model_name: Option<String>,
    pub max_basic_leaf: u32,
    pub max_extended_leaf: u32,
    pub xsave: XsaveInfo,
    /// Every feature bit CPUID reports, state enabled or not.
    pub cpuid_features: BTreeSet<String>,
    /// Features instructions can use here: CPUID bit set and, where the feature has state, that
    /// state enabled in XCR0.
    pub usable_features: BTreeSet<String>,
    /// The leaves the profile was built from (leaves above the maximum leaf are dropped).
    pub leaves: Vec<Leaf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{0}")]
    Invalid(String),
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl CpuProfile {
    /// Derive a profile from raw leaves. `xcr0`: the enabled state components when known (None
    /// assumes the OS enabled every component CPUID 0xD.0 says is supported, as Linux does for
    /// x87/SSE/AVX/AVX-512/PKRU).
    pub fn from_leaves(
        name: &str,
        origin: &str,
        raw: &[Leaf],
        xcr0: Option<(u64, &str)>,
        model_name: Option<String>,
    ) -> Result<Self, ProfileError> {
        let get = |l: u32, s: u32| raw.iter().find(|x| x.leaf == l && x.subleaf == s).copied();
        let l0 =
            get(0, 0).ok_or_else(|| ProfileError::Invalid("CPUID leaf 0 is missing".into()))?;
        let max_basic = l0.eax;
        let max_ext = get(0x8000_0000, 0).map(|l| l.eax).unwrap_or(0);
        // Leaves beyond the maximum return stale data on Intel: drop them.
        let leaves: Vec<Leaf> = raw
            .iter()
            .copied()
            .filter(|l| {
                if l.leaf >= 0x8000_0000 {
                    max_ext >= 0x8000_0000 && l.leaf <= max_ext
                } else {
                    l.leaf <= max_basic
                }
            })
            .collect();
        let find = |l: u32, s: u32| leaves.iter().find(|x| x.leaf == l && x.subleaf == s);
        let mut vendor = Vec::new();
        for r in [l0.ebx, l0.edx, l0.ecx] {
            vendor.extend_from_slice(&r.to_le_bytes());
        }
        let vendor = String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string();
        let sig = find(1, 0).map(|l| l.eax).unwrap_or(0);
        let base_family = (sig >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((sig >> 20) & 0xff)
        } else {
            base_family
        };
        let model = if base_family == 0x6 || base_family == 0xf {
            ((sig >> 4) & 0xf) | (((sig >> 16) & 0xf) << 4)
        } else {
            (sig >> 4) & 0xf
        };
        let mut cpuid_features = BTreeSet::new();
        for &(n, leaf, sub, reg, bit) in CPUID_BITS {
            if let Some(l) = find(leaf, sub) {
                if l.reg(reg) & (1 << bit) != 0 {
                    cpuid_features.insert(n.to_string());
                }
            }
        }
        let d0 = find(0xd, 0).copied();
        let d1 = find(0xd, 1).copied();
        let supported = d0.map(|l| l.eax as u64 | (l.edx as u64) << 32).unwrap_or(0);
        let has_osxsave = cpuid_features.contains("OSXSAVE");
        let (xcr0, xcr0_source) = match xcr0 {
            Some((v, src)) => (v, src.to_string()),
            None if has_osxsave || cpuid_features.contains("XSAVE") => (
                supported,
                "assumed: every component CPUID 0xD.0 supports".to_string(),
            ),
            // Without XSAVE the OS can only have x87 and SSE state.
            None => (0b11, "assumed: no XSAVE, x87 and SSE only".to_string()),
        };
        let usable_features = cpuid_features
            .iter()
            .filter(|f| {
                let need = features::required_xcr0(f);
                need == 0 || (xcr0 & need == need && (has_osxsave || xcr0_source != "xgetbv"))
            })
            .cloned()
            .collect();
        Ok(CpuProfile {
            format: PROFILE_FORMAT.into(),
            version: PROFILE_VERSION,
            name: name.into(),
            origin: origin.into(),
            vendor,
            family,
            model,
            stepping: sig & 0xf,
            model_name,
            max_basic_leaf: max_basic,
            max_extended_leaf: max_ext,
            xsave: XsaveInfo {
                xcr0,
                xcr0_components: features::xstate_component_names(xcr0),
                xcr0_source,
                supported,
                size_enabled: d0.map(|l| l.ebx).unwrap_or(0),
                size_max: d0.map(|l| l.ecx).unwrap_or(0),
                size_compacted: d1.map(|l| l.ebx).unwrap_or(0),
            },
            cpuid_features,
            usable_features,
            leaves,
        })
    }

    pub fn has(&self, feature: &str) -> bool {
        self.usable_features.contains(feature)
    }

    /// Parse and validate a profile saved as JSON.
    pub fn from_json(text: &str, what: &str) -> Result<Self, ProfileError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ProfileError::Invalid(format!("{what}: not valid JSON: {e}")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(PROFILE_FORMAT) {
            return Err(ProfileError::Invalid(format!(
                "{what}: not a Ferry CPU profile (\"format\" must be \"{PROFILE_FORMAT}\")"
            )));
        }
        let ver = v.get("version").and_then(|f| f.as_u64()).unwrap_or(0);
        if ver != PROFILE_VERSION as u64 {
            return Err(ProfileError::Invalid(format!(
                "{what}: profile version {ver} is not supported (this Ferry reads version {PROFILE_VERSION})"
            )));
        }
        let p: CpuProfile = serde_json::from_value(v)
            .map_err(|e| ProfileError::Invalid(format!("{what}: malformed profile: {e}")))?;
        // Re-derive from the leaves so a hand-edited feature list cannot disagree with them.
        let xcr0 = (p.xsave.xcr0, p.xsave.xcr0_source.as_str());
        let again = CpuProfile::from_leaves(
            &p.name,
            &p.origin,
            &p.leaves,
            Some(xcr0),
            p.model_name.clone(),
        )
        .map_err(|e| ProfileError::Invalid(format!("{what}: {e}")))?;
        if again.usable_features != p.usable_features {
            return Err(ProfileError::Invalid(format!(
                "{what}: usable_features disagree with the CPUID leaves it holds"
            )));
        }
        Ok(p)
    }

    pub fn load(path: &Path) -> Result<Self, ProfileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Build a profile from a CPUID dump in the format of
    /// `qemu72_user_cpu_models_cpuid_dump.txt`: one line per model,
    /// `MODEL leaf.subleaf:eax,ebx,ecx,edx ...` (hex).
    pub fn from_cpuid_dump(
        text: &str,
        model: &str,
        origin: &str,
        xcr0: Option<u64>,
    ) -> Result<Self, ProfileError> {
        let models = parse_cpuid_dump(text)?;
        let Some((_, leaves)) = models.iter().find(|(m, _)| m == model) else {
            let names: Vec<&str> = models.iter().map(|(m, _)| m.as_str()).collect();
            return Err(ProfileError::Invalid(format!(
                "model {model:?} is not in the dump (it has: {})",
                names.join(", ")
            )));
        };
        Self::from_leaves(model, origin, leaves, xcr0.map(|x| (x, "given")), None)
    }

    /// Profile of the CPU this process runs on.
    #[cfg(target_arch = "x86_64")]
    pub fn host() -> Result<Self, ProfileError> {
        let leaves = crate::hostcpu::read_leaves();
        let osxsave = leaves.iter().any(|l| l.leaf == 1 && l.ecx & (1 << 27) != 0);
        let xcr0 = if osxsave {
            Some((crate::hostcpu::xgetbv0(), "xgetbv"))
        } else {
            Some((0b11, "xgetbv"))
        };
        let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        Self::from_leaves(&name, "host", &leaves, xcr0, crate::hostcpu::brand_string())
    }
}

/// All models of a CPUID dump with their leaves.
pub fn parse_cpuid_dump(text: &str) -> Result<Vec<(String, Vec<Leaf>)>, ProfileError> {
    let mut out = Vec::new();
    for (no, line) in text.lines().enumerate() {
        let mut words = line.split_whitespace();
        let Some(model) = words.next() else { continue };
        if model == "model" || model.starts_with('#') {
            continue;
        }
        let mut leaves = Vec::new();
        for w in words {
            let bad = || ProfileError::Invalid(format!("line {}: bad leaf entry {w:?}", no + 1));
            let Some((ls, regs)) = w.split_once(':') else {
                return Err(bad());
            };
            let (l, s) = ls.split_once('.').ok_or_else(bad)?;
            let r: Vec<u32> = regs
                .split(',')
                .map(|x| u32::from_str_radix(x, 16).map_err(|_| bad()))
                .collect::<Result<_, _>>()?;
            if r.len() != 4 {
                return Err(bad());
            }
            leaves.push(Leaf {
                leaf: u32::from_str_radix(l, 16).map_err(|_| bad())?,
                subleaf: u32::from_str_radix(s, 16).map_err(|_| bad())?,
                eax: r[0],
                ebx: r[1],
                ecx: r[2],
                edx: r[3],
            });
        }
        if leaves.is_empty() {
            return Err(ProfileError::Invalid(format!(
                "line {}: model {model} has no leaves",
                no + 1
            )));
        }
        out.push((model.to_string(), leaves));
    }
    if out.is_empty() {
        return Err(ProfileError::Invalid(
            "the CPUID dump holds no model".into(),
        ));
    }
    Ok(out)
}
