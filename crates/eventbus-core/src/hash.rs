//! The stable key hash, and what is derived from it apart from routing: the same
//! key lands in the same partition and rollout bucket in every process and every
//! version.
//!
//! FNV-1a (64 bit) followed by the MurmurHash3 64-bit finaliser for avalanche. It is
//! fixed by this crate and never seeded, unlike `std`'s `RandomState`.
//!
//! Partitioning is named apart from routing: the memory broker's partition of
//! a key ([`partition`]) and the rollout bucket ([`rollout_bucket`]) are
//! functions of [`stable_hash`] alone, as is a backend's own partition of a key
//! where it decides one (a mix of [`stable_hash`] of its own, kept in the
//! backend and pinned by its tests). Which worker runs a route is the pools'
//! routing rule ([`routing`](crate::raw::routing)), free to change without
//! moving a key to another partition or another pool.

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Stable 64-bit hash of `bytes`.
#[inline]
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    fmix64(h)
}

#[inline]
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The partition among `partitions` of a key whose [`stable_hash`] is `key_hash`
/// (the memory broker's partitioning of keyed records).
///
/// # Panics
/// When `partitions` is zero.
#[inline]
pub fn partition(key_hash: u64, partitions: usize) -> usize {
    assert!(partitions > 0, "partition count must be positive");
    (key_hash % partitions as u64) as usize
}

/// Rollout bucket, 0..100, for a key's [`stable_hash`]. Uses the high bits so it
/// is independent of [`partition`] (and of the fixed routing slot) for
/// power-of-two counts.
#[inline]
pub fn rollout_bucket(route: u64) -> u8 {
    ((route >> 32) % 100) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_fixed() {
        // These values are part of the contract: changing them moves keys between
        // workers across a deploy.
        assert_eq!(stable_hash(b""), 0xefd01f60ba992926);
        assert_eq!(stable_hash(b"order-1"), 0x491b422e3af0d9a5);
        assert_eq!(stable_hash(b"customer-42"), 0xe5c7993df9de03b9);
        assert_eq!(partition(stable_hash(b"order-1"), 256), 165);
        assert_eq!(partition(stable_hash(b"customer-42"), 12), 5);
        assert_eq!(rollout_bucket(stable_hash(b"order-1")), 82);
    }

    #[test]
    fn spreads_keys() {
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[partition(stable_hash(format!("k{i}").as_bytes()), 16)] += 1;
        }
        assert!(counts.iter().all(|c| (700..1300).contains(c)), "{counts:?}");
        let mut buckets = [0u32; 100];
        for i in 0..100_000 {
            buckets[rollout_bucket(stable_hash(format!("k{i}").as_bytes())) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|c| (800..1200).contains(c)),
            "{buckets:?}"
        );
    }
}
