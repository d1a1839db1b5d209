//! On-disk encoding of counters in the sled tree `counters`.
//!
//! Key: `[VERSION][expires_at: u64 big-endian][counter key bytes]`, so a
//! range scan from the start finds every expired counter in order.
//! Value: the count as `u64` big-endian.
//!
//! This is a compatibility contract: change `VERSION` if it changes.

/// Format version byte, first in every key.
pub const VERSION: u8 = 1;

/// Encodes a counter's sled key.
pub fn encode(expires_at: u64, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + key.len());
    out.push(VERSION);
    out.extend_from_slice(&expires_at.to_be_bytes());
    out.extend_from_slice(key);
    out
}

/// The smallest key of a counter expiring at `expires_at`: keys below it
/// expire earlier.
pub fn expiry_bound(expires_at: u64) -> Vec<u8> {
    encode(expires_at, &[])
}

/// Decodes a sled key into `(expires_at, counter key)`.
pub fn decode(raw: &[u8]) -> Option<(u64, &[u8])> {
    let (&version, rest) = raw.split_first()?;
    if version != VERSION || rest.len() < 8 {
        return None;
    }
    let (exp, key) = rest.split_at(8);
    Some((u64::from_be_bytes(exp.try_into().ok()?), key))
}

/// Decodes a count.
pub fn decode_value(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(exp in any::<u64>(), key in proptest::collection::vec(any::<u8>(), 0..64)) {
            let enc = encode(exp, &key);
            prop_assert_eq!(decode(&enc), Some((exp, key.as_slice())));
        }

        #[test]
        fn order_follows_expiry(a in any::<u64>(), b in any::<u64>(), ka in proptest::collection::vec(any::<u8>(), 0..8), kb in proptest::collection::vec(any::<u8>(), 0..8)) {
            prop_assume!(a != b);
            prop_assert_eq!(encode(a, &ka) < encode(b, &kb), a < b);
            prop_assert!(expiry_bound(a.max(b)) > encode(a.min(b), &ka));
        }
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(decode(&[]), None);
        assert_eq!(decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(decode(&[1, 0, 0]), None);
        assert_eq!(decode_value(&[1, 2, 3]), None);
    }
}
