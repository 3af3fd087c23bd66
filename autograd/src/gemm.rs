//! Strided matrix multiplication, the one kernel every matmul (forward and backward) goes through.
//!
//! Every kernel — our AVX-512 ones ([`crate::sgemm_avx512`]) for f32 products at least 32
//! wide or at most 16 wide (LoRA's rank side) on CPUs that have it, on CPUs with only AVX2
//! `sgemm_avx2`'s for the same shapes and LoRA's shallow products, matrixmultiply otherwise —
//! reads any row/column strides, so a transposed operand is just a view with swapped strides:
//! no copy is ever made to transpose.
//! Outputs may be uninitialised memory ([`gemm_write`], [`gemm_new`]): with β = 0 nothing reads
//! them before they are written. Large products run on rayon's pool — the only thread pool in
//! the process: f32 products of at least [`DYNAMIC_MIN_MACS`] with AVX-512 through
//! [`crate::sgemm_avx512::sgemm_parallel`], with AVX2 only through `sgemm_avx2::sgemm_parallel`
//! except a linear's bias product, which measured faster in halves there (threads take
//! shrinking chunks of rows or columns from a counter, so a core slowed by another process does not hold the other one up), the
//! rest in fixed row (or column) halves, each a single-threaded GEMM. Neither split changes
//! the order of the inner (k) sum, and no fixed block is narrower than [`MIN_PART`] (so each
//! takes the kernel the whole product would): both give the serial bits on any thread count. Products far deeper than wide
//! (GPT-2's tied lm_head ∂x, k = 50 257) are cut along k instead ([`gemm_depth_split`]): fixed
//! chunks taken by threads as they come free, their partial products added in chunk order —
//! the same bits on any thread count, one read of each operand.
//! Inside [`products_on_this_thread`] (a training step's groups of sequences, one per
//! thread) every product runs whole on its calling thread instead: the pool is already busy
//! — until the other groups are done ([`products_on_this_thread_while_others_run`]).
//!
//! Two global counters (calls and floating-point operations) let tests prove that a gradient
//! nobody needs was never computed, and let benchmarks report FLOP/s.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::mem::MaybeUninit;

use ndarray::{Array2, ArrayView2, ArrayViewMut2};
use rayon::prelude::*;

use crate::Float;

static GEMM_CALLS: AtomicU64 = AtomicU64::new(0);
static GEMM_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Products with fewer multiply-adds than this run on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Products with fewer multiply-adds than this (under about a millisecond on two threads)
/// are split in fixed halves: measured on nanogpt-cpu's products (50 M multiply-adds at
/// most), the shared packing and the chunk counter cost more than they save.
const DYNAMIC_MIN_MACS: usize = 1 << 26;
/// Elements of `b` per block of a parallel [`gemv`] (1 MiB of f32): small enough that the two
/// threads of a GPT-2 product get several blocks to balance, large enough that the streams a
/// block is read as ([`axpy_rows`], [`dot_columns`]) are long (measured: 256 KiB blocks read
/// 1.1–1.2× slower, 4 MiB ones left a thread idle).
const GEMV_BLOCK_FLOATS: usize = 1 << 18;

thread_local! {
    /// Set while this thread runs [`products_on_this_thread`]'s closure.
    static ON_THIS_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The count of groups still running, while this thread runs
    /// [`products_on_this_thread_while_others_run`]'s closure (null otherwise).
    static GROUPS_RUNNING: std::cell::Cell<*const AtomicUsize> =
        const { std::cell::Cell::new(std::ptr::null()) };
}

/// Runs `f` with every product it makes on the calling thread: none is split into parts for
/// the pool's other threads, and pairs of products run one after the other (products cut by
/// their shape alone — a single row's blocks, a very deep product's chunks — keep their
/// tasks, which a busy pool runs on this thread anyway). For work spread
/// over the pool a level up — a training step's groups of sequences, one per thread — where
/// the other threads are busy with their own: a product split in halves then runs its halves
/// in turn anyway, each packing all of B again. nanogpt-cpu's grouped forward + backward,
/// steps alternated with and without in one process (medians of 200 each, two runs): full
/// 13.34 → 13.27 and 13.80 → 13.63 ms, LoRA 9.57 → 9.25 and 9.40 → 9.23 ms. The bits are the
/// same either way.
pub fn products_on_this_thread<R>(f: impl FnOnce() -> R) -> R {
    /// Puts the flag back as it was, also when `f` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            ON_THIS_THREAD.with(|flag| flag.set(self.0));
        }
    }
    let _restore = Restore(ON_THIS_THREAD.with(|flag| flag.replace(true)));
    f()
}

/// [`products_on_this_thread`] for one of several groups of work side by side, one per
/// thread, that stops holding its products on its thread once the others are done: `running`
/// counts the groups not yet finished (each group takes 1 off when it ends), and from the
/// moment it is 1 this group's products split over the pool again, whose other threads are
/// then idle. Groups do not end together — a core slowed by another process, or simply one
/// group's share of the work being larger, leaves the other thread waiting for the slower
/// group (measured at 1.4 ms of a 30 ms nanogpt-cpu step and 0.2–0.4 s of a 4.6 s GPT-2 LoRA
/// step on an AVX2 machine). Splitting does not change a product's bits (see the module doc),
/// so neither does the moment the other groups finish.
pub fn products_on_this_thread_while_others_run<R>(
    running: &AtomicUsize,
    f: impl FnOnce() -> R,
) -> R {
    /// Puts the pointer back as it was, also when `f` panics.
    struct Restore(*const AtomicUsize);
    impl Drop for Restore {
        fn drop(&mut self) {
            GROUPS_RUNNING.with(|running| running.set(self.0));
        }
    }
    let _restore = Restore(GROUPS_RUNNING.with(|cell| cell.replace(running)));
    products_on_this_thread(f)
}

/// Threads a product may be split over: the pool's, or 1 inside
/// [`products_on_this_thread`] (unless this is the last group running, see
/// [`products_on_this_thread_while_others_run`]).
pub(crate) fn split_threads() -> usize {
    if !ON_THIS_THREAD.with(|flag| flag.get()) {
        return rayon::current_num_threads();
    }
    let running = GROUPS_RUNNING.with(|running| running.get());
    // SAFETY: a non-null pointer was set by `products_on_this_thread_while_others_run`, whose
    // borrow of the counter outlives the closure this thread is running (the pointer is put
    // back when it returns or unwinds).
    if !running.is_null() && unsafe { (*running).load(Ordering::Acquire) } <= 1 {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Number of GEMM calls made so far by this process (all threads).
pub fn gemm_calls() -> u64 {
    GEMM_CALLS.load(Ordering::Relaxed)
}

/// Floating-point operations (2·m·n·k per call) performed by GEMM so far in this process.
pub fn gemm_flops() -> u64 {
    GEMM_FLOPS.load(Ordering::Relaxed)
}

/// Adds products computed outside this module (attention's register tiles for short
/// sequences, [`crate::attention_avx512`]) to [`gemm_flops`], so model FLOP rates stay whole.
pub(crate) fn count_flops(flops: usize) {
    GEMM_FLOPS.fetch_add(flops as u64, Ordering::Relaxed);
}

/// `c ← α·a·b + β·c` for 2-D views of any strides (`a`: m×k, `b`: k×n, `c`: m×n).
///
/// Shapes are checked by the callers (the ops), which know the user-facing shapes; here a
/// mismatch is a bug, hence the assertion.
pub fn gemm<T: Float>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    mut c: ArrayViewMut2<T>,
) {
    check_and_count(&a, &b, c.dim());
    let out = Out::of(c.as_mut_ptr(), c.strides(), c.dim());
    gemm_split(alpha, a, b, beta, out);
}

/// `c ← α·a·b` into memory that need not be initialised: every element of `c` is written and
/// none is read. Outputs are allocated with this, so no pass zeroes memory that the product
/// overwrites anyway.
pub fn gemm_write<T: Float>(
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    mut c: ArrayViewMut2<MaybeUninit<T>>,
) {
    check_and_count(&a, &b, c.dim());
    let out = Out::of(c.as_mut_ptr().cast::<T>(), c.strides(), c.dim());
    gemm_split(alpha, a, b, T::zero(), out);
}

/// `a·b + bias` (the bias added to every row) as a new row-major matrix: a linear layer's
/// forward. The kernel adds the bias as it stores its tiles where it can
/// ([`Float::gemm_parallel_bias`] on the dynamic split, [`Float::gemm_bias`] on each part of
/// the fixed halves or on one thread): one pass over the output instead of writing the bias
/// rows first and reading them back. The bits are those of the two-pass form either way.
/// `None` for a single row (the GEMV path, which the caller takes with β = 1 onto the bias).
pub fn gemm_new_bias<T: Float>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: &[T],
) -> Option<Array2<T>> {
    let ((m, k), n) = (a.dim(), b.ncols());
    assert_eq!(bias.len(), n, "gemm_new_bias: internal shape bug");
    if m == 1 {
        return None;
    }
    let mut c = uninit_aligned::<T>(m, n);
    check_and_count(&a, &b, (m, n));
    let (sa, sb) = (a.strides(), b.strides());
    let threads = split_threads();
    if m * n * k >= DYNAMIC_MIN_MACS && threads > 1 && !halves_only() {
        // SAFETY: the views describe valid matrices; c is a fresh m × n row-major output that
        // aliases neither; bias holds n values.
        let done = unsafe {
            T::gemm_parallel_bias(
                m,
                k,
                n,
                a.as_ptr(),
                sa[0],
                sa[1],
                b.as_ptr(),
                sb[0],
                sb[1],
                bias.as_ptr(),
                c.as_mut_ptr().cast::<T>(),
                n as isize,
                1,
            )
        };
        if done {
            // SAFETY: every tile of c was stored.
            return Some(unsafe { c.assume_init() });
        }
    }
    let out = Out::of(c.as_mut_ptr().cast::<T>(), c.strides(), c.dim());
    // One part of the product: rows `rows` and columns `cols` of C.
    let part = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        let (a_part, b_part) = (
            a.slice(ndarray::s![rows.clone(), ..]),
            b.slice(ndarray::s![.., cols.clone()]),
        );
        let c_part = out
            .rows(rows.start, rows.len())
            .cols(cols.start, cols.len());
        // SAFETY: the parts are disjoint blocks of c; bias[cols] holds their columns' values.
        unsafe {
            T::gemm_bias(
                rows.len(),
                k,
                cols.len(),
                a_part.as_ptr(),
                sa[0],
                sa[1],
                b_part.as_ptr(),
                sb[0],
                sb[1],
                bias[cols].as_ptr(),
                c_part.ptr,
                c_part.row_stride,
                c_part.col_stride,
            )
        }
    };
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS {
        part(0..m, 0..n);
    } else {
        in_fixed_parts(m, n, threads, part);
    }
    // SAFETY: every part wrote its block of c.
    Some(unsafe { c.assume_init() })
}

/// One low-rank term of [`gemm_new_low_rank`]: `scale · u[:, u_from .. u_from + r] · v`
/// added to the output's columns `start .. start + w` (`v` is `r × w`).
#[derive(Clone, Copy)]
pub struct LowRankPart<'a, T> {
    pub v: ArrayView2<'a, T>,
    pub start: usize,
    pub u_from: usize,
    pub scale: T,
}

/// What [`Float::gemm_low_rank`] does to the finished product (after the bias and the
/// low-rank terms) as its last k block stores each tile: the bits of that pass over the
/// output, without the pass.
#[derive(Clone, Copy)]
pub enum Epilogue<'a, T> {
    None,
    /// Adds an `m × n` matrix whose rows are contiguous (the residual stream).
    Residual(ArrayView2<'a, T>),
    /// Applies GPT-2's GELU; with a pointer, also writes GELU's derivative at each
    /// pre-activation to that row-major `m × n` output (rows `n` apart).
    Gelu(Option<*mut T>),
}

// SAFETY: the derivative output is written by the product's threads in disjoint tiles, as C is.
unsafe impl<T: Sync> Send for Epilogue<'_, T> {}
unsafe impl<T: Sync> Sync for Epilogue<'_, T> {}

/// Where [`Float::gemm_low_rank`]'s low-rank terms find `u`.
#[derive(Clone, Copy)]
pub enum LowRankU<'a, T> {
    /// Given, read in place (its rows contiguous).
    Given(ArrayView2<'a, T>),
    /// `u = a·[at₁ at₂ …]` (each atᵢ k × rᵢ with rᵢ ≤ 16: a LoRA term's Aᵀ, read in place),
    /// computed by the product itself into `out` (row-major m × Σ rᵢ, the blocks of columns
    /// in order) just before each part of its rows, while those rows of `a` are in cache,
    /// and without a product of its own. The product declines (does nothing) unless it runs
    /// in parts of rows on fixed threads.
    Computed {
        ats: &'a [ArrayView2<'a, T>],
        out: *mut T,
    },
}

// SAFETY: `out` is written by the product's threads in disjoint rows.
unsafe impl<T: Sync> Send for LowRankU<'_, T> {}
unsafe impl<T: Sync> Sync for LowRankU<'_, T> {}

/// `(a·b + bias + Σ parts, u)` with `u = a·[at₁ at₂ …]` ([`LowRankU::Computed`]): a LoRA
/// linear's forward (`atᵢ` = Aᵢᵀ of each term, read in place) with u made inside the same
/// product, each thread making u for its own rows just before it needs them. `None` where
/// that does not apply (as for [`gemm_new_low_rank`], and also products split by columns or
/// in shrinking chunks, and ranks over 16): the caller makes u with its own product then.
pub fn gemm_new_lora<T: Float>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: Option<&[T]>,
    ats: &[ArrayView2<T>],
    parts: &[LowRankPart<T>],
) -> Option<(Array2<T>, Array2<T>)> {
    let (m, n) = (a.nrows(), b.ncols());
    let r = ats.iter().map(|at| at.ncols()).sum();
    // Shrinking chunks cannot make u row part by row part: decline before allocating.
    if m < 2 || low_rank_split(&a, &b).1 {
        return None;
    }
    let mut c = uninit_aligned::<T>(m, n);
    let mut u = uninit_aligned::<T>(m, r);
    let source = LowRankU::Computed {
        ats,
        out: u.as_mut_ptr().cast::<T>(),
    };
    // SAFETY: c and u are fresh row-major outputs that alias no input.
    let done = unsafe {
        run_low_rank(
            a,
            b,
            bias,
            source,
            parts,
            Epilogue::None,
            c.as_mut_ptr().cast::<T>(),
        )
    };
    if !done {
        return None;
    }
    for at in ats {
        check_and_count(&a, at, (m, at.ncols()));
    }
    // SAFETY: every row of u and every tile of c was stored.
    let (c, u) = unsafe { (c.assume_init(), u.assume_init()) };
    count_low_rank(&a, &b, u.view(), parts);
    Some((c, u))
}

/// Counts the FLOPs of a fused low-rank product: `a·b` and each part's `u·v`.
fn count_low_rank<T: Float>(
    a: &ArrayView2<T>,
    b: &ArrayView2<T>,
    u: ArrayView2<T>,
    parts: &[LowRankPart<T>],
) {
    check_and_count(a, b, (a.nrows(), b.ncols()));
    for part in parts {
        check_and_count(
            &u.slice(ndarray::s![.., part.u_from..part.u_from + part.v.nrows()]),
            &part.v,
            (a.nrows(), part.v.ncols()),
        );
    }
}

/// `a·b + bias + Σ parts (+ residual)` as a new row-major matrix, the low-rank parts summed
/// inside the kernel's tiles and the residual added as they are stored
/// ([`Float::gemm_low_rank`]): a LoRA linear's forward, or a layer's output projection onto
/// the residual stream, writing its output once. `None` where that kernel does not apply (not
/// f32 with AVX-512 or AVX2, a product under 32 wide, parts off 32-column boundaries, a
/// residual with strided rows, a single row): the caller adds the parts and the residual
/// itself then.
pub fn gemm_new_low_rank<T: Float>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: Option<&[T]>,
    u: ArrayView2<T>,
    parts: &[LowRankPart<T>],
    residual: Option<ArrayView2<T>>,
) -> Option<Array2<T>> {
    let (m, n) = (a.nrows(), b.ncols());
    if m < 2 {
        return None;
    }
    let mut c = uninit_aligned::<T>(m, n);
    let epilogue = residual.map_or(Epilogue::None, Epilogue::Residual);
    let given = LowRankU::Given(u);
    // SAFETY: c is a fresh m × n row-major output that aliases no input.
    if !unsafe {
        run_low_rank(
            a,
            b,
            bias,
            given,
            parts,
            epilogue,
            c.as_mut_ptr().cast::<T>(),
        )
    } {
        return None;
    }
    count_low_rank(&a, &b, u, parts);
    // SAFETY: every tile of c was stored.
    Some(unsafe { c.assume_init() })
}

/// `gelu(a·b + bias)` as a new row-major matrix, GELU applied as the kernel stores each
/// finished tile; with `derivative`, also GELU's derivative at each pre-activation (what its
/// backward multiplies by) as a second matrix: an MLP's first projection and activation in
/// one pass over the output, with the bits of [`linear_value`]-then-GELU. `None` where the
/// fused kernel does not apply (as for [`gemm_new_low_rank`], and on AVX2 without AVX-512,
/// where GELU in the store was slower than its own pass).
pub fn gemm_new_gelu<T: Float>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: Option<&[T]>,
    derivative: bool,
) -> Option<(Array2<T>, Option<Array2<T>>)> {
    let ((m, _), n) = (a.dim(), b.ncols());
    if m < 2 {
        return None;
    }
    let mut c = uninit_aligned::<T>(m, n);
    let mut d = derivative.then(|| uninit_aligned::<T>(m, n));
    let epilogue = Epilogue::Gelu(d.as_mut().map(|d| d.as_mut_ptr().cast::<T>()));
    let no_u = ArrayView2::from_shape((m, 0), &[]).expect("an empty matrix");
    let no_u = LowRankU::Given(no_u);
    // SAFETY: c and d are fresh m × n row-major outputs that alias no input.
    if !unsafe { run_low_rank(a, b, bias, no_u, &[], epilogue, c.as_mut_ptr().cast::<T>()) } {
        return None;
    }
    check_and_count(&a, &b, (m, n));
    // SAFETY: every tile of c, and of d when asked for, was stored.
    Some(unsafe { (c.assume_init(), d.map(|d| d.assume_init())) })
}

/// How [`run_low_rank`] splits `a·b`: the number of fixed parts, and whether it runs in
/// shrinking chunks instead (as the other products of that size do).
fn low_rank_split<T: Float>(a: &ArrayView2<T>, b: &ArrayView2<T>) -> (usize, bool) {
    let macs = a.nrows() * a.ncols() * b.ncols();
    let threads = split_threads();
    let dynamic = macs >= DYNAMIC_MIN_MACS && threads > 1 && !halves_only();
    (if macs < PARALLEL_MIN_MACS { 1 } else { threads }, dynamic)
}

/// [`Float::gemm_low_rank`] into a fresh row-major output, threaded as the other products.
///
/// # Safety
/// `c` (and the epilogue's derivative output) are row-major `m × n` and alias no input.
unsafe fn run_low_rank<T: Float>(
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    bias: Option<&[T]>,
    u: LowRankU<T>,
    parts: &[LowRankPart<T>],
    epilogue: Epilogue<T>,
    c: *mut T,
) -> bool {
    let (parts_of, dynamic) = low_rank_split(&a, &b);
    // SAFETY: as this function's.
    unsafe { T::gemm_low_rank(a, b, bias, u, parts, epilogue, c, parts_of, dynamic) }
}

/// A new row-major `rows × cols` output, uninitialised, whose first element starts a 64-byte
/// cache line (and so does every row when a row is a whole number of lines, as in all of
/// GPT-2's products). The allocator gives 16-byte alignment, so a tile's rows of C would each
/// straddle one line more than they fill, and every vector store of the tile's last column
/// would be split across two lines: aligned outputs made GPT-2's eight linear products
/// 1.02× quicker on average (one and two threads, alternated in one process). The array owns
/// up to 15 unused floats around the matrix.
fn uninit_aligned<T: Float>(rows: usize, cols: usize) -> Array2<MaybeUninit<T>> {
    const LINE: usize = 64;
    let per_line = (LINE / std::mem::size_of::<T>()).max(1);
    let len = rows * cols;
    let mut flat = ndarray::Array1::<T>::uninit(len + per_line - 1);
    let skip = flat.as_ptr().align_offset(LINE).min(per_line - 1);
    flat.slice_collapse(ndarray::s![skip..skip + len]);
    flat.into_shape_with_order((rows, cols))
        .expect("a contiguous slice reshapes")
}

/// `α·a·b` as a new row-major matrix (see [`gemm_write`]).
pub fn gemm_new<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>) -> Array2<T> {
    let mut c = uninit_aligned::<T>(a.nrows(), b.ncols());
    gemm_write(alpha, a, b, c.view_mut());
    // SAFETY: gemm_write wrote every element.
    unsafe { c.assume_init() }
}

/// The products `a₁·b₁` and `a₂·b₂` that are asked for (`None`: not needed), independent of
/// each other (a layer's ∂x and ∂W), as new row-major matrices. Where both are needed and
/// each would be split in fixed halves (from [`PARALLEL_MIN_MACS`] up to
/// [`DYNAMIC_MIN_MACS`]: nanogpt-cpu's products), the two run side by side instead, each
/// whole on one thread: no operand is packed twice, both threads work on the larger tiles
/// of a whole product, and the step waits once instead of twice. Otherwise each runs as
/// [`gemm_new`] runs it. The bits are each product's alone either way.
#[allow(clippy::type_complexity)]
pub fn gemm_new_pair<T: Float>(
    first: Option<(ArrayView2<T>, ArrayView2<T>)>,
    second: Option<(ArrayView2<T>, ArrayView2<T>)>,
) -> (Option<Array2<T>>, Option<Array2<T>>) {
    let macs = |(a, b): &(ArrayView2<T>, ArrayView2<T>)| a.nrows() * a.ncols() * b.ncols();
    let alone = |(a, b): (ArrayView2<T>, ArrayView2<T>)| gemm_new(T::one(), a, b);
    let (Some(first), Some(second)) = (first, second) else {
        return (first.map(alone), second.map(alone));
    };
    let most = macs(&first).max(macs(&second));
    let side_by_side =
        split_threads() >= 2 && (PARALLEL_MIN_MACS..DYNAMIC_MIN_MACS).contains(&most);
    if !side_by_side {
        return (Some(alone(first)), Some(alone(second)));
    }
    let whole_on_this_thread = |(a, b): (ArrayView2<T>, ArrayView2<T>)| {
        let mut c = uninit_aligned::<T>(a.nrows(), b.ncols());
        check_and_count(&a, &b, c.dim());
        let out = Out::of(c.as_mut_ptr().cast::<T>(), c.strides(), c.dim());
        gemm_serial(T::one(), a, b, T::zero(), out);
        // SAFETY: gemm_serial wrote every element (β = 0).
        unsafe { c.assume_init() }
    };
    let (c1, c2) = rayon::join(
        || whole_on_this_thread(first),
        || whole_on_this_thread(second),
    );
    (Some(c1), Some(c2))
}

/// One product `c ← α·a·b` for [`gemm_side_by_side`], into memory that need not be
/// initialised (as [`gemm_write`]), holding the borrow of its output.
pub struct Product<'c, T> {
    alpha: T,
    a: ArrayView2<'c, T>,
    b: ArrayView2<'c, T>,
    c: Out<T>,
    _output: std::marker::PhantomData<&'c mut T>,
}

impl<'c, T: Float> Product<'c, T> {
    /// `c ← α·a·b`; every element of `c` is written.
    pub fn write(
        alpha: T,
        a: ArrayView2<'c, T>,
        b: ArrayView2<'c, T>,
        mut c: ArrayViewMut2<'c, MaybeUninit<T>>,
    ) -> Self {
        check_and_count(&a, &b, c.dim());
        let c = Out::of(c.as_mut_ptr().cast::<T>(), c.strides(), c.dim());
        Product {
            alpha,
            a,
            b,
            c,
            _output: std::marker::PhantomData,
        }
    }

    fn macs(&self) -> usize {
        self.a.nrows() * self.a.ncols() * self.b.ncols()
    }
}

// SAFETY: a `Product`'s output is a block that it alone borrows (mutably), so one thread
// at a time may write it; the inputs are shared views.
unsafe impl<T: Send + Sync> Send for Product<'_, T> {}

/// Independent small products — LoRA's per-part gradients, each a few hundred thousand
/// multiply-adds with a rank-r side — run side by side, each whole on one thread, where each
/// would otherwise be split in fixed halves (the parallel section waits once instead of
/// once per product). Any product from [`DYNAMIC_MIN_MACS`] up, a single row (the GEMV
/// path) or a single product runs as [`gemm`] runs it. The bits are each product's alone
/// either way.
pub fn gemm_side_by_side<T: Float>(products: Vec<Product<'_, T>>) {
    let small = products
        .iter()
        .all(|p| p.macs() < DYNAMIC_MIN_MACS && p.a.nrows() > 1);
    if products.len() >= 2 && small && split_threads() >= 2 {
        products
            .into_par_iter()
            .with_max_len(1)
            .for_each(|p| gemm_serial(p.alpha, p.a, p.b, T::zero(), p.c));
    } else {
        for p in products {
            gemm_split(p.alpha, p.a, p.b, T::zero(), p.c);
        }
    }
}

/// The right operand of many small products that each read a range of its rows (steps of k)
/// and its first columns: attention's per-head K, V, Q and ∂O, read by every block of queries
/// or keys. When the caller asks for it and the kernel can take it (f32 on AVX-512) it is
/// packed once ([`crate::sgemm_avx512::PackedB`]) and every product reads the packed panels;
/// otherwise each product is a [`gemm_write`] of the slices (which packs what it reads, or
/// takes the GEMV path for one row).
pub struct PackedRight<'a, T> {
    b: ArrayView2<'a, T>,
    #[cfg(target_arch = "x86_64")]
    packed: Option<crate::sgemm_avx512::PackedB>,
}

impl<'a, T: Float> PackedRight<'a, T> {
    /// Whether an operand of `ncols` columns would be packed (f32 on the AVX-512 kernel, at
    /// least 32 columns).
    pub fn packs(ncols: usize) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::any::TypeId;
            TypeId::of::<T>() == TypeId::of::<f32>()
                && crate::sgemm_avx512::available()
                && ncols >= 32
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = ncols;
            false
        }
    }

    /// `b`, packed when `pack` is set and the kernel can take it ([`PackedRight::packs`]).
    pub fn new(b: ArrayView2<'a, T>, pack: bool) -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let packed = (pack && Self::packs(b.ncols())).then(|| {
                let ((k, n), strides) = (b.dim(), b.strides());
                // SAFETY: T is f32 (checked above); the view describes a valid k × n matrix.
                unsafe {
                    crate::sgemm_avx512::PackedB::new(
                        k,
                        n,
                        b.as_ptr().cast::<f32>(),
                        strides[0],
                        strides[1],
                    )
                }
            });
            PackedRight { b, packed }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = pack;
            PackedRight { b }
        }
    }

    /// `c ← α·a·b[steps, ..c.ncols()]` into memory that need not be initialised, `a` being
    /// `c.nrows() × steps.len()`.
    pub fn multiply(
        &self,
        alpha: T,
        a: ArrayView2<T>,
        steps: std::ops::Range<usize>,
        mut c: ArrayViewMut2<MaybeUninit<T>>,
    ) {
        let b = self.b.slice(ndarray::s![steps.clone(), ..c.ncols()]);
        #[cfg(target_arch = "x86_64")]
        if let Some(packed) = &self.packed {
            let (sa, sc) = (a.strides(), [c.strides()[0], c.strides()[1]]);
            if (sa[0] == 1 || sa[1] == 1) && sc[1] == 1 {
                check_and_count(&a, &b, c.dim());
                // SAFETY: T is f32 (a packed operand exists only then); the views are valid
                // matrices of the checked shapes, and `c`, a mutable view, aliases neither.
                unsafe {
                    packed.multiply(
                        a.nrows(),
                        steps,
                        c.ncols(),
                        alpha.as_f64() as f32,
                        (a.as_ptr().cast::<f32>(), sa[0], sa[1]),
                        c.as_mut_ptr().cast::<f32>(),
                        sc[0],
                    );
                }
                return;
            }
        }
        gemm_write(alpha, a, b, c);
    }
}

fn check_and_count<T: Float>(a: &ArrayView2<T>, b: &ArrayView2<T>, c_dim: (usize, usize)) {
    let (m, k) = a.dim();
    let (k2, n) = b.dim();
    assert!(
        k == k2 && c_dim == (m, n),
        "gemm: internal shape bug {:?}·{:?}→{:?}",
        a.dim(),
        b.dim(),
        c_dim
    );
    GEMM_CALLS.fetch_add(1, Ordering::Relaxed);
    GEMM_FLOPS.fetch_add((2 * m * n * k) as u64, Ordering::Relaxed);
}

/// The output of a product as a raw strided pointer, so that blocks of it can go to different
/// threads and so that it may point at uninitialised memory (which a view of `T` must not).
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
}

// SAFETY: an `Out` is only ever split into disjoint blocks, each written by one thread.
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Sync> Sync for Out<T> {}

impl<T: Float> Out<T> {
    fn of(ptr: *mut T, strides: &[isize], (rows, cols): (usize, usize)) -> Self {
        Out {
            ptr,
            rows,
            cols,
            row_stride: strides[0],
            col_stride: strides[1],
        }
    }

    /// Rows `start..start + len`.
    fn rows(self, start: usize, len: usize) -> Self {
        Out {
            // SAFETY: start ≤ rows, so the offset stays inside (or one past) the matrix.
            ptr: unsafe { self.ptr.offset(start as isize * self.row_stride) },
            rows: len,
            ..self
        }
    }

    /// Columns `start..start + len`.
    fn cols(self, start: usize, len: usize) -> Self {
        Out {
            // SAFETY: as for `rows`.
            ptr: unsafe { self.ptr.offset(start as isize * self.col_stride) },
            cols: len,
            ..self
        }
    }

    /// Writes element (i, j).
    ///
    /// # Safety
    /// `i < rows`, `j < cols`, and no other thread writes this block.
    unsafe fn write(self, i: usize, j: usize, value: T) {
        debug_assert!(i < self.rows && j < self.cols);
        *self
            .ptr
            .offset(i as isize * self.row_stride + j as isize * self.col_stride) = value;
    }

    /// Reads element (i, j), which must have been initialised (β ≠ 0).
    ///
    /// # Safety
    /// As for [`Out::write`].
    unsafe fn read(self, i: usize, j: usize) -> T {
        debug_assert!(i < self.rows && j < self.cols);
        *self
            .ptr
            .offset(i as isize * self.row_stride + j as isize * self.col_stride)
    }
}

/// `c ← α·a·b + β·c` for a single row `a` (`1 × k`): one pass over `b` with no packing, the
/// memory-bound shape of token-by-token generation. `b` is cut into blocks of about
/// [`GEMV_BLOCK_FLOATS`] that rayon (or, while decoding, [`crate::partner`]) hands out as
/// threads come free (a fixed 50/50 split made every product wait for the slower core, and a
/// shared machine always has one): for a row-major `b` blocks of rows, whose partial sums are
/// added in block order; for a column-major `b` (a transposed weight) blocks of columns. The
/// blocks depend only on the shape, so results are the same for every thread count.
fn gemv<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: Out<T>) {
    let (k, n) = b.dim();
    let parallel = !gemv_runs_whole(k, n);
    let a_vec: Vec<T> = a.row(0).iter().copied().collect();
    let mut acc = vec![T::zero(); n];
    if b.strides()[1] == 1 {
        let rows = if parallel {
            k.div_ceil(gemv_blocks(k * n)).max(8).min(k)
        } else {
            k
        };
        let partials: Vec<Vec<T>> = crate::partner::map(k.div_ceil(rows), |i| {
            let range = i * rows..((i + 1) * rows).min(k);
            let mut part = vec![T::zero(); n];
            let b = b.slice(ndarray::s![range.clone(), ..]);
            crate::simd::vectorized(
                #[inline(always)]
                || axpy_rows(&a_vec[range], b, &mut part),
            );
            part
        });
        for part in partials {
            crate::simd::vectorized(
                #[inline(always)]
                || acc.iter_mut().zip(part).for_each(|(acc, p)| *acc += p),
            );
        }
    } else {
        let cols = if parallel {
            n.div_ceil(gemv_blocks(k * n)).max(16).min(n)
        } else {
            n
        };
        let parts = crate::partner::map(n.div_ceil(cols), |i| {
            let mut part = vec![T::zero(); cols.min(n - i * cols)];
            let b = b.slice(ndarray::s![.., i * cols..i * cols + part.len()]);
            crate::simd::vectorized(
                #[inline(always)]
                || dot_columns(&a_vec, b, &mut part),
            );
            part
        });
        for (acc, part) in acc.chunks_mut(cols).zip(parts) {
            acc.copy_from_slice(&part);
        }
    }
    for (j, acc) in acc.into_iter().enumerate() {
        // SAFETY: c is 1 × n and this thread owns it; it is read only when β ≠ 0.
        unsafe {
            let value = if beta == T::zero() {
                alpha * acc
            } else {
                alpha * acc + beta * c.read(0, j)
            };
            c.write(0, j, value);
        }
    }
}

/// How many blocks a parallel [`gemv`] cuts `len` weights into: about
/// [`GEMV_BLOCK_FLOATS`] each, but a multiple of four, so that two (or four) threads get
/// equal shares — GPT-2's 768 × 768 c_proj was three blocks, one thread doing two while the
/// other waited. A function of the shape only, so results stay the same on any thread count.
fn gemv_blocks(len: usize) -> usize {
    len.div_ceil(GEMV_BLOCK_FLOATS).next_multiple_of(4)
}

/// `acc[j] += Σ_p a[p]·b[p, j]` for a `b` with contiguous rows. The rows are cut into eight
/// equal runs read side by side (rows `t, t + q, …, t + 7q` in one pass over `acc`): eight
/// long sequential streams, which this machine's memory served at 1.1× the rate of eight
/// neighbouring rows per pass and 1.4× that of four (the GEMV is bound by it).
#[inline(always)]
fn axpy_rows<T: Float>(a: &[T], b: ArrayView2<T>, acc: &mut [T]) {
    let row = |p: usize| b.row(p).to_slice().expect("unit column stride");
    let k = a.len();
    let q = k / 8;
    for t in 0..q {
        let x: [T; 8] = std::array::from_fn(|i| a[t + i * q]);
        axpy_step(x, std::array::from_fn(|i| row(t + i * q)), acc);
    }
    for (p, &ap) in a.iter().enumerate().skip(8 * q) {
        for (acc, &x) in acc.iter_mut().zip(row(p)) {
            *acc += ap * x;
        }
    }
}

/// One step of [`axpy_rows`]: `acc[j] += Σ_i x_i·rows_i[j]` over eight rows, the products
/// added in pairs, then the pairs, then the halves, then onto `acc`. Decoding's one-query
/// attention takes the same steps over all heads at once, for the same bits.
#[inline(always)]
pub(crate) fn axpy_step<T: Float>(x: [T; 8], rows: [&[T]; 8], acc: &mut [T]) {
    let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
    let rows = r0
        .iter()
        .zip(r1)
        .zip(r2)
        .zip(r3)
        .zip(r4)
        .zip(r5)
        .zip(r6)
        .zip(r7);
    for (acc, (((((((&r0, &r1), &r2), &r3), &r4), &r5), &r6), &r7)) in acc.iter_mut().zip(rows) {
        let low = (x[0] * r0 + x[1] * r1) + (x[2] * r2 + x[3] * r3);
        let high = (x[4] * r4 + x[5] * r5) + (x[6] * r6 + x[7] * r7);
        *acc += low + high;
    }
}

/// Whether a [`gemv`] over a `k × n` weight runs as one block on the calling thread (below
/// the parallel size: a row-major weight's partial sums are then a single block's). The
/// GEMV's own test, which decoding's one-query attention asks too (to take its bits).
pub(crate) fn gemv_runs_whole(k: usize, n: usize) -> bool {
    k * n < PARALLEL_MIN_MACS
}

/// `acc[j] = a · b[:, j]` for a `b` with contiguous columns (a transposed weight): eight
/// columns an eighth of the block apart per pass ([`Float::dot8`]), so that the block is read
/// as eight long sequential streams (measured 1.3–1.4× the rate of one column after another).
/// On AVX2, whose sixteen registers hold three dots' sums, not eight, three columns a third
/// of the block apart ([`Float::dot3`]): three streams read in step beat eight read three at a
/// time (a Zen 3 core: GPT-2's lm_head 20.6–22.2 against 18.1–19.0 GB/s). Each element has
/// the bits of [`crate::simd::dot_two_rows`] either way.
#[inline(always)]
fn dot_columns<T: Float>(a: &[T], b: ArrayView2<T>, acc: &mut [T]) {
    let column = |j: usize| b.column(j).to_slice().expect("unit row stride");
    if crate::simd::width() == crate::simd::Width::Avx2 {
        let q = acc.len() / 3;
        for t in 0..q {
            let js = [t, t + q, t + 2 * q];
            for (j, value) in js.into_iter().zip(T::dot3(a, js.map(column))) {
                acc[j] = value;
            }
        }
        for (j, acc) in acc.iter_mut().enumerate().skip(3 * q) {
            *acc = crate::simd::dot_two_rows(a, column(j));
        }
        return;
    }
    let q = acc.len() / 8;
    for t in 0..q {
        let js: [usize; 8] = std::array::from_fn(|i| t + i * q);
        for (j, value) in js.into_iter().zip(T::dot8(a, js.map(column))) {
            acc[j] = value;
        }
    }
    for (j, acc) in acc.iter_mut().enumerate().skip(8 * q) {
        *acc = crate::simd::dot_two_rows(a, column(j));
    }
}

fn gemm_split<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: Out<T>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 1 && k > 0 && (b.strides()[1] == 1 || b.strides()[0] == 1) {
        return gemv(alpha, a, b, beta, c);
    }
    if splits_depth(m, n, k) {
        return gemm_depth_split(alpha, a, b, beta, c);
    }
    let threads = split_threads();
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS || (m < 16 && n < 16) {
        return gemm_serial(alpha, a, b, beta, c);
    }
    if m * n * k >= DYNAMIC_MIN_MACS && !halves_only() {
        // SAFETY: as in `gemm_serial`, for the whole of `c`.
        if unsafe { call_kernel(T::gemm_parallel, alpha, a, b, beta, c) } {
            return;
        }
    }
    in_fixed_parts(m, n, threads, |rows, cols| {
        let (a_rows, b_cols) = (
            a.slice(ndarray::s![rows.clone(), ..]),
            b.slice(ndarray::s![.., cols.clone()]),
        );
        let c_part = c.rows(rows.start, rows.len()).cols(cols.start, cols.len());
        gemm_serial(alpha, a_rows, b_cols, beta, c_part);
    });
}

/// Steps of k per chunk of a [`gemm_depth_split`]: sixteen of the AVX-512 kernel's k blocks.
const DEPTH_CHUNK: usize = 16 * 384;
/// Most chunks a [`gemm_depth_split`] makes (each but the first is an m × n partial product
/// in memory until they are added up).
const DEPTH_MAX_CHUNKS: usize = 16;

/// Whether a product is deep and narrow enough for [`gemm_depth_split`]: k at least eight
/// times the output's longer side, and the operand a row or column split would have every
/// thread read whole (k × the shorter side) over 2²⁴ floats — too large for the AVX-512
/// kernel's shared packing, so that split would fall back to fixed halves each packing all of
/// it. In GPT-2 at B4×T256 that is the tied lm_head's ∂x = ∂logits·wte (k = 50 257); from
/// about 25 000 tokens per batch every ∂W = xᵀ·G is one too. Depends on the shape only — not
/// on the element type, the kernel or the thread count (one thread runs the chunks in turn,
/// with the same extra partials) — so the bits do not depend on the thread count either.
fn splits_depth(m: usize, n: usize, k: usize) -> bool {
    m > 1 && n > 1 && k >= 8 * m.max(n) && k * m.min(n) > 1 << 24
}

/// `c ← α·a·b + β·c` with k cut into fixed chunks that threads take as they come free:
/// the first chunk's product goes straight into `c` (with β), every other one into a partial
/// m × n matrix, and the partials are added to `c` in chunk order. Each thread reads only its
/// chunks of a and b (a row split would read all of b on every thread), a core slowed by
/// another process takes fewer chunks, and since the chunks and the order of the additions
/// are fixed by the shape, any thread count gives the same bits.
fn gemm_depth_split<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: Out<T>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    let chunk = DEPTH_CHUNK.max(k.div_ceil(DEPTH_MAX_CHUNKS));
    let chunks: Vec<std::ops::Range<usize>> = (0..k)
        .step_by(chunk)
        .map(|start| start..(start + chunk).min(k))
        .collect();
    let partials: Vec<Option<Array2<T>>> = chunks
        .par_iter()
        .with_max_len(1)
        .enumerate()
        .map(|(i, depth)| {
            let (a_chunk, b_chunk) = (
                a.slice(ndarray::s![.., depth.clone()]),
                b.slice(ndarray::s![depth.clone(), ..]),
            );
            if i == 0 {
                gemm_serial(alpha, a_chunk, b_chunk, beta, c);
                return None;
            }
            let mut partial = uninit_aligned::<T>(m, n);
            let out = Out::of(partial.as_mut_ptr().cast::<T>(), partial.strides(), (m, n));
            gemm_serial(alpha, a_chunk, b_chunk, T::zero(), out);
            // SAFETY: gemm_serial wrote every element (β = 0).
            Some(unsafe { partial.assume_init() })
        })
        .collect();
    let partials: Vec<&[T]> = partials
        .iter()
        .flatten()
        .map(|p| p.as_slice().expect("a new row-major matrix"))
        .collect();
    (0..m).into_par_iter().for_each(|i| {
        for j in 0..n {
            // SAFETY: (i, j) is in bounds, and this row is this task's alone; c was written
            // by the first chunk's product.
            unsafe {
                let sum = partials
                    .iter()
                    .fold(c.read(i, j), |acc, partial| acc + partial[i * n + j]);
                c.write(i, j, sum);
            }
        }
    });
}

/// The narrowest block [`in_fixed_parts`] cuts (rows or columns). The kernel a product takes
/// depends on its shape — from 32 wide the register-tile kernels, narrower ones the thin
/// kernels or matrixmultiply — and their sums round differently: a block narrower than this
/// could take another kernel than the whole product, and the result would depend on the
/// thread count and, in a grouped training step, on when the other groups finish (the last
/// one splits its products again). From 32 on, a block takes the whole product's kernel.
const MIN_PART: usize = 32;

/// How many blocks [`in_fixed_parts`] cuts `len` rows (or columns) into on `threads` threads:
/// one per thread, fewer where a block would be narrower than [`MIN_PART`].
fn fixed_blocks(len: usize, threads: usize) -> usize {
    threads.min(len / MIN_PART).max(1)
}

/// Calls `part(rows, cols)` for each of about `threads` equal blocks of an m × n output, in
/// parallel: blocks of rows when `m ≥ n`, else of columns (the fixed-halves split), none
/// narrower than [`MIN_PART`] (fewer blocks, or the whole product, instead).
fn in_fixed_parts(
    m: usize,
    n: usize,
    threads: usize,
    part: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    // Block i of `blocks` is [i·len/blocks, (i+1)·len/blocks): at least len/blocks ≥ MIN_PART.
    let cut = |len: usize, blocks: usize, i: usize| i * len / blocks..(i + 1) * len / blocks;
    if m >= n {
        let blocks = fixed_blocks(m, threads);
        (0..blocks)
            .into_par_iter()
            .for_each(|i| part(cut(m, blocks, i), 0..n));
    } else {
        let blocks = fixed_blocks(n, threads);
        (0..blocks)
            .into_par_iter()
            .for_each(|i| part(0..m, cut(n, blocks, i)));
    }
}

/// Whether every parallel product is split in fixed halves (`TAPELORA_GEMM_SPLIT=halves`),
/// for timing the dynamic split against them side by side.
fn halves_only() -> bool {
    static HALVES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HALVES.get_or_init(|| std::env::var("TAPELORA_GEMM_SPLIT").as_deref() == Ok("halves"))
}

fn gemm_serial<T: Float>(alpha: T, a: ArrayView2<T>, b: ArrayView2<T>, beta: T, c: Out<T>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: in bounds, this thread's block; read only when β ≠ 0.
                unsafe {
                    let value = if beta == T::zero() {
                        T::zero()
                    } else {
                        beta * c.read(i, j)
                    };
                    c.write(i, j, value);
                }
            }
        }
        return;
    }
    // SAFETY: the views describe valid matrices of the asserted shapes; `c` is this thread's
    // block of an output that aliases neither `a` nor `b`; with β = 0 matrixmultiply does not
    // read `c`.
    unsafe { call_kernel(T::gemm, alpha, a, b, beta, c) }
}

/// A kernel with [`Float::gemm`]'s raw signature.
type Kernel<T, R> = unsafe fn(
    usize,
    usize,
    usize,
    T,
    *const T,
    isize,
    isize,
    *const T,
    isize,
    isize,
    T,
    *mut T,
    isize,
    isize,
) -> R;

/// `kernel` on the views' shapes, pointers and strides.
///
/// # Safety
/// As for [`Float::gemm`]: `c` aliases neither `a` nor `b`.
unsafe fn call_kernel<T: Float, R>(
    kernel: Kernel<T, R>,
    alpha: T,
    a: ArrayView2<T>,
    b: ArrayView2<T>,
    beta: T,
    c: Out<T>,
) -> R {
    let ((m, k), n) = (a.dim(), b.ncols());
    let (sa, sb) = (a.strides(), b.strides());
    kernel(
        m,
        k,
        n,
        alpha,
        a.as_ptr(),
        sa[0],
        sa[1],
        b.as_ptr(),
        sb[0],
        sb[1],
        beta,
        c.ptr,
        c.row_stride,
        c.col_stride,
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn new_products_start_on_a_cache_line_and_hold_the_product() {
        let f = |r: usize, c: usize| {
            Array2::from_shape_fn((r, c), |(i, j)| ((i * 5 + j * 3) % 7) as f32 - 3.0)
        };
        for (m, k, n) in [
            (0, 3, 4),
            (1, 1, 1),
            (5, 7, 3),
            (64, 48, 80),
            (130, 70, 260),
        ] {
            let (a, b) = (f(m, k), f(k, n));
            let want = a.dot(&b);
            let bias = vec![0.5f32; n];
            let mut outputs = vec![("gemm_new", gemm_new(1.0, a.view(), b.view()))];
            if let Some(c) = gemm_new_bias(a.view(), b.view(), &bias) {
                outputs.push(("gemm_new_bias", c - 0.5));
            }
            if let (Some(c), _) = gemm_new_pair(Some((a.view(), b.view())), None) {
                outputs.push(("gemm_new_pair", c));
            }
            for (name, c) in outputs {
                assert_eq!(c.dim(), (m, n), "{name}");
                if m * n > 0 {
                    assert_eq!(
                        c.as_ptr() as usize % 64,
                        0,
                        "{name} {m}×{k}×{n}: not aligned"
                    );
                }
                assert!(c.is_standard_layout(), "{name}");
                for (got, want) in c.iter().zip(&want) {
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{name} {m}×{k}×{n}: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Whether the AVX2 kernels run here.
    fn avx2_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        return crate::sgemm_avx2::available();
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    #[test]
    fn low_rank_products_are_fused_for_c_attn_shapes_on_avx512_and_avx2_and_declined_elsewhere() {
        // nanogpt-cpu's c_attn with LoRA on q and v (rank 8, Bᵀ views) and GPT-2's width.
        for (rows, width) in [(768, 128), (64, 768)] {
            let f = |r: usize, c: usize, seed: usize| {
                Array2::from_shape_fn((r, c), |(i, j)| {
                    ((i * 7 + j * 3 + seed) % 11) as f32 * 0.1 - 0.5
                })
            };
            let (x, w, u) = (f(rows, width, 0), f(width, 3 * width, 1), f(rows, 16, 2));
            let (b_q, b_v) = (f(width, 8, 3), f(width, 8, 4));
            let bias: Vec<f32> = (0..3 * width).map(|j| j as f32 * 0.01).collect();
            let parts = [
                LowRankPart {
                    v: b_q.t(),
                    start: 0,
                    u_from: 0,
                    scale: 2.0,
                },
                LowRankPart {
                    v: b_v.t(),
                    start: 2 * width,
                    u_from: 8,
                    scale: 2.0,
                },
            ];
            let fused = on_threads(2, || {
                gemm_new_low_rank(x.view(), w.view(), Some(&bias), u.view(), &parts, None)
            });
            let Some(fused) = fused else {
                assert!(!crate::sgemm_avx512::available() && !avx2_available());
                continue;
            };
            let mut want = gemm_new_bias(x.view(), w.view(), &bias).unwrap();
            for part in &parts {
                let r = part.v.nrows();
                gemm(
                    part.scale,
                    u.slice(ndarray::s![.., part.u_from..part.u_from + r]),
                    part.v,
                    1.0,
                    want.slice_mut(ndarray::s![.., part.start..part.start + part.v.ncols()]),
                );
            }
            let worst = (&fused - &want)
                .iter()
                .zip(&want)
                .map(|(d, w)| d.abs() / (1.0 + w.abs()))
                .fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{rows}×{width}: {worst}");
        }
        // f64 and a single row are left to the caller.
        let (x, w, u, v) = (
            Array2::<f64>::ones((40, 8)),
            Array2::<f64>::ones((8, 64)),
            Array2::<f64>::ones((40, 1)),
            Array2::<f64>::ones((1, 32)),
        );
        let part = [LowRankPart {
            v: v.view(),
            start: 0,
            u_from: 0,
            scale: 1.0,
        }];
        assert!(gemm_new_low_rank(x.view(), w.view(), None, u.view(), &part, None).is_none());
        let x32 = Array2::<f32>::ones((1, 8));
        let (w32, u32, v32) = (
            w.mapv(|v| v as f32),
            Array2::<f32>::ones((1, 1)),
            v.mapv(|v| v as f32),
        );
        let part = [LowRankPart {
            v: v32.view(),
            start: 0,
            u_from: 0,
            scale: 1.0,
        }];
        assert!(gemm_new_low_rank(x32.view(), w32.view(), None, u32.view(), &part, None).is_none());
    }

    fn naive(a: &Array2<f64>, b: &Array2<f64>) -> Array2<f64> {
        let mut c = Array2::zeros((a.nrows(), b.ncols()));
        for i in 0..a.nrows() {
            for j in 0..b.ncols() {
                c[[i, j]] = (0..a.ncols()).map(|p| a[[i, p]] * b[[p, j]]).sum();
            }
        }
        c
    }

    #[test]
    fn transposed_views_multiply_without_copies() {
        let a = Array2::from_shape_fn((70, 90), |(i, j)| ((i * 7 + j * 3) % 11) as f64 - 5.0);
        let b = Array2::from_shape_fn((70, 80), |(i, j)| ((i * 5 + j) % 13) as f64 - 6.0);
        // aᵀ·b with aᵀ a stride-swapped view.
        let mut c = Array2::zeros((90, 80));
        gemm(1.0, a.t(), b.view(), 0.0, c.view_mut());
        assert_eq!(c, naive(&a.t().to_owned(), &b));
    }

    #[test]
    fn few_rows_against_many_columns_match_the_naive_product() {
        // 1–16 rows (thin kernel up to 8, the 6×16 kernel from 9 on AVX2), row- and
        // column-major A, shallow and deep.
        for (m, k, n) in [
            (8, 40, 100),
            (9, 40, 100),
            (12, 17, 64),
            (16, 300, 70),
            (13, 600, 33),
        ] {
            let a = Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 - 5.0);
            let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 - 6.0);
            let want = naive(&a.mapv(f64::from), &b.mapv(f64::from));
            let a_t = a.t().as_standard_layout().into_owned();
            for a in [a.view(), a_t.t()] {
                let mut c = Array2::from_elem((m, n), f32::NAN);
                gemm(1.0, a, b.view(), 0.0, c.view_mut());
                assert_eq!(c.mapv(f64::from), want, "{m}×{k}×{n}");
            }
        }
    }

    #[test]
    fn single_rows_take_the_gemv_path_for_both_weight_layouts() {
        let a = Array2::from_shape_fn((1, 300), |(_, j)| (j % 7) as f64 - 3.0);
        let b = Array2::from_shape_fn((300, 1000), |(i, j)| ((i * 3 + j) % 5) as f64 - 2.0);
        let want = naive(&a, &b);
        let mut c = Array2::from_elem((1, 1000), 1.0);
        gemm(1.0, a.view(), b.view(), 0.0, c.view_mut());
        assert_eq!(c, want);
        let bt = b.t().as_standard_layout().into_owned(); // [1000, 300]: use its transpose view
        let mut c2 = Array2::from_elem((1, 1000), 1.0);
        gemm(2.0, a.view(), bt.t(), 1.0, c2.view_mut());
        assert_eq!(c2, want * 2.0 + 1.0);
    }

    /// `f` on a pool of `threads` threads.
    pub(crate) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a thread pool")
            .install(f)
    }

    #[test]
    fn gemv_gives_the_same_bits_on_one_thread_and_on_three() {
        // Non-integer values, so that a different summation order would show in the bits.
        let a = Array2::from_shape_fn((1, 700), |(_, j)| ((j * 37) % 101) as f32 * 0.013 - 0.6);
        let b = Array2::from_shape_fn((700, 900), |(i, j)| {
            ((i * 7 + j * 13) % 97) as f32 * 0.021 - 1.0
        });
        let bt = b.t().as_standard_layout().into_owned();
        let run = |threads: usize| {
            on_threads(threads, || {
                let mut rows = Array2::zeros((1, 900));
                gemm(1.0, a.view(), b.view(), 0.0, rows.view_mut());
                let mut columns = Array2::zeros((1, 900));
                gemm(1.0, a.view(), bt.t(), 0.0, columns.view_mut());
                (rows, columns)
            })
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one.0, three.0, "row-major weight");
        assert_eq!(one.1, three.1, "column-major weight");
        // Whatever the streams, each element of the column-major GEMV is `dot_two_rows`'.
        for (j, got) in one.1.iter().enumerate() {
            let want = crate::simd::dot_two_rows(
                a.row(0).to_slice().unwrap(),
                bt.row(j).to_slice().unwrap(),
            );
            assert_eq!(got.to_bits(), want.to_bits(), "column {j}");
        }
        let want = naive(&a.mapv(f64::from), &b.mapv(f64::from));
        for (got, want) in one.0.iter().chain(&one.1).zip(want.iter().chain(&want)) {
            assert!((f64::from(*got) - want).abs() < 1e-3, "{got} vs {want}");
        }
        // Fewer rows (or columns) than one block's minimum, in a product large enough to split.
        let (a3, b3) = (
            Array2::from_elem((1, 3), 0.5f32),
            Array2::from_elem((3, 100_000), 2.0f32),
        );
        let mut c3 = Array2::zeros((1, 100_000));
        gemm(1.0, a3.view(), b3.view(), 0.0, c3.view_mut());
        assert!(c3.iter().all(|&v| v == 3.0));
        let (a4, b4) = (
            Array2::from_elem((1, 30_000), 0.5f32),
            Array2::from_elem((10, 30_000), 2.0f32),
        );
        let mut c4 = Array2::zeros((1, 10));
        gemm(1.0, a4.view(), b4.t(), 0.0, c4.view_mut());
        assert!(c4.iter().all(|&v| v == 30_000.0));
    }

    #[test]
    fn deep_products_split_along_k_give_the_chunked_sum_on_any_thread_count() {
        // Four chunks of k (6144, 6144, 6144, 1568), transposed operands, β ≠ 0, f32 (our
        // kernel) and f64; every thread count gives the same bits, within rounding of a
        // product summed in one pass.
        fn check<T: Float + std::fmt::Debug>(of: impl Fn(f64) -> T) {
            let k = 20_000;
            let a =
                Array2::from_shape_fn((40, k), |(i, p)| of(((i * 7 + p * 3) % 11) as f64 - 5.0));
            let b = Array2::from_shape_fn((k, 33), |(p, j)| of(((p * 5 + j) % 13) as f64 * 0.25));
            let start = Array2::from_shape_fn((33, 40), |(j, i)| of((i + j) as f64));
            let (alpha, beta) = (of(0.5), of(2.0));
            let run = |threads| {
                on_threads(threads, || {
                    let mut c = start.clone();
                    let out = Out::of(c.as_mut_ptr(), c.strides(), (33, 40));
                    gemm_depth_split(alpha, b.t(), a.t(), beta, out);
                    c
                })
            };
            let one = run(1);
            assert_eq!(one, run(2));
            assert_eq!(one, run(3));
            let a64 = a.mapv(|x| x.as_f64());
            let b64 = b.mapv(|x| x.as_f64());
            let want = naive(&b64.t().to_owned(), &a64.t().to_owned()) * 0.5
                + start.mapv(|x| x.as_f64()) * 2.0;
            let got = one.mapv(|x| x.as_f64());
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let diff = (&got - &want).iter().fold(0.0f64, |m, x| m.max(x.abs()));
            assert!(diff <= scale * 1e-5, "max diff {diff} of {scale}");
        }
        check(|x| x as f32);
        check(|x| x);
        // GPT-2's tied lm_head ∂x takes it; its other products, and shallow ones, do not.
        assert!(splits_depth(1024, 768, 50_257));
        for (m, n, k) in [
            (1024, 2304, 768),
            (768, 2304, 1024),
            (1024, 768, 3072),
            (50_257, 768, 1024),
        ] {
            assert!(!splits_depth(m, n, k), "{m}×{k}×{n}");
        }
    }

    #[test]
    fn beta_accumulates_and_large_products_split_across_threads() {
        let a = Array2::from_shape_fn((300, 200), |(i, j)| ((i + 2 * j) % 7) as f64 - 3.0);
        let b = Array2::from_shape_fn((200, 150), |(i, j)| ((3 * i + j) % 5) as f64 - 2.0);
        let mut c = Array2::from_elem((300, 150), 1.0);
        gemm(2.0, a.view(), b.view(), 1.0, c.view_mut());
        assert_eq!(c, naive(&a, &b) * 2.0 + 1.0);
        // A wide, short product takes the column split.
        let a1 = a.slice(ndarray::s![..2, ..]).to_owned();
        let b1 = Array2::from_shape_fn((200, 2000), |(i, j)| ((i + j) % 3) as f64);
        let mut c1 = Array2::zeros((2, 2000));
        gemm(1.0, a1.view(), b1.view(), 0.0, c1.view_mut());
        assert_eq!(c1, naive(&a1, &b1));
    }

    #[test]
    fn a_product_with_a_bias_gives_the_bits_of_the_bias_rows_then_the_product() {
        // Fixed halves by rows and by columns (nanogpt-cpu's linears), the dynamic split, one
        // thread's whole product, a thin one (the two-pass fallback) and k = 0; f32 and f64.
        fn check<T: Float + std::fmt::Debug>(of: impl Fn(f64) -> T) {
            for (m, k, n) in [
                (768, 128, 384),
                (100, 128, 700),
                (1024, 256, 256),
                (40, 30, 50),
                (70, 20, 9),
                (64, 0, 48),
            ] {
                let a = Array2::from_shape_fn((m, k), |(i, j)| {
                    of(((i * 7 + j) % 13) as f64 * 0.1 - 0.6)
                });
                let b = Array2::from_shape_fn((k, n), |(i, j)| {
                    of(((i * 5 + j) % 11) as f64 * 0.1 - 0.5)
                });
                let bias: Vec<T> = (0..n).map(|j| of((j % 17) as f64 * 0.37 - 2.0)).collect();
                let mut want = Array2::from_shape_fn((m, n), |(_, j)| bias[j]);
                on_threads(1, || {
                    gemm(T::one(), a.view(), b.view(), T::one(), want.view_mut())
                });
                for threads in [1, 2, 3] {
                    let got = on_threads(threads, || gemm_new_bias(a.view(), b.view(), &bias))
                        .expect("more than one row");
                    assert_eq!(got, want, "{m}×{k}×{n} on {threads} threads");
                }
            }
            let one_row = Array2::from_elem((1, 3), of(1.0));
            let b = Array2::from_elem((3, 4), of(1.0));
            assert!(gemm_new_bias(one_row.view(), b.view(), &[of(0.0); 4]).is_none());
        }
        check(|v| v as f32);
        check(|v| v);
    }

    #[test]
    fn a_pair_of_products_gives_the_bits_of_each_product_alone() {
        // A layer's ∂x = G·Wᵀ and ∂W = xᵀ·G at nanogpt-cpu's size (run side by side, each
        // whole on one thread), a tiny pair and a pair past the dynamic split (one after the
        // other); f32 (our kernel where the CPU has it) and f64 (matrixmultiply).
        fn check<T: Float + std::fmt::Debug>(of: impl Fn(f64) -> T) {
            for (rows, k, n) in [(768, 128, 384), (20, 8, 12), (1024, 256, 256)] {
                let x = Array2::from_shape_fn((rows, k), |(i, j)| {
                    of(((i * 7 + j) % 13) as f64 * 0.1 - 0.6)
                });
                let w = Array2::from_shape_fn((k, n), |(i, j)| {
                    of(((i * 5 + j) % 11) as f64 * 0.1 - 0.5)
                });
                let g = Array2::from_shape_fn((rows, n), |(i, j)| {
                    of(((i * 3 + j) % 17) as f64 * 0.07 - 0.5)
                });
                let alone = on_threads(1, || {
                    (
                        gemm_new(T::one(), g.view(), w.t()),
                        gemm_new(T::one(), x.t(), g.view()),
                    )
                });
                for threads in [1, 2, 3] {
                    let calls = gemm_calls();
                    let pair = on_threads(threads, || {
                        gemm_new_pair(Some((g.view(), w.t())), Some((x.t(), g.view())))
                    });
                    assert!(gemm_calls() >= calls + 2, "both products are counted");
                    let (first, second) = alone.clone();
                    assert_eq!(
                        pair,
                        (Some(first), Some(second)),
                        "{rows}×{k}×{n} on {threads} threads"
                    );
                    let only_second =
                        on_threads(threads, || gemm_new_pair(None, Some((x.t(), g.view()))));
                    assert_eq!(only_second, (None, Some(alone.1.clone())));
                }
            }
        }
        check(|v| v as f32);
        check(|v| v);
    }

    #[test]
    fn products_on_this_thread_are_not_split_keep_their_bits_and_the_flag_is_put_back() {
        // nanogpt-cpu's c_fc at one group's size: split in halves on two threads, whole
        // inside `products_on_this_thread`; every entry point that splits gives the same bits.
        let a = Array2::from_shape_fn((384, 128), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.1 - 0.6);
        let b = Array2::from_shape_fn((128, 512), |(i, j)| ((i * 5 + j) % 11) as f32 * 0.1 - 0.5);
        let bias: Vec<f32> = (0..512).map(|j| (j % 7) as f32 * 0.01).collect();
        let all = || {
            (
                gemm_new(1.0, a.view(), b.view()),
                gemm_new_bias(a.view(), b.view(), &bias),
                gemm_new_gelu(a.view(), b.view(), Some(&bias), true),
                gemm_new_pair(Some((a.view(), b.view())), Some((a.t(), a.view()))),
            )
        };
        on_threads(2, || {
            assert_eq!(split_threads(), 2);
            let split = all();
            let whole = products_on_this_thread(|| {
                assert_eq!(split_threads(), 1);
                products_on_this_thread(|| ());
                assert_eq!(split_threads(), 1, "still set after a nested call");
                all()
            });
            assert_eq!(whole, split);
            assert_eq!(split_threads(), 2, "put back");
            let panicked =
                std::panic::catch_unwind(|| products_on_this_thread(|| panic!("inside")));
            assert!(panicked.is_err());
            assert_eq!(split_threads(), 2, "put back after a panic");
        });
    }

    #[test]
    fn fixed_parts_are_never_narrower_than_a_kernel_tile_so_any_thread_count_gives_the_same_bits() {
        assert_eq!(fixed_blocks(384, 2), 2);
        assert_eq!(fixed_blocks(64, 2), 2);
        assert_eq!(fixed_blocks(63, 2), 1);
        assert_eq!(fixed_blocks(90, 3), 2);
        assert_eq!(fixed_blocks(97, 3), 3, "32 + 32 + 33");
        assert_eq!(fixed_blocks(20, 4), 1);
        // Products whose halves used to be narrower than 32: 6×16 kernel whole, matrixmultiply
        // or the thin kernel in halves (rows of a square-ish product, columns against 9–16
        // rows deeper than the shallow kernel's reach, a linear's bias product).
        for (m, k, n) in [(40, 300, 40), (12, 600, 40), (50, 270, 33), (48, 200, 60)] {
            let a =
                Array2::from_shape_fn((m, k), |(i, j)| ((i * 7 + j * 3) % 11) as f32 * 0.1 - 0.5);
            let b = Array2::from_shape_fn((k, n), |(i, j)| ((i * 5 + j) % 13) as f32 * 0.1 - 0.6);
            let bias: Vec<f32> = (0..n).map(|j| (j % 7) as f32 * 0.01).collect();
            let all = || {
                (
                    gemm_new(1.0, a.view(), b.view()),
                    gemm_new_bias(a.view(), b.view(), &bias),
                )
            };
            let whole = on_threads(1, all);
            for threads in [2, 3] {
                assert_eq!(
                    on_threads(threads, all),
                    whole,
                    "{m}×{k}×{n} on {threads} threads"
                );
            }
        }
    }

    #[test]
    fn the_last_group_running_splits_its_products_again_with_the_same_bits() {
        let a = Array2::from_shape_fn((384, 128), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.1 - 0.6);
        let b = Array2::from_shape_fn((128, 512), |(i, j)| ((i * 5 + j) % 11) as f32 * 0.1 - 0.5);
        on_threads(2, || {
            let split = gemm_new(1.0, a.view(), b.view());
            let running = AtomicUsize::new(2);
            products_on_this_thread_while_others_run(&running, || {
                assert_eq!(split_threads(), 1, "another group is running");
                let whole = gemm_new(1.0, a.view(), b.view());
                // Nested: still this group's, still held while the other runs.
                products_on_this_thread(|| assert_eq!(split_threads(), 1));
                running.fetch_sub(1, Ordering::Release);
                assert_eq!(split_threads(), 2, "the other group is done");
                products_on_this_thread(|| assert_eq!(split_threads(), 2));
                let again = gemm_new(1.0, a.view(), b.view());
                assert_eq!(whole, split);
                assert_eq!(again, split);
            });
            assert_eq!(split_threads(), 2, "put back");
            products_on_this_thread(|| assert_eq!(split_threads(), 1, "no counter any more"));
            let running = AtomicUsize::new(3);
            let panicked = std::panic::catch_unwind(|| {
                products_on_this_thread_while_others_run(&running, || panic!("inside"))
            });
            assert!(panicked.is_err());
            products_on_this_thread(|| assert_eq!(split_threads(), 1, "put back after a panic"));
        });
    }

    #[test]
    fn products_side_by_side_give_the_bits_of_each_product_alone() {
        // LoRA's backward: each part's ∂u block (disjoint columns of one uninitialised
        // output, k = 128) and its ∂v (k = rows), at nanogpt-cpu's size, tiny, and with a
        // single row (the GEMV path).
        for rows in [768, 5, 1] {
            let (r, w) = (8, 128);
            let g = Array2::from_shape_fn((rows, 2 * w), |(i, j)| {
                ((i * 7 + j) % 13) as f32 * 0.1 - 0.6
            });
            let v = Array2::from_shape_fn((r, w), |(i, j)| ((i * 5 + j) % 11) as f32 * 0.1 - 0.5);
            let u = Array2::from_shape_fn((rows, r), |(i, j)| ((i * 3 + j) % 17) as f32 * 0.07);
            let (gq, gv_span) = (g.slice(ndarray::s![.., ..w]), g.slice(ndarray::s![.., w..]));
            let alone = on_threads(1, || {
                [
                    gemm_new(0.5, gq, v.t()),
                    gemm_new(2.0, gv_span, v.t()),
                    gemm_new(2.0, u.t(), gv_span),
                ]
            });
            for threads in [1, 2, 3] {
                let mut gu = Array2::<f32>::uninit((rows, 2 * r));
                let mut dv = Array2::<f32>::uninit((r, w));
                on_threads(threads, || {
                    let (q, v_block) = gu.view_mut().split_at(ndarray::Axis(1), r);
                    gemm_side_by_side(vec![
                        Product::write(2.0, gv_span, v.t(), v_block),
                        Product::write(0.5, gq, v.t(), q),
                        Product::write(2.0, u.t(), gv_span, dv.view_mut()),
                    ]);
                });
                // SAFETY: the products wrote every element of both.
                let (gu, dv) = unsafe { (gu.assume_init(), dv.assume_init()) };
                let blocks = [
                    gu.slice(ndarray::s![.., ..r]).to_owned(),
                    gu.slice(ndarray::s![.., r..]).to_owned(),
                    dv,
                ];
                assert_eq!(blocks, alone, "{rows} rows on {threads} threads");
            }
        }
    }

    #[test]
    fn products_past_the_dynamic_split_threshold_give_the_same_bits_on_any_thread_count() {
        // 512 × 256 × 512 = 2²⁶ multiply-adds: the dynamic split where the kernel has it.
        let a = Array2::from_shape_fn((512, 256), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.1 - 0.6);
        let b = Array2::from_shape_fn((512, 256), |(i, j)| ((i * 5 + j) % 11) as f32 * 0.1 - 0.5);
        let run = |threads: usize| {
            on_threads(threads, || {
                // A row split (m ≥ n) with a column-major B, a column split with a row-major one.
                let mut rows = Array2::zeros((512, 512));
                gemm(1.0, a.view(), b.t(), 0.0, rows.view_mut());
                let wide =
                    Array2::from_shape_fn((256, 2048), |(i, j)| ((i + 3 * j) % 7) as f32 - 3.0);
                let mut columns = Array2::zeros((512, 2048));
                gemm(1.0, a.view(), wide.view(), 0.0, columns.view_mut());
                (rows, columns)
            })
        };
        let (one, three) = (run(1), run(3));
        assert_eq!(one, three);
        let want = naive(&a.mapv(f64::from), &b.t().mapv(f64::from));
        for (got, want) in one.0.iter().zip(&want) {
            assert!((f64::from(*got) - want).abs() < 1e-3, "{got} vs {want}");
        }
    }
}
