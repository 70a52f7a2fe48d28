//! Partitioned topics: which of a topic's P partition subjects a message goes to.
//!
//! A topic that opts in (`NatsConfig::partitions`) is published to the P literal
//! subjects `<subject>.0` … `<subject>.{P-1}`. A message with an aggregate id goes
//! to partition [`partition_of`]`(id, P)`; one without an id goes round-robin.
//!
//! The partition hash must not correlate with the pools' worker slot
//! (`stable_hash(id) % workers`) nor with the rollout bucket
//! (`(stable_hash(id) >> 32) % 100`): a member that owns a few partitions must still
//! spread their aggregates over all of its workers. It is therefore the stable hash
//! mixed once more, after an xor with a fixed constant, by the same MurmurHash3
//! 64-bit finaliser:
//!
//! ```text
//! h = FNV-1a-64(utf8(aggregate_id))          offset 0xcbf29ce484222325, prime 0x100000001b3
//! h = fmix64(h)                              = eventbus_core::raw::stable_hash(id)
//! p = fmix64(h ^ 0x9e3779b97f4a7c15) % P
//! fmix64(k): k ^= k >> 33; k *= 0xff51afd7ed558ccd; k ^= k >> 33;
//!            k *= 0xc4ceb9fe1a85ec53; k ^= k >> 33   (wrapping 64-bit multiplies)
//! ```
//!
//! `docs/nats.md` gives test vectors; the unit tests below assert them.

use eventbus_core::raw::stable_hash;

/// Most partitions a topic may have.
pub const MAX_PARTITIONS: u32 = 1024;

/// Mixed into the stable hash before the second finaliser round (the 64-bit
/// golden ratio), so partitions are independent of worker slots and rollout buckets.
const PARTITION_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The 64-bit partition hash of an aggregate id (see the module docs).
pub fn partition_hash(aggregate_id: &str) -> u64 {
    fmix64(stable_hash(aggregate_id.as_bytes()) ^ PARTITION_SEED)
}

/// The partition, among `partitions`, of the messages of `aggregate_id`.
///
/// # Panics
/// When `partitions` is zero.
pub fn partition_of(aggregate_id: &str, partitions: u32) -> u32 {
    assert!(partitions > 0, "partition count must be positive");
    (partition_hash(aggregate_id) % u64::from(partitions)) as u32
}

/// The subject of partition `n` of a topic whose subject is `subject`.
pub(crate) fn partition_subject(subject: &str, n: u32) -> String {
    format!("{subject}.{n}")
}

/// Every partition subject of `subject`, in partition order.
pub(crate) fn partition_subjects(subject: &str, partitions: u32) -> Vec<String> {
    (0..partitions)
        .map(|n| partition_subject(subject, n))
        .collect()
}

/// The layout `subjects` show for a topic whose subject is `subject`, in words.
pub(crate) fn describe_layout(subject: &str, subjects: &[String]) -> String {
    let tail = |s: &String| {
        s.strip_prefix(subject)
            .and_then(|t| t.strip_prefix('.'))
            .and_then(|t| t.parse::<u32>().ok())
    };
    let mut numbers: Vec<u32> = subjects.iter().filter_map(tail).collect();
    numbers.sort_unstable();
    let partitioned = !subjects.is_empty()
        && numbers.len() == subjects.len()
        && numbers.iter().enumerate().all(|(i, &n)| i as u32 == n);
    if partitioned {
        let p = numbers.len() as u32;
        format!(
            "partitioned into {p} (subjects `{}` … `{}`)",
            partition_subject(subject, 0),
            partition_subject(subject, p - 1)
        )
    } else if subjects.len() == 1 && subjects[0] == subject {
        format!("unpartitioned (subject `{subject}`)")
    } else {
        format!("subjects {subjects:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventbus_core::raw::{rollout_bucket, slot};

    /// The vectors of `docs/nats.md` ("Publishing from another client"): part of
    /// the contract with publishers outside this library.
    #[test]
    fn documented_vectors() {
        let vectors: [(&str, u64, [u32; 3]); 6] = [
            ("", 0xe08b_237d_9079_2b43, [3, 7, 3]),
            ("order-1", 0x29e6_dc8c_d6da_0e0b, [3, 11, 11]),
            ("order-2", 0xc66a_82dd_4beb_f8aa, [2, 6, 42]),
            ("customer-42", 0xc3a2_62af_386f_f2de, [2, 10, 30]),
            ("aggregate-ü", 0x82d5_9149_ca7f_1ae8, [0, 8, 40]),
            (
                "3f2a9c1e-8d4b-4e6f-9a1b-2c3d4e5f6a7b",
                0x5ba7_4c99_2d3e_8f92,
                [2, 10, 18],
            ),
        ];
        for (id, hash, [p4, p12, p64]) in vectors {
            assert_eq!(partition_hash(id), hash, "partition_hash({id:?})");
            assert_eq!(
                [
                    partition_of(id, 4),
                    partition_of(id, 12),
                    partition_of(id, 64)
                ],
                [p4, p12, p64],
                "partition_of({id:?}, 4 / 12 / 64)"
            );
        }
    }

    /// Partitions and worker slots (and rollout buckets) do not correlate: the
    /// aggregates of one partition spread evenly over every worker.
    #[test]
    fn independent_of_worker_slots_and_rollout_buckets() {
        let (p, workers, n) = (16u32, 16usize, 64_000);
        let mut matrix = vec![[0u32; 16]; p as usize];
        let mut buckets = vec![[0u32; 10]; p as usize];
        for i in 0..n {
            let id = format!("agg-{i}");
            let part = partition_of(&id, p) as usize;
            let route = stable_hash(id.as_bytes());
            matrix[part][slot(route, workers)] += 1;
            buckets[part][usize::from(rollout_bucket(route) / 10)] += 1;
        }
        // 250 expected per cell (400 per bucket decile).
        for (part, row) in matrix.iter().enumerate() {
            assert!(
                row.iter().all(|c| (170..330).contains(c)),
                "partition {part} over workers: {row:?}"
            );
        }
        for (part, row) in buckets.iter().enumerate() {
            assert!(
                row.iter().all(|c| (300..500).contains(c)),
                "partition {part} over rollout deciles: {row:?}"
            );
        }
    }

    #[test]
    fn layouts_in_words() {
        let subjects = partition_subjects("orders", 3);
        assert_eq!(subjects, ["orders.0", "orders.1", "orders.2"]);
        assert_eq!(
            describe_layout("orders", &subjects),
            "partitioned into 3 (subjects `orders.0` … `orders.2`)"
        );
        assert_eq!(
            describe_layout("orders", &["orders".to_owned()]),
            "unpartitioned (subject `orders`)"
        );
        assert!(describe_layout("orders", &["x".to_owned()]).contains("[\"x\"]"));
    }
}
