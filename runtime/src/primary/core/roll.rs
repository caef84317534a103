//! A rolling restart: the slots still to replace, one at a time.

use std::collections::VecDeque;

/// A rolling restart in progress.
#[derive(Debug, Default)]
pub(crate) struct Roll {
    /// Slots still to replace, in order.
    pub queue: VecDeque<usize>,
    /// The slot being replaced now.
    pub current: Option<usize>,
    /// Another one was asked for meanwhile: roll again when this one ends.
    pub again: bool,
}

impl Roll {
    /// A roll over slots `0..slots`.
    pub(crate) fn over(slots: usize) -> Roll {
        Roll {
            queue: (0..slots).collect(),
            current: None,
            again: false,
        }
    }
}
