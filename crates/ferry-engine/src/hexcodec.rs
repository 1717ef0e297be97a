//! Hex encoding for binary blobs carried in JSON metadata (xsave areas, siginfo, small file
//! contents).

use crate::{EngineError, Result};

pub fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Decode hex; `what` names the field in the error.
pub fn unhex(s: &str, what: &str) -> Result<Vec<u8>> {
    let bad = || EngineError::Failed(format!("{what} in the image is not valid hex"));
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .and_then(|p| u8::from_str_radix(p, 16).ok())
                .ok_or_else(bad)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip_and_rejects() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(super::hex(&b), "0001abff");
        assert_eq!(super::unhex("0001abff", "x").unwrap(), b);
        assert!(super::unhex("0g", "x").is_err());
        assert!(super::unhex("abc", "x").is_err());
        assert!(super::unhex("é1", "x").is_err());
    }
}
