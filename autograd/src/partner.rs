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
//!
//! A partner pays only while both threads have their CPUs. [`alone`] runs the same sections on
//! the calling thread only, with the same values, and a [`Pacer`] chooses between the two for
//! each call of a loop by timing them (three trials of the other way in a row, each quicker
//! than the current way's mean, switch it), so that decoding on a machine where something
//! else holds one CPU runs alone.

use std::cell::{Cell, UnsafeCell};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

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
    if !keeps_partner() {
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

/// Whether [`with_partner`] would keep a partner on this thread now.
fn keeps_partner() -> bool {
    // With more threads a section should use them all, which one partner would not.
    rayon::current_num_threads() == 2 && !serving() && !is_alone() && enabled()
}

thread_local! {
    /// Set inside [`alone`].
    static ALONE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with its [`map`] and [`join`] sections on this thread only, in index order, and
/// no partner kept by [`with_partner`] inside it. Sections compute the same values either way.
pub fn alone<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ALONE.with(|a| a.set(self.0));
        }
    }
    let _restore = Restore(ALONE.with(|a| a.replace(true)));
    f()
}

/// Whether this thread is inside [`alone`].
pub fn is_alone() -> bool {
    ALONE.with(|a| a.get())
}

/// Chooses, call by call, between [`with_partner`] and [`alone`] for a loop of like calls
/// (decoding's one-token steps), by timing them: now and then one call runs the other way (a
/// trial), and the loop switches when three trials in a row were quicker than the mean of the
/// last calls run the current way.
///
/// A partner only pays while both threads get their CPUs. With another process keeping one
/// of two vCPUs busy (Zen 3), GPT-2's one-token steps took 22.8 ms with the partner, whose
/// spinning and descheduled blocks cost the owner, against 15.0 ms alone; on the quiet
/// machine 11.5 against 15.3. Trials come after [`Pacer::FIRST_TRIAL`] calls, then four
/// times further apart each time the current way stays quicker (up to
/// [`Pacer::MAX_INTERVAL`], or [`Pacer::MAX_INTERVAL_ALONE`] while alone), so a quiet machine
/// pays for three slow calls in a run of 128;
/// and at once when the current way has slowed by a quarter since the last decision. Both
/// ways compute the same values ([`alone`]).
#[derive(Clone, Debug)]
pub struct Pacer {
    with_partner: bool,
    /// The last calls' seconds, run the current way (most recent last, at most
    /// [`Pacer::WINDOW`]).
    recent: Vec<f64>,
    /// The median of the last [`Pacer::RECENT`] calls when the way was last confirmed or
    /// chosen.
    baseline: Option<f64>,
    /// Times of the trials in a row that beat the current way, until there are
    /// [`Pacer::CONFIRMING`].
    won: Vec<f64>,
    calls: usize,
    next_trial: usize,
    interval: usize,
    switches: usize,
    trials: usize,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    /// Calls before the first trial, and after a switch before the next.
    pub const FIRST_TRIAL: usize = 4;
    /// Most calls between two trials while the current way holds its speed.
    pub const MAX_INTERVAL: usize = 256;
    /// Most calls between two trials of the partner while running alone. A partner that
    /// slows is seen at once (its calls slow), but alone's calls do not quicken when the
    /// other CPU comes free, so only trials can tell; one costs a few ms where the partner
    /// is still the slower way.
    pub const MAX_INTERVAL_ALONE: usize = 16;
    /// Last calls of the current way whose median is watched for a slowdown.
    const RECENT: usize = 3;
    /// Last calls of the current way whose mean a trial is held to (the mean, because the
    /// loop's speed is the mean's: a partner that loses its CPU now and then has calls of
    /// 18 to 29 ms whose median hides the slow tail).
    const WINDOW: usize = 8;
    /// Trials in a row quicker than the current way that switch it: two let a partner whose
    /// calls took 16, 16, 30, 16, 16, 30 ms win back from 17 ms alone whenever two quick
    /// calls fell together; every three in a row hold a slow one.
    const CONFIRMING: usize = 3;
    /// How much slower than its baseline the current way may get before a trial comes early.
    const SLOWDOWN: f64 = 1.25;

    /// Starts with the partner (when one can be kept: see [`with_partner`]).
    pub fn new() -> Self {
        Pacer {
            with_partner: true,
            recent: Vec::with_capacity(Self::WINDOW),
            baseline: None,
            won: Vec::with_capacity(Self::CONFIRMING),
            calls: 0,
            next_trial: Self::FIRST_TRIAL,
            interval: Self::FIRST_TRIAL,
            switches: 0,
            trials: 0,
        }
    }

    /// Runs `f` the way chosen for this call and times it.
    pub fn run<R: Send>(&mut self, f: impl FnOnce() -> R + Send) -> R {
        // Where no partner would be kept both ways are the same: nothing to choose.
        if !keeps_partner() || !PACER.is_on() {
            return with_partner(f);
        }
        let trial = self.trial_due();
        let partner = self.with_partner != trial;
        PACED_CALLS[usize::from(!partner)].fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        let result = if partner { with_partner(f) } else { alone(f) };
        self.record(trial, start.elapsed().as_secs_f64());
        result
    }

    fn trial_due(&self) -> bool {
        !self.won.is_empty()
            || (!self.recent.is_empty() && (self.calls >= self.next_trial || self.slowed()))
    }

    /// The last [`Pacer::RECENT`] calls of the current way.
    fn last_calls(&self) -> &[f64] {
        &self.recent[self.recent.len().saturating_sub(Self::RECENT)..]
    }

    /// Whether the median of the last calls has slowed by more than [`Pacer::SLOWDOWN`]
    /// since the last decision.
    fn slowed(&self) -> bool {
        let last = self.last_calls();
        last.len() == Self::RECENT
            && self
                .baseline
                .is_some_and(|base| median(last) > Self::SLOWDOWN * base)
    }

    /// What a trial has to beat: the mean of the current way's last calls, without the
    /// slowest once there are six or more (one page fault should not switch the way).
    fn typical(&self) -> f64 {
        let mut calls = self.recent.clone();
        if calls.len() >= 6 {
            calls.sort_by(f64::total_cmp);
            calls.pop();
        }
        calls.iter().sum::<f64>() / calls.len() as f64
    }

    /// Books one call's time: `trial` if it ran the other way.
    fn record(&mut self, trial: bool, secs: f64) {
        self.calls += 1;
        if !trial {
            if self.recent.len() == Self::WINDOW {
                self.recent.remove(0);
            }
            self.recent.push(secs);
            if self.baseline.is_none() && self.recent.len() == Self::RECENT {
                self.baseline = Some(median(self.last_calls()));
            }
            return;
        }
        self.trials += 1;
        if self.slowed() {
            // The current way's speed has changed: its older calls no longer tell.
            self.recent.drain(..self.recent.len() - Self::RECENT);
        }
        if secs < self.typical() {
            self.won.push(secs);
            if self.won.len() < Self::CONFIRMING {
                // A few quick calls of a way whose calls vary (a partner that has its CPU
                // now and then) are not enough: the next call tries again.
                return;
            }
            self.with_partner = !self.with_partner;
            self.switches += 1;
            self.recent = std::mem::take(&mut self.won);
            // The three trials are the new way's first calls: its slowdowns are watched from
            // here (left unset, the baseline waited for a length `recent` had already passed).
            self.baseline = Some(median(&self.recent));
            self.interval = Self::FIRST_TRIAL;
        } else {
            self.won.clear();
            self.baseline = Some(median(self.last_calls()));
            let most = if self.with_partner {
                Self::MAX_INTERVAL
            } else {
                Self::MAX_INTERVAL_ALONE
            };
            self.interval = (4 * self.interval).min(most);
        }
        self.next_trial = self.calls + self.interval;
    }

    /// Whether calls that are not trials run with the partner now.
    pub fn uses_partner(&self) -> bool {
        self.with_partner
    }

    /// How many calls ran the other way.
    pub fn trials(&self) -> usize {
        self.trials
    }

    /// How many trials changed the way.
    pub fn switches(&self) -> usize {
        self.switches
    }
}

/// Calls every [`Pacer`] of the process has run with the partner and alone.
static PACED_CALLS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

/// How many calls the process's [`Pacer`]s have run so far: (with the partner, alone).
pub fn paced_calls() -> (usize, usize) {
    (
        PACED_CALLS[0].load(Ordering::Relaxed),
        PACED_CALLS[1].load(Ordering::Relaxed),
    )
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// On unless `TAPELORA_PACER=0` or [`set_pacer_enabled`]`(false)`.
static PACER: crate::env_switch::EnvSwitch = crate::env_switch::EnvSwitch::new("TAPELORA_PACER");

/// Turns [`Pacer`]'s choosing on or off for the whole process (off: always [`with_partner`]).
pub fn set_pacer_enabled(on: bool) {
    PACER.set(on);
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
    if is_alone() {
        return (0..n).map(&f).collect();
    }
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
    if is_alone() {
        return (a(), b());
    }
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

    /// Feeds a pacer `calls` calls whose time is `partner` or `alone` seconds by the way each
    /// ran; returns the ways, `P` or `a`.
    fn pace(pacer: &mut Pacer, calls: usize, partner: f64, alone: f64) -> String {
        (0..calls)
            .map(|_| {
                let trial = pacer.trial_due();
                let with_partner = pacer.with_partner != trial;
                pacer.record(trial, if with_partner { partner } else { alone });
                if with_partner {
                    'P'
                } else {
                    'a'
                }
            })
            .collect()
    }

    #[test]
    fn the_pacer_keeps_the_quicker_way_and_tries_the_other_ever_more_rarely() {
        let mut pacer = Pacer::new();
        let ways = pace(&mut pacer, 128, 0.0115, 0.0153);
        let trials: Vec<usize> = ways.match_indices('a').map(|(i, _)| i).collect();
        assert_eq!(trials, vec![4, 21, 86], "{ways}");
        assert_eq!((pacer.trials(), pacer.switches()), (3, 0));
        assert!(pacer.uses_partner());

        // The partner's CPU gets taken: once the median of its last three calls has slowed by
        // more than a quarter a trial comes at once, alone wins it and the two confirming
        // ones, and the partner's scheduled trial four calls later loses.
        let ways = pace(&mut pacer, 6, 0.0228, 0.0150);
        assert_eq!(ways, "PPaaaa");
        assert!(!pacer.uses_partner());
        assert_eq!(pacer.switches(), 1);
        // The winning trials set the new way's baseline: alone's slowdowns are watched at once.
        assert_eq!(pacer.baseline, Some(0.0150));
        assert_eq!(pace(&mut pacer, 4, 0.0228, 0.0150), "aaaP");

        // The machine quiets down: alone does not slow, so the scheduled trial, sixteen calls
        // after the last, finds it (and the next two calls confirm).
        let ways = pace(&mut pacer, 20, 0.0115, 0.0153);
        assert_eq!(ways, "aaaaaaaaaaaaaaaaPPPP");
        assert!(pacer.uses_partner());
        assert_eq!(pacer.switches(), 2);
    }

    #[test]
    fn alone_tries_the_partner_at_least_every_sixteen_calls() {
        // Alone since its first trials; the partner stays slower, but only trials can tell
        // when it stops being so.
        let mut pacer = Pacer::new();
        let ways = pace(&mut pacer, 300, 0.0228, 0.0150);
        let trials: Vec<usize> = ways.match_indices('P').map(|(i, _)| i).skip(4).collect();
        let gaps: Vec<usize> = trials.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(!pacer.uses_partner(), "{ways}");
        // Switched after call 6; the first trial four calls on, then one every sixteen
        // (without the cap: 64 and 256 calls apart).
        assert_eq!(trials[0], 11, "{ways}");
        assert!(
            gaps.len() >= 16 && gaps.iter().all(|&gap| gap == 17),
            "{ways}"
        );
    }

    #[test]
    fn one_quick_trial_of_a_way_whose_calls_vary_does_not_switch() {
        // A partner that has its CPU only now and then: its calls take 11 or 24 ms, alone 15.
        let mut pacer = Pacer::new();
        pace(&mut pacer, 3, 0.0150, 0.0150);
        pacer.with_partner = false;
        let mut ways = String::new();
        for call in 0..200 {
            let trial = pacer.trial_due();
            let partner = pacer.with_partner != trial;
            let secs = match (partner, call % 2) {
                (false, _) => 0.0150,
                (true, 0) => 0.0110,
                (true, _) => 0.0240,
            };
            pacer.record(trial, secs);
            ways.push(if partner { 'P' } else { 'a' });
        }
        assert_eq!(pacer.switches(), 0, "{ways}");
        assert!(!pacer.uses_partner());
    }

    #[test]
    fn a_partner_with_a_slow_tail_loses_to_alone_by_its_mean() {
        // A partner that loses its CPU now and then (a memory-streaming process held to half
        // a vCPU beside it): 16 ms twice, then 30 ms, over and over — a median of 16 but a
        // mean of 20.7 — against 17 ms alone. Held to the median, every trial of alone lost.
        // Three trials of the partner in a row always hold a slow call.
        let mut pacer = Pacer::new();
        let mut partner_calls = [0.016, 0.016, 0.030].into_iter().cycle();
        let mut ways = String::new();
        for _ in 0..200 {
            let trial = pacer.trial_due();
            let partner = pacer.with_partner != trial;
            let secs = if partner {
                partner_calls.next().expect("cycles")
            } else {
                0.017
            };
            pacer.record(trial, secs);
            ways.push(if partner { 'P' } else { 'a' });
        }
        let alone = ways.matches('a').count();
        // Only the first calls and the trials of the partner, one to three calls every
        // sixteen, run with it (167 of 200 alone; with two trials to switch, 106, the ways
        // swapping every six calls).
        assert!(alone >= 160, "{alone} of 200 alone: {ways}");
    }

    #[test]
    fn paced_calls_compute_the_same_values_either_way() {
        let pool = pool(2);
        let expected: Vec<Vec<usize>> = (0..40)
            .map(|round| (0..9).map(|i| i * round).collect())
            .collect();
        let got = pool.install(|| {
            let mut pacer = Pacer::new();
            (0..40)
                .map(|round| {
                    pacer.run(|| {
                        let (left, right) = join(|| round, || 2 * round);
                        assert_eq!((left, right), (round, 2 * round));
                        map(9, |i| i * round)
                    })
                })
                .collect::<Vec<_>>()
        });
        assert_eq!(got, expected);
        // Alone, every index runs on the calling thread.
        let threads = pool.install(|| {
            alone(|| {
                let seen = Mutex::new(std::collections::HashSet::new());
                with_partner(|| {
                    map(16, |_| {
                        seen.lock().unwrap().insert(std::thread::current().id());
                        std::thread::sleep(std::time::Duration::from_micros(50));
                    })
                });
                seen.into_inner().unwrap().len()
            })
        });
        assert_eq!(threads, 1);
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
