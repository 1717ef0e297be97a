//! Reading this machine's CPUID leaves and XCR0.

use crate::profile::Leaf;
use std::arch::x86_64::__cpuid_count;

fn cpuid(leaf: u32, subleaf: u32) -> Leaf {
    let r = __cpuid_count(leaf, subleaf);
    Leaf {
        leaf,
        subleaf,
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// The leaves Ferry records, each only when within the CPU's maximum leaf.
pub fn read_leaves() -> Vec<Leaf> {
    let l0 = cpuid(0, 0);
    let mut out = vec![l0];
    let basic = [
        (1, 0),
        (7, 0),
        (7, 1),
        (0xd, 0),
        (0xd, 1),
        (0x14, 0),
        (0x19, 0),
        (0x1d, 0),
        (0x1e, 0),
        (0x24, 0),
    ];
    for (l, s) in basic {
        if l <= l0.eax {
            out.push(cpuid(l, s));
        }
    }
    let e0 = cpuid(0x8000_0000, 0);
    out.push(e0);
    for l in [
        0x8000_0001,
        0x8000_0002,
        0x8000_0003,
        0x8000_0004,
        0x8000_0008,
    ] {
        if l <= e0.eax {
            out.push(cpuid(l, 0));
        }
    }
    out
}

/// XCR0, read with xgetbv. Only call when CPUID.1:ECX.OSXSAVE is set.
pub fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller checked OSXSAVE, so XGETBV with ECX=0 is defined; it reads XCR0
    // into EDX:EAX and touches nothing else.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack));
    }
    (hi as u64) << 32 | lo as u64
}

pub fn brand_string() -> Option<String> {
    if cpuid(0x8000_0000, 0).eax < 0x8000_0004 {
        return None;
    }
    let mut b = Vec::new();
    for l in 0x8000_0002..=0x8000_0004u32 {
        let r = cpuid(l, 0);
        for v in [r.eax, r.ebx, r.ecx, r.edx] {
            b.extend_from_slice(&v.to_le_bytes());
        }
    }
    Some(
        String::from_utf8_lossy(&b)
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string(),
    )
}
