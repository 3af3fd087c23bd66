//! Frozen weights' GEMM panels, packed once and kept across products and steps.
//!
//! A LoRA step reads every frozen weight in two products, `x·W` forward and `∂x = G·Wᵀ`
//! backward, every step, and [`crate::sgemm_avx2`] copied it into its kernel's panel order
//! (`pack_b`) for each one: 4.4 % of nanogpt-cpu's LoRA step on an AVX2 machine, work the
//! full step has no way to skip (its weights change every step). [`Tape::frozen`] registers
//! the weight here when the tape records for backward; the kernel then packs each view of it
//! it reads as B (a view is its start, shape and strides: `W` and `Wᵀ` are two) once, and
//! later products read those panels. The bits are the same: the panels are the same floats.
//!
//! A pack can never go stale. The registry holds a clone of every registered tensor
//! ([`Tensor`] is an `ArcArray`): its memory cannot be freed and reused while registered, and
//! writing to it through any other handle copies it first (copy on write), so a changed
//! weight lives at a new address and its old panels are never read for it. A tensor only the
//! registry holds any more (its model dropped it or wrote a new value) is released, with its
//! panels, at the next registration.
//!
//! The registry admits matrices while their floats and their panels (twice the floats, for
//! `W` and `Wᵀ`) fit [`MOST_FLOATS`] in all, so it holds at most that many floats of weights
//! it alone keeps alive and of panels: all of a nanogpt-sized model, a few matrices of
//! GPT-2's, whose products (1 024 rows a step) spread the packing over far more multiply-adds
//! anyway. `TAPELORA_FROZEN_PACKS=0` or [`set_enabled`]`(false)` turns it off (for timing
//! side by side); [`clear`] releases everything.
//!
//! [`Tape::frozen`]: crate::Tape::frozen

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::Tensor;

/// Most floats the registry accounts for: the registered weights and their panels.
pub const MOST_FLOATS: usize = 1 << 22;

/// On unless `TAPELORA_FROZEN_PACKS=0` or [`set_enabled`]`(false)`.
static SWITCH: crate::env_switch::EnvSwitch =
    crate::env_switch::EnvSwitch::new("TAPELORA_FROZEN_PACKS");

static REGISTRY: RwLock<Registry> = RwLock::new(Registry {
    frozen: Vec::new(),
    floats: 0,
});

/// The registered weights and the floats accounted for.
struct Registry {
    frozen: Vec<Frozen>,
    /// Floats of the registered weights plus the panels reserved for them.
    floats: usize,
}

/// One registered weight: a clone that keeps it alive and unchanged, its bytes, its panels.
struct Frozen {
    tensor: Tensor<f32>,
    start: usize,
    end: usize,
    packs: Vec<(Key, Arc<Panels>)>,
}

/// A view of a registered weight as the kernel reads it as B (`k × n`, element strides).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Key {
    pub b: usize,
    pub k: usize,
    pub n: usize,
    pub rsb: isize,
    pub csb: isize,
}

/// Packed panels, 64-byte aligned.
pub(crate) struct Panels {
    lines: Vec<Line>,
}

impl Panels {
    /// The first float.
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.lines.as_ptr().cast()
    }
}

/// A 64-byte aligned run of 16 floats.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

/// Floats a weight reserves: itself, and panels for `W` and `Wᵀ` (each padded to 16 columns).
fn reserved(tensor: &Tensor<f32>) -> usize {
    let (rows, cols) = (tensor.shape()[0], tensor.shape()[1]);
    tensor.len() + rows.next_multiple_of(16) * cols + cols.next_multiple_of(16) * rows
}

/// Whether frozen weights' panels are kept: on unless `TAPELORA_FROZEN_PACKS=0` or
/// [`set_enabled`]`(false)`.
pub fn enabled() -> bool {
    SWITCH.is_on()
}

/// Turns the keeping of frozen weights' panels on or off for the whole process (off also
/// releases what is kept).
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
    if !on {
        clear();
    }
}

/// Releases every registered weight and its panels.
pub fn clear() {
    let mut registry = write();
    registry.frozen.clear();
    registry.floats = 0;
}

/// Panels kept for this tensor (for tests).
pub fn packs_of(tensor: &Tensor<f32>) -> usize {
    let start = tensor.as_ptr() as usize;
    read()
        .frozen
        .iter()
        .filter(|f| f.start == start && f.tensor.len() == tensor.len())
        .map(|f| f.packs.len())
        .sum()
}

fn read() -> RwLockReadGuard<'static, Registry> {
    // No call under the lock panics, so a poisoned lock holds a consistent registry.
    REGISTRY.read().unwrap_or_else(|e| e.into_inner())
}

fn write() -> RwLockWriteGuard<'static, Registry> {
    REGISTRY.write().unwrap_or_else(|e| e.into_inner())
}

/// Registers a frozen weight (a contiguous matrix) if it and its panels fit the budget;
/// returns whether it is registered. Drops weights only the registry still holds.
pub(crate) fn register(tensor: &Tensor<f32>) -> bool {
    if tensor.ndim() != 2 || tensor.as_slice().is_none() || tensor.is_empty() || !enabled() {
        return false;
    }
    let start = tensor.as_ptr() as usize;
    let end = start + 4 * tensor.len();
    let held = |f: &Frozen| f.start == start && f.end == end;
    if read().frozen.iter().any(held) {
        return true;
    }
    let mut registry = write();
    let mut released = 0;
    registry.frozen.retain(|f| {
        let alive = !f.tensor.is_unique();
        if !alive {
            released += reserved(&f.tensor);
        }
        alive
    });
    registry.floats -= released;
    let cost = reserved(tensor);
    if registry.frozen.iter().any(held) {
        return true;
    }
    if registry.floats + cost > MOST_FLOATS {
        return false;
    }
    registry.floats += cost;
    registry.frozen.push(Frozen {
        tensor: tensor.clone(),
        start,
        end,
        packs: Vec::new(),
    });
    true
}

/// The panels of `key`'s view when it lies in a registered weight: kept ones, or `floats`
/// floats newly packed by `pack` and kept. `None` when the view is not a registered
/// weight's, or its weight's reservation is spent (a third view of it).
///
/// # Safety
/// `key` must describe a readable `k × n` matrix, and the caller must hold it alive for the
/// call (as a product's caller holds its operands); `pack` must write all `floats` floats.
pub(crate) unsafe fn panels(
    key: Key,
    floats: usize,
    pack: impl FnOnce(*mut f32),
) -> Option<Arc<Panels>> {
    // A registered weight decided the switch already; none registered, nothing to find.
    if !SWITCH.is_set_on() || key.k == 0 || key.n == 0 {
        return None;
    }
    if key.rsb < 0 || key.csb < 0 {
        return None;
    }
    let last = (key.k - 1) * key.rsb as usize + (key.n - 1) * key.csb as usize;
    let (lo, hi) = (key.b, key.b + 4 * (last + 1));
    let inside = |f: &Frozen| f.start <= lo && hi <= f.end;
    {
        let registry = read();
        let frozen = registry.frozen.iter().find(|f| inside(f))?;
        if let Some((_, panels)) = frozen.packs.iter().find(|(k, _)| *k == key) {
            return Some(panels.clone());
        }
        if frozen.packs.len() >= 2 {
            return None;
        }
    }
    let mut lines = vec![Line([0.0; 16]); floats.div_ceil(16)];
    pack(lines.as_mut_ptr().cast());
    let panels = Arc::new(Panels { lines });
    let mut registry = write();
    // The weight stays registered meanwhile (the caller holds it); another thread may have
    // packed the same view first.
    let frozen = registry.frozen.iter_mut().find(|f| inside(f))?;
    if let Some((_, kept)) = frozen.packs.iter().find(|(k, _)| *k == key) {
        return Some(kept.clone());
    }
    if frozen.packs.len() >= 2 {
        return None;
    }
    frozen.packs.push((key, panels.clone()));
    Some(panels)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(rows: usize, cols: usize) -> Tensor<f32> {
        ndarray::Array2::from_shape_fn((rows, cols), |(i, j)| (i * cols + j) as f32)
            .into_dyn()
            .into_shared()
    }

    fn key(w: &Tensor<f32>, transposed: bool) -> Key {
        let (rows, cols) = (w.shape()[0], w.shape()[1]);
        let (k, n, rsb, csb) = if transposed {
            (cols, rows, 1, cols as isize)
        } else {
            (rows, cols, cols as isize, 1)
        };
        Key {
            b: w.as_ptr() as usize,
            k,
            n,
            rsb,
            csb,
        }
    }

    #[test]
    fn a_view_is_packed_once_and_a_weight_holds_two_views_at_most() {
        let w = matrix(40, 24);
        assert!(register(&w));
        assert!(register(&w), "registering again is a no-op");
        let packs = std::cell::Cell::new(0);
        let pack = |out: *mut f32| {
            packs.set(packs.get() + 1);
            // SAFETY: `panels` hands over `floats` writable floats.
            unsafe { out.write(7.0) };
        };
        // SAFETY: the keys describe views of w, held for the calls.
        unsafe {
            let first = panels(key(&w, false), 48 * 24, pack).unwrap();
            assert_eq!(*first.as_ptr(), 7.0);
            let again = panels(key(&w, false), 48 * 24, pack).unwrap();
            assert!(Arc::ptr_eq(&first, &again));
            assert_eq!(packs.get(), 1);
            assert!(panels(key(&w, true), 40 * 32, pack).is_some());
            assert_eq!(packs.get(), 2);
            // A third view of the same weight (its first 10 rows) is not kept.
            let rows = Key {
                k: 10,
                ..key(&w, false)
            };
            assert!(panels(rows, 10 * 32, pack).is_none());
            // Nor is a view of a weight that was never registered, nor one running past the
            // registered weight's end.
            let other = matrix(40, 24);
            assert!(panels(key(&other, false), 48 * 24, pack).is_none());
            let past = Key {
                k: 41,
                ..key(&w, false)
            };
            assert!(panels(past, 41 * 32, pack).is_none());
        }
        assert_eq!(packs.get(), 2);
        assert_eq!(packs_of(&w), 2);
    }

    #[test]
    fn a_written_or_dropped_weight_leaves_the_registry() {
        let w = matrix(30, 20);
        assert!(register(&w));
        let (start, len) = (w.as_ptr() as usize, w.len());
        let registered = || {
            read()
                .frozen
                .iter()
                .any(|f| f.start == start && f.tensor.len() == len)
        };
        assert!(registered());
        // Writing through the model's handle copies the weight (the registry holds the old
        // one): the new values live elsewhere and are not registered.
        let mut model = w;
        model[[0, 0]] = -1.0;
        assert_ne!(model.as_ptr() as usize, start);
        assert_eq!(packs_of(&model), 0);
        // SAFETY: the key describes a view of `model`, held for the call.
        unsafe {
            assert!(panels(key(&model, false), 32 * 30, |_| {}).is_none());
        }
        // Only the registry holds the old weight now: the next registration releases it.
        assert!(register(&matrix(2, 2)));
        assert!(!registered());
    }

    #[test]
    fn weights_past_the_budget_and_other_shapes_are_not_registered() {
        let too_big = matrix(1024, MOST_FLOATS / 1024 / 3 + 1);
        assert!(!register(&too_big));
        let vector = ndarray::Array1::<f32>::zeros(64).into_dyn().into_shared();
        assert!(!register(&vector));
        let strided = matrix(8, 8).slice_move(ndarray::s![.., ..;2]).into_dyn();
        assert!(!register(&strided));
    }
}
