//! The buffer pool's free slots, as a bitmap, so that a buffer of several slots is handed out
//! as one contiguous run of memory whenever one is free: an RDMA receiver then grants a piece
//! through one memory window (one bind, one invalidation by the source's answer) instead of
//! one per slot. Pure bookkeeping, no memory of its own.

/// Which slots are free (bit set) among `total`.
#[derive(Debug, Clone)]
pub(super) struct FreeSlots {
    words: Vec<u64>,
    count: usize,
}

impl FreeSlots {
    /// Every one of `total` slots free.
    pub(super) fn all(total: usize) -> FreeSlots {
        let mut words = vec![u64::MAX; total.div_ceil(64)];
        if !total.is_multiple_of(64) {
            *words.last_mut().expect("a word") = (1u64 << (total % 64)) - 1;
        }
        FreeSlots {
            words,
            count: total,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.count
    }

    fn is_free(&self, slot: usize) -> bool {
        self.words[slot / 64] & (1 << (slot % 64)) != 0
    }

    fn clear(&mut self, slot: usize) {
        self.words[slot / 64] &= !(1 << (slot % 64));
    }

    /// Takes `needed` slots, in ascending order: the lowest run of `needed` adjacent free
    /// slots if there is one, else the lowest `needed` free slots. `None` if fewer are free.
    #[cfg(test)]
    pub(super) fn take(&mut self, needed: usize) -> Option<Vec<u32>> {
        self.take_in(0..self.words.len() * 64, needed)
    }

    /// Free slots in `range`.
    pub(super) fn count_in(&self, range: std::ops::Range<usize>) -> usize {
        range.filter(|&slot| self.is_free(slot)).count()
    }

    /// Like [`FreeSlots::take`], but only slots in `range` (one part of a pool split by NUMA
    /// node: a buffer never spans two parts, so one rail's registration covers it).
    pub(super) fn take_in(
        &mut self,
        range: std::ops::Range<usize>,
        needed: usize,
    ) -> Option<Vec<u32>> {
        let range = range.start..range.end.min(self.words.len() * 64);
        if needed > self.count || needed > range.len() {
            return None;
        }
        let mut free_in_range = Vec::with_capacity(needed);
        let mut run_start = range.start;
        let mut run = 0;
        let mut found = None;
        for slot in range {
            if !self.is_free(slot) {
                run = 0;
                continue;
            }
            if free_in_range.len() < needed {
                free_in_range.push(slot as u32);
            }
            if run == 0 {
                run_start = slot;
            }
            run += 1;
            if run == needed {
                found = Some(run_start);
                break;
            }
        }
        let slots: Vec<u32> = match found {
            Some(start) => (start..start + needed).map(|s| s as u32).collect(),
            None if free_in_range.len() == needed => free_in_range,
            None => return None,
        };
        for &slot in &slots {
            self.clear(slot as usize);
        }
        self.count -= slots.len();
        Some(slots)
    }

    /// Makes `slots` free again.
    pub(super) fn give_back(&mut self, slots: &[u32]) {
        for &slot in slots {
            let slot = slot as usize;
            assert!(!self.is_free(slot), "slot {slot} given back twice");
            self.words[slot / 64] |= 1 << (slot % 64);
        }
        self.count += slots.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_buffer_of_several_slots_is_one_run_when_one_is_free() {
        let mut free = FreeSlots::all(10);
        assert_eq!(free.take(1), Some(vec![0]));
        assert_eq!(free.take(3), Some(vec![1, 2, 3]));
        assert_eq!(free.take(1), Some(vec![4]));
        // 0 and 4 come back: free are 0 and 4..9, so the lowest run of four starts at 4.
        free.give_back(&[0, 4]);
        assert_eq!(free.take(4), Some(vec![4, 5, 6, 7]));
        assert_eq!(free.len(), 3);
        // Free now: 0, 8, 9. No run of 3: the lowest three, apart.
        assert_eq!(free.take(3), Some(vec![0, 8, 9]));
        assert_eq!(free.take(1), None);
        assert_eq!(free.len(), 0);
    }

    #[test]
    fn runs_cross_word_boundaries_and_the_last_word_is_partial() {
        let mut free = FreeSlots::all(130);
        assert_eq!(free.len(), 130);
        assert_eq!(free.take(60).unwrap().len(), 60);
        let run = free.take(10).unwrap();
        assert_eq!(
            run,
            (60..70).collect::<Vec<u32>>(),
            "across the first word's end"
        );
        assert_eq!(free.take(60).unwrap(), (70..130).collect::<Vec<u32>>());
        assert_eq!(free.take(1), None, "no slot past the 130th");
    }

    #[test]
    fn a_take_in_a_range_stays_in_it() {
        let mut free = FreeSlots::all(16);
        assert_eq!(free.take_in(8..16, 3), Some(vec![8, 9, 10]));
        assert_eq!(free.count_in(8..16), 5);
        assert_eq!(free.take_in(0..8, 9), None, "more than the range holds");
        assert_eq!(free.take_in(0..8, 8).unwrap(), (0..8).collect::<Vec<u32>>());
        assert_eq!(
            free.take_in(0..8, 1),
            None,
            "the range is spent though others are free"
        );
        free.give_back(&[2, 5]);
        assert_eq!(
            free.take_in(0..8, 2),
            Some(vec![2, 5]),
            "no run: the lowest two"
        );
        assert_eq!(free.len(), 5);
    }

    proptest! {
        /// Any sequence of takes and give-backs: a slot is never handed out twice, the count
        /// matches, and a take of k gets a contiguous run whenever one is free.
        #[test]
        fn takes_never_overlap_and_prefer_runs(ops in proptest::collection::vec((1usize..6, any::<bool>()), 1..200)) {
            let total = 70;
            let mut free = FreeSlots::all(total);
            let mut held: Vec<Vec<u32>> = Vec::new();
            let mut owned = vec![false; total];
            for (k, give) in ops {
                if give && !held.is_empty() {
                    let slots = held.remove(k % held.len());
                    for &s in &slots { owned[s as usize] = false; }
                    free.give_back(&slots);
                } else {
                    let run_free = (0..=total.saturating_sub(k)).any(|start| (start..start + k).all(|s| !owned[s]));
                    match free.take(k) {
                        Some(slots) => {
                            prop_assert_eq!(slots.len(), k);
                            let contiguous = slots.windows(2).all(|w| w[1] == w[0] + 1);
                            if run_free { prop_assert!(contiguous); }
                            for &s in &slots {
                                prop_assert!(!owned[s as usize], "slot {} handed out twice", s);
                                owned[s as usize] = true;
                            }
                            held.push(slots);
                        }
                        None => prop_assert!(owned.iter().filter(|o| !**o).count() < k),
                    }
                }
                prop_assert_eq!(free.len(), owned.iter().filter(|o| !**o).count());
            }
        }
    }
}
