//! A process-wide on/off switch that starts as an environment variable says (on unless it is
//! `0`) and can be set from code: the A/B switches of optimisations, for timing side by side.

use std::sync::atomic::{AtomicU8, Ordering};

/// Not decided yet: the environment decides at the first read.
const UNSET: u8 = 0;
const ON: u8 = 1;
const OFF: u8 = 2;

/// On unless the variable `var` is `0`, or [`EnvSwitch::set`] says otherwise.
pub(crate) struct EnvSwitch {
    var: &'static str,
    state: AtomicU8,
}

impl EnvSwitch {
    pub(crate) const fn new(var: &'static str) -> Self {
        EnvSwitch {
            var,
            state: AtomicU8::new(UNSET),
        }
    }

    pub(crate) fn is_on(&self) -> bool {
        if self.state.load(Ordering::Relaxed) == UNSET {
            let on = std::env::var_os(self.var).is_none_or(|v| v != "0");
            // Another thread or `set` may have decided meanwhile: theirs stands.
            let decided = if on { ON } else { OFF };
            let _ =
                self.state
                    .compare_exchange(UNSET, decided, Ordering::Relaxed, Ordering::Relaxed);
        }
        self.state.load(Ordering::Relaxed) == ON
    }

    /// Whether it is on, without reading the environment (off while undecided).
    pub(crate) fn is_set_on(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ON
    }

    pub(crate) fn set(&self, on: bool) {
        self.state
            .store(if on { ON } else { OFF }, Ordering::Relaxed);
    }
}
