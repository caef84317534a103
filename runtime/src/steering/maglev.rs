//! The Maglev lookup table behind the `hash` policy (Eisenbud et al., NSDI 2016, section 3.4).
//!
//! Each slot walks its own permutation of the table's `M` entries (an offset and a skip
//! derived from the slot's index) and the slots take turns claiming their next free entry,
//! so every slot owns `M / n` entries, give or take one, and the table depends on nothing
//! but `n`. The program looks up `table[hash(client ip) % M]`.
//!
//! Steer builds the table over the *configured* slots, live or not: a slot whose worker is
//! restarting keeps its entries, so its clients come back to it with the new worker, and no
//! other client moves. While the slot is empty the program sends its clients to a live slot
//! chosen by a second hash of their address, so they spread over the others.

use steer_common::fmix32;

/// Builds the table for `slots` slots into `table` (whose length `M` must be prime and larger
/// than `slots`). Deterministic: the same `slots` and `M` give the same table.
pub fn build(slots: u32, table: &mut [u32]) {
    let size = table.len() as u64;
    assert!(
        slots > 0 && u64::from(slots) < size,
        "Maglev needs 0 < slots < table size"
    );
    let mut next: Vec<u64> = vec![0; slots as usize];
    let (offsets, skips): (Vec<u64>, Vec<u64>) = (0..slots)
        .map(|slot| {
            let offset = u64::from(fmix32(slot ^ 0x5bd1_e995)) % size;
            let skip = u64::from(fmix32(slot ^ 0x1b87_3593)) % (size - 1) + 1;
            (offset, skip)
        })
        .unzip();
    let empty = u32::MAX;
    table.fill(empty);
    let mut filled = 0u64;
    'fill: loop {
        for slot in 0..slots as usize {
            // Walk this slot's permutation to its next entry nobody has claimed yet.
            let mut entry = (offsets[slot] + next[slot] * skips[slot]) % size;
            while table[entry as usize] != empty {
                next[slot] += 1;
                entry = (offsets[slot] + next[slot] * skips[slot]) % size;
            }
            table[entry as usize] = slot as u32;
            next[slot] += 1;
            filled += 1;
            if filled == size {
                break 'fill;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use steer_common::HASH_TABLE_SIZE;

    fn table(slots: u32) -> Vec<u32> {
        let mut table = vec![0; HASH_TABLE_SIZE as usize];
        build(slots, &mut table);
        table
    }

    #[test]
    fn every_slot_owns_an_equal_share_within_one_entry() {
        for slots in [1, 2, 3, 4, 7, 64, 1024] {
            let table = table(slots);
            let mut owned = vec![0u32; slots as usize];
            for &slot in &table {
                owned[slot as usize] += 1;
            }
            let max = owned.iter().max().copied().unwrap_or(0);
            let min = owned.iter().min().copied().unwrap_or(0);
            assert!(max - min <= 1, "{slots} slots: shares {min}..{max}");
        }
    }

    #[test]
    fn the_table_depends_only_on_the_slot_count() {
        assert_eq!(table(4), table(4));
        assert_ne!(table(4), table(5));
    }

    /// The figure the README quotes: of 1,000 client IPs, the share whose slot changes
    /// when `hash` grows from 4 to 5 slots (the ideal is the new slot's fifth).
    #[test]
    fn growing_from_4_to_5_slots_moves_about_a_fifth_of_1000_clients() {
        let (before, after) = (table(4), table(5));
        let moved = (0..1000u32)
            .filter(|i| {
                let ip = u32::from_be_bytes([10, 0, (i / 250) as u8, (i % 250) as u8 + 1]).to_be();
                let h = steer_common::hash_client([ip, 0, 0, 0], false) % HASH_TABLE_SIZE;
                before[h as usize] != after[h as usize]
            })
            .count();
        eprintln!(
            "4 -> 5 slots: {moved} of 1000 client IPs move ({:.1}%)",
            moved as f64 / 10.0
        );
        assert!((150..=260).contains(&moved), "{moved} of 1000 moved");
        let shrink = (0..1000u32)
            .filter(|i| {
                let ip = u32::from_be_bytes([10, 1, (i / 250) as u8, (i % 250) as u8 + 1]).to_be();
                let h = steer_common::hash_client([ip, 0, 0, 0], false) % HASH_TABLE_SIZE;
                after[h as usize] != before[h as usize] && after[h as usize] != 4
            })
            .count();
        eprintln!("5 -> 4 slots: {shrink} of 1000 clients not on the removed slot move");
        assert!(shrink <= 20, "{shrink} clients of kept slots moved");
    }

    #[test]
    fn adding_a_slot_moves_few_entries() {
        // Maglev's minimal disruption: going from 4 to 5 slots should move about 1/5 of
        // the table (the new slot's share) and not much more.
        let (before, after) = (table(4), table(5));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let share = HASH_TABLE_SIZE as usize / 5;
        assert!(
            moved < share + share / 4,
            "moved {moved}, new share {share}"
        );
    }
}
