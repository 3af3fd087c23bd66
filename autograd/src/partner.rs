//! A second thread that waits by spinning, for the short parallel sections of token-by-token
//! decoding.
//!
//! Decoding one GPT-2 token runs about 60 parallel sections (four GEMVs and an attention per
//! layer, the lm_head), each 0.1–0.5 ms. Through rayon each one paid for the pool's idle
//! thread falling asleep between them: measured on a 2-vCPU AVX2 machine, the other thread
//! started its first block of a row GEMV 23–29 µs after the fork, and the forking thread,
//! asleep by the time the last block ended, returned 12–17 µs after it (about 50 sleeps and
//! wake-ups per token). [`with_partner`] keeps the pool's other thread for the length of a
//! closure: it spins, polling one job slot, so a section posted with [`map`] or [`join`]
//! starts on both threads at once and returns when the last index ends. Outside
//! [`with_partner`] (or on one thread) they are rayon's `par_iter` and `join`.
//!
//! The partner only takes indices the owner has not taken yet, from one counter, so each
//! index runs exactly once; what a section computes does not depend on who ran which index.
//! If the partner has not picked a job up by the time the owner has run every index, the
//! owner withdraws it and does not wait. The owner never runs the partner's loop itself (a
//! thread waiting in rayon could otherwise pick the spawned loop off its own queue and spin
//! for ever): the loop returns at once on the owner's thread.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use rayon::prelude::*;

/// No job posted.
const IDLE: u8 = 0;
/// A job is posted and not yet picked up by the partner.
const POSTED: u8 = 1;
/// The partner is taking indices of the posted job.
const WORKING: u8 = 2;
/// The partner has taken its last index of the job.
const DONE: u8 = 3;

/// A posted section: run `f(i)` for every `i < n`. The pointer's lifetime is erased; the
/// owner keeps the closure alive until the partner is done with it.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync + 'static),
    n: usize,
}

/// The slot the owner posts to and the partner polls.
struct Shared {
    state: AtomicU8,
    /// Written by the owner only while `state` is IDLE; read by the partner after taking it
    /// from POSTED to WORKING (the state's release and acquire order the two).
    job: UnsafeCell<Job>,
    next: AtomicUsize,
    stop: AtomicBool,
    /// A panic the partner caught in a job, handed to the owner.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

// SAFETY: `job` is accessed as described on the field; every other field is synchronised.
unsafe impl Sync for Shared {}

thread_local! {
    /// The slot of the partner serving this thread, if any.
    static SERVING: Cell<*const Shared> = const { Cell::new(std::ptr::null()) };
}

fn noop(_: usize) {}

impl Shared {
    fn new() -> Self {
        Shared {
            state: AtomicU8::new(IDLE),
            job: UnsafeCell::new(Job {
                f: &noop as &(dyn Fn(usize) + Sync),
                n: 0,
            }),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            panic: Mutex::new(None),
        }
    }

    /// The partner's loop: polls the slot until `stop`.
    fn serve(&self) {
        while !self.stop.load(Ordering::Acquire) {
            if self.state.load(Ordering::Acquire) == POSTED
                && self
                    .state
                    .compare_exchange(POSTED, WORKING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok()
            {
                // SAFETY: POSTED → WORKING was ours: the owner wrote `job` before posting and
                // keeps its closure alive until it sees DONE.
                let job = unsafe { *self.job.get() };
                let f = unsafe { &*job.f };
                let ran = catch_unwind(AssertUnwindSafe(|| self.take_indices(f, job.n)));
                if let Err(payload) = ran {
                    *self.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(payload);
                    // The owner's indices may stop short too: let it skip the rest.
                    self.next.store(usize::MAX / 2, Ordering::Relaxed);
                }
                self.state.store(DONE, Ordering::Release);
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn take_indices(&self, f: &(dyn Fn(usize) + Sync), n: usize) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                return;
            }
            f(i);
        }
    }

    /// The owner's side of a section: posts it, takes indices, then withdraws it or waits
    /// for the partner's last index.
    fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; `f` outlives this call, and the partner
        // reads it only between WORKING and DONE, which this call waits out.
        let f_static: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(f) };
        // SAFETY: the state is IDLE: the partner does not read `job` now.
        unsafe { *self.job.get() = Job { f: f_static, n } };
        self.next.store(0, Ordering::Relaxed);
        self.state.store(POSTED, Ordering::Release);
        let mine = catch_unwind(AssertUnwindSafe(|| self.take_indices(f, n)));
        if mine.is_err() {
            self.next.store(usize::MAX / 2, Ordering::Relaxed);
        }
        if self
            .state
            .compare_exchange(POSTED, IDLE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            while self.state.load(Ordering::Acquire) != DONE {
                std::hint::spin_loop();
            }
            self.state.store(IDLE, Ordering::Relaxed);
        }
        if let Err(payload) = mine {
            resume_unwind(payload);
        }
        if let Some(payload) = self.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
            resume_unwind(payload);
        }
    }
}

/// Runs `f` with the pool's other thread spinning as its partner: [`map`] and [`join`]
/// called on this thread inside `f` run on both threads without waking anyone. In a pool of
/// other than two threads, or inside another `with_partner`, `f` runs as it is (its
/// sections are rayon's). Parallel sections in
/// `f` that are not [`map`] or [`join`] run on this thread only (the other is spinning), so
/// `f` should be decoding steps, whose sections all are.
pub fn with_partner<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // With more threads a section should use them all, which one partner would not.
    if rayon::current_num_threads() != 2 || serving() || !enabled() {
        return f();
    }
    let shared = Shared::new();
    rayon::scope(|scope| {
        let owner = std::thread::current().id();
        let shared = &shared;
        scope.spawn(move |_| {
            if std::thread::current().id() != owner {
                shared.serve();
            }
        });
        /// Sets this thread's slot for the closure; clears it and stops the partner after,
        /// also when the closure panics (the scope waits for the partner's loop to end).
        struct Serving<'a>(&'a Shared, *const Shared);
        impl Drop for Serving<'_> {
            fn drop(&mut self) {
                SERVING.with(|s| s.set(self.1));
                self.0.stop.store(true, Ordering::Release);
            }
        }
        let _serving = Serving(shared, SERVING.with(|s| s.replace(shared)));
        f()
    })
}

/// On unless `TAPELORA_PARTNER=0` or [`set_enabled`]`(false)`.
static SWITCH: crate::env_switch::EnvSwitch = crate::env_switch::EnvSwitch::new("TAPELORA_PARTNER");

/// Whether [`with_partner`] keeps a partner: yes unless `TAPELORA_PARTNER=0` or
/// [`set_enabled`]`(false)` (for timing side by side).
pub fn enabled() -> bool {
    SWITCH.is_on()
}

/// Turns [`with_partner`]'s partner on or off for the whole process.
pub fn set_enabled(on: bool) {
    SWITCH.set(on);
}

/// Whether a partner serves this thread (inside [`with_partner`]).
pub fn serving() -> bool {
    SERVING.with(|s| !s.get().is_null())
}

/// `f(i)` for every `i < n`, in index order in the result, on both threads: with the
/// partner inside [`with_partner`], else as rayon's `par_iter`.
pub fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let shared = SERVING.with(|s| s.get());
    if shared.is_null() || n < 2 {
        return (0..n).into_par_iter().map(&f).collect();
    }
    let slots: Vec<Mutex<Option<R>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let fill = |i: usize| {
        let value = f(i);
        *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
    };
    // Nested sections run on this thread alone: the slot holds one job at a time.
    SERVING.with(|s| s.set(std::ptr::null()));
    struct Restore(*const Shared);
    impl Drop for Restore {
        fn drop(&mut self) {
            SERVING.with(|s| s.set(self.0));
        }
    }
    let _restore = Restore(shared);
    // SAFETY: a non-null slot is the one `with_partner` set on this thread, alive until it
    // returns, which is after this call.
    unsafe { (*shared).run(n, &fill) };
    slots
        .into_iter()
        .map(|slot| {
            slot.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every index ran")
        })
        .collect()
}

/// `(a(), b())` on both threads: with the partner inside [`with_partner`], else as
/// `rayon::join`.
pub fn join<A: Send, B: Send>(
    a: impl FnOnce() -> A + Send,
    b: impl FnOnce() -> B + Send,
) -> (A, B) {
    if !serving() {
        return rayon::join(a, b);
    }
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let mut results = map(2, |i| {
        if i == 0 {
            let a = a.lock().unwrap_or_else(|e| e.into_inner()).take();
            (a.map(|a| a()), None)
        } else {
            let b = b.lock().unwrap_or_else(|e| e.into_inner()).take();
            (None, b.map(|b| b()))
        }
    });
    let (_, b) = results.pop().expect("two results");
    let (a, _) = results.pop().expect("two results");
    (a.expect("a ran"), b.expect("b ran"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(threads: usize) -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    }

    #[test]
    fn sections_run_every_index_once_in_order_on_both_threads() {
        for threads in [1, 2, 3] {
            let (results, threads_seen) = pool(threads).install(|| {
                with_partner(|| {
                    assert_eq!(serving(), threads == 2);
                    let seen = Mutex::new(std::collections::HashSet::new());
                    let mut all = Vec::new();
                    for round in 0..200 {
                        let n = round % 17;
                        let got = map(n, |i| {
                            seen.lock().unwrap().insert(std::thread::current().id());
                            // Long enough that the partner takes some indices.
                            let spin = std::time::Instant::now();
                            while spin.elapsed() < std::time::Duration::from_micros(20) {}
                            i * i + round
                        });
                        assert_eq!(got, (0..n).map(|i| i * i + round).collect::<Vec<_>>());
                        let (a, b) = join(|| round, || n);
                        assert_eq!((a, b), (round, n));
                        // A section inside a section runs too.
                        let nested = map(2, |i| map(3, |j| i + j).iter().sum::<usize>());
                        assert_eq!(nested, vec![3, 6]);
                        all.push(got.len());
                    }
                    (all, seen.into_inner().unwrap().len())
                })
            });
            assert_eq!(results.len(), 200);
            match threads {
                1 => assert_eq!(threads_seen, 1),
                2 => assert_eq!(threads_seen, 2, "the partner took indices"),
                // No partner: rayon decides who runs the indices.
                _ => {}
            }
        }
        assert!(!serving(), "the slot is cleared after");
    }

    #[test]
    fn a_panic_in_a_section_reaches_the_owner_and_the_partner_stops() {
        let pool = pool(2);
        for panicking in [0, 5] {
            let result = pool.install(|| {
                catch_unwind(AssertUnwindSafe(|| {
                    with_partner(|| {
                        map(8, |i| {
                            std::thread::sleep(std::time::Duration::from_micros(200));
                            assert!(i != panicking, "index {i} fails");
                            i
                        })
                    })
                }))
            });
            assert!(result.is_err());
            // The pool is free again: the partner's loop ended.
            assert_eq!(pool.install(|| map(4, |i| i)), vec![0, 1, 2, 3]);
        }
    }
}
