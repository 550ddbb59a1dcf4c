//! Sizes on the command line: `64M`, `1G`, `4096`, `512K` (binary units).

/// A size argument that is not a number with an optional K/M/G suffix.
#[derive(Debug, thiserror::Error)]
#[error("bad size {0:?} (use a number with an optional K, M or G suffix)")]
pub struct SizeError(String);

/// Parses a byte size with an optional binary suffix.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let (digits, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| SizeError(text.to_string()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_suffixes_and_rejects_junk() {
        assert_eq!(super::parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(super::parse_size("4096").unwrap(), 4096);
        assert!(super::parse_size("lots").is_err());
    }
}
