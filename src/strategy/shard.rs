//! Which of an epoch's batches each rank trains on.

/// Rank `rank`'s share of an epoch of `batches` batches over `world` ranks: batch `i` goes to rank
/// `i % world`, in order. When `batches` is not a multiple of `world`, the epoch's first batches
/// are dealt again to the ranks short of one (as PyTorch's `DistributedSampler` repeats samples),
/// or with `drop_last` the last `batches % world` batches are left out, so every rank takes the
/// same number of steps either way. Returns the batches' indices in the epoch.
///
/// ```
/// use nbit::strategy::shard::shard;
/// assert_eq!(shard(5, 0, 2, false), [0, 2, 4]);
/// assert_eq!(shard(5, 1, 2, false), [1, 3, 0]); // batch 0 again
/// assert_eq!(shard(5, 1, 2, true), [1, 3]);
/// ```
pub fn shard(batches: usize, rank: usize, world: usize, drop_last: bool) -> Vec<usize> {
    let world = world.max(1);
    let per_rank = if drop_last {
        batches / world
    } else {
        batches.div_ceil(world)
    };
    (0..per_rank)
        .map(|k| k * world + rank)
        // Only without drop_last can the index pass the end; batches > 0 there.
        .map(|i| if i < batches { i } else { i % batches.max(1) })
        .collect()
}

/// Rank `rank`'s share of `batches` validation batches: every `world`-th batch from `rank`, no
/// repeats (a metric sums rows, so ranks may see different counts).
pub fn shard_evaluation(batches: usize, rank: usize, world: usize) -> Vec<usize> {
    (rank..batches).step_by(world.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_batch_is_dealt_once_and_ranks_take_equal_steps() {
        for batches in 0..20 {
            for world in 1..6 {
                for drop_last in [false, true] {
                    let shards: Vec<Vec<usize>> =
                        (0..world).map(|r| shard(batches, r, world, drop_last)).collect();
                    let steps = shards[0].len();
                    assert!(shards.iter().all(|s| s.len() == steps));
                    let mut seen: Vec<usize> = shards.concat();
                    seen.sort_unstable();
                    seen.dedup();
                    let expected = if drop_last {
                        batches / world * world
                    } else {
                        batches
                    };
                    assert_eq!(
                        seen,
                        (0..expected).collect::<Vec<_>>(),
                        "{batches} {world} {drop_last}"
                    );
                    if !drop_last && batches > 0 {
                        // The repeats fill the last round and no more.
                        assert_eq!(steps * world - batches, (world - batches % world) % world);
                    }
                }
            }
        }
        // Round-robin order: step k of rank r is batch k * world + r.
        assert_eq!(shard(8, 2, 4, false), [2, 6]);
        // Evaluation: no repeats, all batches.
        assert_eq!(shard_evaluation(5, 1, 2), [1, 3]);
        assert_eq!(shard_evaluation(5, 0, 2), [0, 2, 4]);
    }
}
