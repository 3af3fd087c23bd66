//! An f32 GEMM for CPUs with AVX-512: BLIS-style blocking around a 12×32 FMA micro-kernel.
//!
//! matrixmultiply (the portable kernel used everywhere else) has a 16×16 AVX-512 micro-kernel:
//! each step over k loads one vector of B and broadcasts sixteen values of A for sixteen FMAs,
//! so loads and FMAs compete for the same cycles. Here each step loads two vectors of B
//! (32 columns) and broadcasts twelve values of A for 24 FMAs into 24 accumulator registers,
//! which leaves the FMA units as the only bottleneck.
//!
//! The loops, outermost first (BLIS's names):
//!
//! ```text
//! jc: NC columns of B/C          pack B[pc.., jc..] into 32-column panels (kc × 32 each)
//!   pc: KC steps of k
//!     ic: MC rows of A/C         pack A[ic.., pc..] into 12-row panels (kc × 12 each);
//!                                a row-major A of a small product: only a partial last
//!                                panel is packed
//!       jr: 32-column panel      one B panel (48 KiB at kc = 384) for all the block's A panels
//!         ir: 12-row panel       micro-kernel: C[12×32] ← α·Apanel·Bpanel + β·C, A streamed
//!                                from L2 (prefetched 16 steps ahead); each tile also asks a
//!                                slice of the next B panel into L2
//! ```
//! That is MKL's order (its sgemm, read off `perf` and a debugger: 384-row blocks of A, one
//! B panel against all of them, the next panel prefetched into L2). BLIS's order, the jr and
//! ir loops swapped (one A panel in L1, every B panel streaming past it, prefetched into L1),
//! is kept where A is read in place, whose rows are no panel to stream. In a standalone copy
//! on prepacked operands MKL's order ran at 0.96 of the FMA probe against 0.90 for BLIS's;
//! in this library, GPT-2's linear products got 1.02–1.03× quicker on one thread and
//! 1.05× on two (alternated call by call).
//! A full 12-row tile's k loop is a few lines of assembly (`steps_12x32`: FMAs with
//! broadcast memory operands, fewer instructions per step than the compiler makes of the
//! intrinsics); over a packed A panel (`steps_12x32_packed`) four steps per turn, and the C
//! tile's lines are asked for (`prefetchw`) in the loop's last turns rather than at its start.
//! Edge tiles and the in-place row kernel stay in intrinsics.
//! A row-major A (activations, incoming gradients: the A of every forward product and every
//! ∂x = G·Wᵀ) is read in place by `kernel_rows` in small products, as BLIS's "sup" kernels
//! do, and packed through 16×16 in-register transposes in large ones (from 2^26
//! multiply-adds and 256 columns), where the kernel reading one stream instead of 12 rows
//! pays for the packing. A column-major B (Wᵀ in ∂x = G·Wᵀ) is packed through 16×16
//! in-register transposes. Panels are zero-padded at the edges; an edge tile is computed
//! whole and only its valid part is written to C (masked vector stores along C's rows; through
//! a local buffer for a C with strided rows). β is applied on the
//! first k block only (later blocks accumulate), and when β = 0 C is never read, so C may be
//! uninitialised memory.
//!
//! [`sgemm_thin`] is the second kernel, for products at most 16 columns wide (LoRA's rank
//! side, where the 12×32 tile would leave most lanes idle): B packed into 16-float lines, a
//! row-major or column-major A read in place, other layouts packed 12 rows at a time.
//! [`sgemm_low_rank`] is the 12×32 driver with LoRA's low-rank terms added inside the tiles.
//! [`PackedB`] packs a right operand once for many small products that read parts of it
//! (attention's per-head blocks).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of the micro-tile.
const MR: usize = 12;
/// Columns of the micro-tile (two 16-lane vectors).
const NR: usize = 32;
/// Most steps of k per packed block (see [`k_block`]). Measured on this machine's 48 KiB L1:
/// 384 (a 48 KiB B panel, partly streamed from L2) beats 256 by 2–5 % on GPT-2's k = 768
/// products, because C is loaded and stored once per block; 192 is slower, 512 no better.
const KC: usize = 384;
/// Most steps of k per block for products of at least [`KC_TALL_MIN_ROWS`] rows. In MKL's
/// loop order (one B panel against all of a block's A panels) a k = 768 product in one
/// block of 768 instead of two of 384 loads and stores its C once: GPT-2's lm_head forward
/// 1.16×, c_fc 1.07×, c_attn 1.04× and its ∂x 1.03× on two threads, c_fc and c_attn on one
/// 1.03–1.08× (medians of 4–20 alternated calls), the 768-wide products level. With 128
/// rows (nanogpt-cpu's ∂W on one tape) it was 0.94–0.98×: there C stays in L2 anyway.
const KC_TALL: usize = 768;
const KC_TALL_MIN_ROWS: usize = 256;
/// Rows of A per packed block (a multiple of MR; 336 × 384 × 4 B = 504 KiB stays in L2): 28
/// tiles per B panel, enough for them to bring the next panel into L2 (MKL uses 384; 240
/// and 264 measured level with 336).
const MC: usize = 336;
/// Columns of B per packed block (a multiple of NR; 384 × 1024 × 4 B = 1.5 MiB; 4096 measured
/// level).
const NC: usize = 1024;

/// Whether this kernel can run here (AVX-512F present, and not switched off with
/// `TAPELORA_GEMM=matrixmultiply`, for A/B timing against matrixmultiply with
/// `benchmarks/ab.sh`; the tests check this kernel against a naive product instead).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let wanted = std::env::var("TAPELORA_GEMM").as_deref() != Ok("matrixmultiply");
        #[cfg(target_arch = "x86_64")]
        return wanted && std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = wanted;
            false
        }
    })
}

/// The calling thread's floating-point rate, in FLOP/s, on independent 16-lane FMA chains
/// that never touch memory, run for about `seconds`: the ceiling a GEMM kernel could reach on
/// this core right now (what MFU is measured against); eight-lane chains on a CPU with AVX2
/// and FMA but not AVX-512. `None` without either.
pub fn fma_peak_flops(seconds: f64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // 24 accumulators: more than the FMA latency (4 cycles) × ports (2) in flight, as many
        // as the micro-kernel keeps.
        #[target_feature(enable = "avx512f")]
        unsafe fn chains(iterations: usize) -> f32 {
            let mut acc = [_mm512_setzero_ps(); 24];
            let x = _mm512_set1_ps(std::hint::black_box(0.999_999));
            let y = _mm512_set1_ps(std::hint::black_box(1e-6));
            for _ in 0..iterations {
                for acc in acc.iter_mut() {
                    *acc = _mm512_fmadd_ps(x, *acc, y);
                }
            }
            let sum = acc
                .iter()
                .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
            _mm512_reduce_add_ps(sum)
        }
        // SAFETY: AVX-512F was detected above.
        return Some(rate_of(seconds, (24 * 16 * 2) as f64, |n| unsafe {
            chains(n)
        }));
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // The same chains eight lanes wide, for the AVX2 machines where matrixmultiply's
        // kernel does the products: 12 accumulators, again more than latency × ports.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn chains(iterations: usize) -> f32 {
            let mut acc = [_mm256_setzero_ps(); 12];
            let x = _mm256_set1_ps(std::hint::black_box(0.999_999));
            let y = _mm256_set1_ps(std::hint::black_box(1e-6));
            for _ in 0..iterations {
                for acc in acc.iter_mut() {
                    *acc = _mm256_fmadd_ps(x, *acc, y);
                }
            }
            let sum = acc
                .iter()
                .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            lanes.iter().sum()
        }
        // SAFETY: AVX2 and FMA were detected above.
        return Some(rate_of(seconds, (12 * 8 * 2) as f64, |n| unsafe {
            chains(n)
        }));
    }
    let _ = seconds;
    None
}

/// The best FLOP/s of `chains(iterations)` over about `seconds`, doubling the iterations until
/// one call takes a millisecond (shorter calls measure the timer).
fn rate_of(seconds: f64, flops_per_iteration: f64, chains: impl Fn(usize) -> f32) -> f64 {
    let start = std::time::Instant::now();
    let mut iterations = 1 << 12;
    let mut best = 0.0f64;
    while start.elapsed().as_secs_f64() < seconds {
        let t = std::time::Instant::now();
        std::hint::black_box(chains(iterations));
        let secs = t.elapsed().as_secs_f64();
        best = best.max(iterations as f64 * flops_per_iteration / secs);
        if secs < 1e-3 {
            iterations *= 2;
        }
    }
    best
}

/// A 64-byte aligned line of 16 floats: the packing buffers are made of these so that the
/// micro-kernel's vector loads are aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(crate) struct Line([f32; 16]);

thread_local! {
    /// Per-thread packing buffers, reused across calls (A block, B block).
    static BUFFERS: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// At least `floats` floats of `buffer`, 64-byte aligned (also `sgemm_avx2`'s buffers).
pub(crate) fn lines(buffer: &mut Vec<Line>, floats: usize) -> *mut f32 {
    let needed = floats.div_ceil(16);
    if buffer.len() < needed {
        buffer.resize(needed, Line([0.0; 16]));
    }
    buffer.as_mut_ptr().cast::<f32>()
}

/// `c ← α·a·b + β·c` with element strides, like matrixmultiply's `sgemm`; with β = 0, `c` is
/// not read.
///
/// # Safety
/// [`available`] returned true; the pointers and strides describe valid `m×k`, `k×n` and
/// `m×n` matrices, and `c` aliases neither `a` nor `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    let product = Product::new(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
    #[cfg(target_arch = "x86_64")]
    product.run(0..m, 0..n, None, None);
}

/// Largest operand (in floats) packed once and shared by all threads of a parallel product
/// (64 MiB): every chunk reads it whole, so a larger one would stream from memory once per
/// chunk.
const SHARED_PACK_MAX_FLOATS: usize = 16 << 20;

/// Products from this many multiply-adds, at least [`PACK_A_MIN_COLS`] wide, pack a
/// row-major A too instead of reading it in place: the micro-kernel then reads A's 12 rows as
/// one sequential stream (reloaded from L2 for every B panel) instead of 12. Measured on
/// GPT-2's products, alternated call by call: 1.09–1.19× on two threads, 1.01–1.08× on one;
/// on small or narrow products (nanogpt-cpu's, attention's) packing did not pay.
const PACK_A_MIN_MACS: usize = 1 << 26;
const PACK_A_MIN_COLS: usize = 256;
/// Deepest product whose column-major A is read in place: one panel's k steps then touch at
/// most 256 cache lines (16 KiB) of A. Attention's per-head ∂V = Pᵀ·G and ∂K = ∂Sᵀ·Q
/// (k = T = 64) gain 1.48–1.53× over packing A (medians of 20 000 alternated calls); the
/// linears' ∂W = xᵀ·G (k = 768) were 0.94–1.15× from run to run, so they keep packing.
const COLUMNS_IN_PLACE_MAX_K: usize = 256;

/// Fewest rows / columns of C a thread takes at a time in a parallel product (four panels):
/// each chunk reads the whole shared operand once, so chunks may not get too small.
const CHUNK_MIN_ROWS: usize = 4 * MR;
const CHUNK_MIN_COLS: usize = 4 * NR;

/// [`sgemm`] on all threads of rayon's pool, with the same result to the bit (every element
/// of C is still one micro-kernel's sum over the same k blocks in the same order). Returns
/// `false`, doing nothing, when the operand to pack would be larger than
/// [`SHARED_PACK_MAX_FLOATS`] (lm_head's ∂x = G·wte: 50257 × 768); the caller splits the
/// product itself then.
///
/// The threads take rows (when `m ≥ n`) or columns of C from a shared counter in shrinking
/// chunks — half of each thread's share of what is left, down to [`CHUNK_MIN_ROWS`] or
/// [`CHUNK_MIN_COLS`] — so a thread slowed down by another process hands its work to the
/// other instead of making it wait (a fixed half each left the threads idle 7–12 % of
/// GPT-2's GEMM time). The operand every chunk reads whole is packed once, by all threads,
/// into one buffer: B for a row split, A for a column split (unless A is read in place).
///
/// # Safety
/// As for [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_parallel(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) -> bool {
    let product = Product::new(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc);
    #[cfg(target_arch = "x86_64")]
    return product.run_parallel();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = product;
        false
    }
}

/// `C ← A·B + bias` on the calling thread, the bias added as the first k block's tiles are
/// stored (see [`sgemm_parallel_bias`]); the parts of a product split in fixed halves.
/// `k` must be at least 1.
///
/// # Safety
/// As for [`sgemm`], and `bias` must point at `n` floats.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_bias(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    bias: *const f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    assert!(k > 0, "sgemm_bias: k = 0 stores no tile");
    let mut product = Product::new(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc);
    product.bias = bias;
    #[cfg(target_arch = "x86_64")]
    product.run(0..m, 0..n, None, None);
}

/// [`sgemm_parallel`] of `C ← A·B + bias` (α = 1, β = 0, `bias` added to every row of C as
/// the first k block's tiles are stored): a linear layer's forward without a pass writing the
/// bias rows into C first and the kernel reading them back. Same bits as that two-pass form
/// (`1·C + acc` and `acc + bias` round alike). Returns `false`, doing nothing, where
/// [`sgemm_parallel`] would, or when `k = 0` (no tile would be stored).
///
/// # Safety
/// As for [`sgemm`], and `bias` must point at `n` floats.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_parallel_bias(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    bias: *const f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) -> bool {
    if k == 0 {
        return false;
    }
    let mut product = Product::new(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 0.0, c, rsc, csc);
    product.bias = bias;
    #[cfg(target_arch = "x86_64")]
    return product.run_parallel();
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = product;
        false
    }
}

/// `C ← A·B + bias + Σ scale·u[:, from .. from + rank]·v (+ residual)`, each low-rank part
/// landing in its own block of C's columns: a LoRA linear's forward (c_attn with adapters on q
/// and v). Each part's columns take `rank` more steps of k in the last k block of their tiles,
/// from `u` read in place and `scale·v` packed into 32-column panels, so the terms are summed
/// in the accumulator registers: C is written once, and no pass over it adds them afterwards.
/// The epilogue runs as the last k block's tiles are stored, after everything else: a
/// residual (`m × n`, contiguous rows) added, or GELU applied with its derivative written to
/// a second row-major `m × n` output — the bits of that pass over the finished output,
/// without the pass.
///
/// Runs in `threads` fixed parts (rows when m ≥ n, else columns on whole panels), or, with
/// `dynamic`, as [`sgemm_parallel`] does when its shared operand fits. Returns `false`, doing
/// nothing, where the fused kernel does not apply: some part does not start and end on a
/// multiple of 32 columns (a tile would straddle its edge), parts overlap, `u`'s or the
/// residual's rows are not contiguous, or k = 0. The caller then adds the parts one product at a time.
///
/// # Safety
/// [`available`] returned true; `c` is an `m × n` output with the given strides that aliases
/// none of the inputs (it is written, never read, so it may be uninitialised).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_low_rank(
    a: ndarray::ArrayView2<f32>,
    b: ndarray::ArrayView2<f32>,
    bias: Option<&[f32]>,
    u: crate::gemm::LowRankU<f32>,
    parts: &[crate::gemm::LowRankPart<f32>],
    epilogue: crate::gemm::Epilogue<f32>,
    c: *mut f32,
    (rsc, csc): (isize, isize),
    threads: usize,
    dynamic: bool,
) -> bool {
    let Some((spec, make_u)) = low_rank_setup(a, b, bias, u, parts, epilogue, threads, dynamic)
    else {
        return false;
    };
    let ((m, k), n) = (a.dim(), b.ncols());
    let (sa, sb) = (a.strides(), b.strides());
    let mut product = Product::new(
        m,
        k,
        n,
        1.0,
        a.as_ptr(),
        sa[0],
        sa[1],
        b.as_ptr(),
        sb[0],
        sb[1],
        0.0,
        c,
        rsc,
        csc,
    );
    product.bias = bias.map_or(std::ptr::null(), |bias| bias.as_ptr());
    #[cfg(target_arch = "x86_64")]
    {
        if dynamic {
            let (_panels, tail) = spec.pack(NR);
            let mut shared = product;
            shared.tail = &tail;
            if shared.run_parallel() {
                return true;
            }
        }
        // Each part of a fixed split packs the low-rank panels for itself, after the split:
        // packed once on the calling thread (cold reads of B included) they kept the pool's
        // other thread idle for 3 µs, often long enough for it to fall asleep (rayon's idle
        // threads sleep after ≈ 5–8 µs, and take 10–30 µs to wake).
        let run_part = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
            let (_panels, tail) = spec.pack(NR);
            let mut product = product;
            product.tail = &tail;
            if let Some(maker) = &make_u {
                maker.rows(rows.clone());
            }
            product.run(rows, cols, None, None);
        };
        for_each_fixed_part(m, n, threads, NR, run_part);
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (product, spec, threads, dynamic, make_u);
        false
    }
}

/// What [`sgemm_low_rank`] and [`crate::sgemm_avx2::sgemm_low_rank`] check and build before
/// their products: the low-rank parts and the epilogue as each part of the product packs them,
/// and what makes a computed u. `None` where the fused kernels do not apply (see
/// [`sgemm_low_rank`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn low_rank_setup<'a, 'v>(
    a: ndarray::ArrayView2<f32>,
    b: ndarray::ArrayView2<f32>,
    bias: Option<&[f32]>,
    u: crate::gemm::LowRankU<f32>,
    parts: &'a [crate::gemm::LowRankPart<'v, f32>],
    epilogue: crate::gemm::Epilogue<f32>,
    threads: usize,
    dynamic: bool,
) -> Option<(TailSpec<'a, 'v>, Option<MakeU>)> {
    use crate::gemm::{Epilogue, LowRankU};
    let ((m, k), n) = (a.dim(), b.ncols());
    // u's first element, row stride and width; and what makes it, when the product does.
    let (u_ptr, rsu, u_cols, make_u) = match u {
        LowRankU::Given(u) => {
            assert_eq!(u.nrows(), m, "sgemm_low_rank: internal shape bug");
            if u.strides()[1] != 1 && u.ncols() > 1 {
                return None;
            }
            (u.as_ptr(), u.strides()[0], u.ncols(), None)
        }
        LowRankU::Computed { ats, out } => {
            let r: usize = ats.iter().map(|at| at.ncols()).sum();
            let row_parts = threads <= 1 || m >= n;
            let fits = ats.iter().all(|at| at.nrows() == k) && r <= THIN_MAX;
            if !fits || dynamic || !row_parts {
                return None;
            }
            let maker = MakeU {
                a: a.as_ptr(),
                rsa: a.strides()[0],
                csa: a.strides()[1],
                ats: ats
                    .iter()
                    .map(|at| (at.as_ptr(), at.strides()[0], at.strides()[1], at.ncols()))
                    .collect(),
                out,
                k,
                r,
            };
            (out.cast_const(), r as isize, r, Some(maker))
        }
    };
    let residual = match epilogue {
        Epilogue::Residual(r) => Some(r),
        _ => None,
    };
    assert!(
        b.nrows() == k
            && bias.is_none_or(|bias| bias.len() == n)
            && residual.is_none_or(|r| r.dim() == (m, n)),
        "sgemm_low_rank: internal shape bug"
    );
    if residual.is_some_and(|r| r.strides()[1] != 1 && n > 1) {
        return None;
    }
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(parts.len());
    for part in parts {
        let (rank, width) = part.v.dim();
        let fits = part.start.is_multiple_of(NR)
            && width.is_multiple_of(NR)
            && part.start + width <= n
            && part.u_from + rank <= u_cols;
        if !fits {
            return None;
        }
        spans.push((part.start, part.start + width));
    }
    spans.sort_unstable();
    let overlap = spans.windows(2).any(|w| w[0].1 > w[1].0);
    if overlap || k == 0 || m == 0 {
        return None;
    }
    let spec = TailSpec {
        u: u_ptr,
        rsu,
        parts,
        finish: TileFinish {
            residual: residual.map_or(std::ptr::null(), |r| r.as_ptr()),
            rsr: residual.map_or(0, |r| r.strides()[0]),
            gelu: matches!(epilogue, Epilogue::Gelu(_)),
            derivative: match epilogue {
                Epilogue::Gelu(Some(d)) => d,
                _ => std::ptr::null_mut(),
            },
            rsd: n as isize,
        },
    };
    Some((spec, make_u))
}

/// Runs `run_part(rows, cols)` on each part of a low-rank product's fixed split: all of it on
/// one thread, else `threads` parts of rows when `m ≥ n`, or of columns in whole `panel`s (so
/// that every tile is in or out of each low-rank part).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn for_each_fixed_part(
    m: usize,
    n: usize,
    threads: usize,
    panel: usize,
    run_part: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>) + Sync,
) {
    use rayon::prelude::*;
    if threads <= 1 {
        run_part(0..m, 0..n);
    } else if m >= n {
        let rows = m.div_ceil(threads);
        (0..m.div_ceil(rows)).into_par_iter().for_each(|i| {
            run_part(i * rows..((i + 1) * rows).min(m), 0..n);
        });
    } else {
        let cols = n.div_ceil(threads).next_multiple_of(panel);
        (0..n.div_ceil(cols)).into_par_iter().for_each(|i| {
            run_part(0..m, i * cols..((i + 1) * cols).min(n));
        });
    }
}

/// What each part of a [`sgemm_low_rank`] product needs to build its [`Tail`]: the parts
/// to pack and the epilogue.
pub(crate) struct TailSpec<'a, 'v> {
    u: *const f32,
    rsu: isize,
    parts: &'a [crate::gemm::LowRankPart<'v, f32>],
    finish: TileFinish,
}

// SAFETY: the parts of a product only read through these pointers (u is written by MakeU in
// the same part's rows before they are read).
unsafe impl Sync for TailSpec<'_, '_> {}

impl TailSpec<'_, '_> {
    /// Each part's scale·v as panels of `panel` columns (the kernel's: 32 here, 16 for
    /// [`crate::sgemm_avx2`]) × rank steps, as the kernels read B, and the tail that reads
    /// them (valid while the returned buffer lives).
    pub(crate) unsafe fn pack(&self, panel: usize) -> (Vec<Line>, Tail) {
        let nr = panel;
        let floats: usize = self.parts.iter().map(|p| p.v.len()).sum();
        let mut packed = vec![Line([0.0; 16]); floats.div_ceil(16)];
        let mut tail = Tail {
            u: self.u,
            rsu: self.rsu,
            parts: Vec::with_capacity(self.parts.len()),
            finish: self.finish,
            panel: nr,
        };
        let mut offset = 0;
        for part in self.parts {
            let (rank, width) = part.v.dim();
            let panels = packed.as_mut_ptr().cast::<f32>().add(offset);
            let (v, sv) = (part.v.as_ptr(), part.v.strides());
            // Row-major v and column-major v (LoRA's Bᵀ as a view of B) each read in their
            // contiguous order: the general strided loop took 2–3 µs for c_attn's two parts.
            if sv[1] == 1 {
                for q in 0..width / nr {
                    for p in 0..rank {
                        let src = v.offset(p as isize * sv[0] + (q * nr) as isize);
                        let dst = panels.add((q * rank + p) * nr);
                        for j in 0..nr {
                            *dst.add(j) = part.scale * *src.add(j);
                        }
                    }
                }
            } else if sv[0] == 1 {
                for q in 0..width / nr {
                    for j in 0..nr {
                        let src = v.offset((q * nr + j) as isize * sv[1]);
                        let dst = panels.add(q * rank * nr + j);
                        for p in 0..rank {
                            *dst.add(p * nr) = part.scale * *src.add(p);
                        }
                    }
                }
            } else {
                for q in 0..width / nr {
                    for p in 0..rank {
                        for j in 0..nr {
                            let value =
                                *v.offset(p as isize * sv[0] + (q * nr + j) as isize * sv[1]);
                            *panels.add((q * rank + p) * nr + j) = part.scale * value;
                        }
                    }
                }
            }
            tail.parts.push(TailPart {
                start: part.start,
                end: part.start + width,
                u_from: part.u_from,
                rank,
                panels,
            });
            offset += rank * width;
        }
        (packed, tail)
    }
}

/// `u[rows] = a[rows]·[at₁ at₂ …]` for a [`crate::gemm::LowRankU::Computed`] u, through the thin kernel:
/// each row of u depends on that row of `a` only, so parts of rows give the bits of one
/// product over all of them.
pub(crate) struct MakeU {
    a: *const f32,
    rsa: isize,
    csa: isize,
    /// Each block of u's columns: Aᵢᵀ (k × rᵢ) as (pointer, row stride, column stride, rᵢ).
    ats: Vec<(*const f32, isize, isize, usize)>,
    out: *mut f32,
    k: usize,
    r: usize,
}

// SAFETY: threads write u's disjoint rows and only read a and the ats.
unsafe impl Sync for MakeU {}

impl MakeU {
    pub(crate) unsafe fn rows(&self, rows: std::ops::Range<usize>) {
        // Several blocks are gathered into one k × r matrix first (each thread its own copy,
        // 2048 floats for c_attn's q and v): the thin kernel's lanes are u's columns, so two
        // products of 8 columns took twice as long as one of 16. Each lane sums its own
        // column, so the bits are those of the blocks' products either way.
        let gathered;
        let (at, rst, cst) = match self.ats.as_slice() {
            &[(at, rst, cst, _)] => (at, rst, cst),
            blocks => {
                let mut at = vec![0.0f32; self.k * self.r];
                let mut from = 0;
                for &(block, rsb, csb, width) in blocks {
                    for j in 0..width {
                        for p in 0..self.k {
                            at[p * self.r + from + j] =
                                *block.offset(p as isize * rsb + j as isize * csb);
                        }
                    }
                    from += width;
                }
                gathered = at;
                (gathered.as_ptr(), self.r as isize, 1)
            }
        };
        let (a, out) = (
            self.a.offset(rows.start as isize * self.rsa),
            self.out.add(rows.start * self.r),
        );
        let (m, k, r, rsa, csa) = (rows.len(), self.k, self.r, self.rsa, self.csa);
        // The thin kernel of the machine's (the same bits: each is one FMA chain per element).
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() {
            return crate::sgemm_avx2::sgemm_thin(
                m, k, r, 1.0, a, rsa, csa, at, rst, cst, 0.0, out, r as isize, 1,
            );
        }
        sgemm_thin(
            m, k, r, 1.0, a, rsa, csa, at, rst, cst, 0.0, out, r as isize, 1,
        );
    }
}

/// The low-rank terms of [`sgemm_low_rank`] as the kernels read them.
pub(crate) struct Tail {
    /// Row-major `u` (`m × Σ rank`), read in place.
    u: *const f32,
    rsu: isize,
    parts: Vec<TailPart>,
    /// The epilogue of the tile at C[0, 0] (a residual added, GELU applied).
    finish: TileFinish,
    /// Columns per packed panel (the kernel's tile width).
    panel: usize,
}

/// One part: C's columns `start .. end` get `u[:, u_from .. u_from + rank]` times the packed
/// `scale·v` (32-column panels of `rank` steps).
struct TailPart {
    start: usize,
    end: usize,
    u_from: usize,
    rank: usize,
    panels: *const f32,
}

impl Tail {
    /// The extra steps of the tile whose first element is C[row, col] (`col` a whole number of
    /// panels from its part's start: parts and the drivers' column blocks are panel-aligned),
    /// and the tile with its block of the epilogue.
    unsafe fn at(&self, row: usize, col: usize, mut tile: Tile) -> (TailSteps, Tile) {
        tile.finish = self.finish.offset(row, col);
        (self.steps_at(row, col), tile)
    }

    /// The extra steps of the tile whose first element is C[row, col] (`col` a whole number
    /// of panels from its part's start).
    pub(crate) unsafe fn steps_at(&self, row: usize, col: usize) -> TailSteps {
        match self.parts.iter().find(|p| (p.start..p.end).contains(&col)) {
            Some(part) => TailSteps {
                steps: part.rank,
                a: self
                    .u
                    .offset(row as isize * self.rsu + part.u_from as isize),
                rsa: self.rsu,
                b: part
                    .panels
                    .add((col - part.start) / self.panel * part.rank * self.panel),
            },
            None => TailSteps::NONE,
        }
    }

    /// The epilogue of the tile whose first element is C[row, col].
    pub(crate) unsafe fn finish_at(&self, row: usize, col: usize) -> TileFinish {
        self.finish.offset(row, col)
    }
}

/// Steps of k a tile takes after its k block: `steps` values of each of its rows of A at `a`
/// (row `i`, step `p` at `a + i·rsa + p`) against a packed panel at `b`.
#[derive(Clone, Copy)]
pub(crate) struct TailSteps {
    pub(crate) steps: usize,
    pub(crate) a: *const f32,
    pub(crate) rsa: isize,
    pub(crate) b: *const f32,
}

impl TailSteps {
    pub(crate) const NONE: TailSteps = TailSteps {
        steps: 0,
        a: std::ptr::null(),
        rsa: 0,
        b: std::ptr::null(),
    };

    /// Adds the steps' products to a tile's accumulators (its first `ROWS` rows).
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn accumulate<const ROWS: usize>(
        self,
        left: &mut [__m512; MR],
        right: &mut [__m512; MR],
    ) {
        let mut b = self.b;
        for p in 0..self.steps {
            let b0 = _mm512_load_ps(b);
            let b1 = _mm512_load_ps(b.add(16));
            for i in 0..ROWS {
                let ai = _mm512_set1_ps(*self.a.offset(i as isize * self.rsa + p as isize));
                left[i] = _mm512_fmadd_ps(ai, b0, left[i]);
                right[i] = _mm512_fmadd_ps(ai, b1, right[i]);
            }
            b = b.add(NR);
        }
    }
}

/// One product's operands and output, as the drivers pass them around.
#[derive(Clone, Copy)]
struct Product {
    m: usize,
    k: usize,
    n: usize,
    /// Steps of k per packed block ([`k_block`] of `k`).
    kc_max: usize,
    /// Rows per packed block of A: at most [`MC`], the blocks of equal size (in whole panels),
    /// so that 1024 rows are four blocks of 264 rather than three of 336 and a last one of 16
    /// (whose two tiles per B panel could not bring the next panel into L2).
    mc_max: usize,
    /// A row-major A read by the micro-kernel in place (see [`Product::run`]).
    a_in_place: bool,
    /// A column-major A (a transposed view) read in place: each step of k is 12 consecutive
    /// values of one of its columns, which is what a packed panel holds.
    a_columns_in_place: bool,
    /// A row vector (n values) added to every row of C, or null.
    bias: *const f32,
    /// Low-rank terms accumulated into the last k block's tiles ([`sgemm_low_rank`]), or null.
    tail: *const Tail,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
}

impl Product {
    /// The arguments of [`sgemm`], with k's block size.
    #[allow(clippy::too_many_arguments)]
    fn new(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) -> Self {
        let kc_max = k_block(k, m);
        let mc_max = m
            .div_ceil(m.div_ceil(MC).max(1))
            .next_multiple_of(MR)
            .min(MC);
        let small = m * n * k < PACK_A_MIN_MACS || n < PACK_A_MIN_COLS;
        let a_in_place = csa == 1 && small;
        let a_columns_in_place = rsa == 1 && csa != 1 && small && k <= COLUMNS_IN_PLACE_MAX_K;
        Product {
            m,
            k,
            n,
            kc_max,
            mc_max,
            a_in_place,
            a_columns_in_place,
            bias: std::ptr::null(),
            tail: std::ptr::null(),
            alpha,
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            beta,
            c,
            rsc,
            csc,
        }
    }
}

// SAFETY: the threads of a parallel product read A and B and write disjoint parts of C.
unsafe impl Send for Product {}
unsafe impl Sync for Product {}

/// Where one (column block, k block) of B, or one (row block, k block) of A, starts in an
/// operand packed whole: blocks of `width` (at most NC columns or MC rows, padded to whole
/// panels) follow each other first along k, then along the other axis.
#[cfg(target_arch = "x86_64")]
fn shared_offset(start: usize, k: usize, pc: usize, width: usize, panel: usize) -> usize {
    start * k + pc * width.next_multiple_of(panel)
}

/// The buffer parallel products pack their shared operand into, kept between calls (a
/// product nested in another one's thread, which finds it taken, allocates its own).
static SHARED_PACK: std::sync::Mutex<Vec<Line>> = std::sync::Mutex::new(Vec::new());

#[cfg(target_arch = "x86_64")]
impl Product {
    /// `C[rows, cols]`, the serial loop nest of the module doc. `shared_a` / `shared_b`: that
    /// operand already packed whole (then `rows` / `cols` must be all of them); otherwise its
    /// blocks are packed here, in this thread's buffers.
    unsafe fn run(
        &self,
        rows: std::ops::Range<usize>,
        cols: std::ops::Range<usize>,
        shared_a: Option<*const f32>,
        shared_b: Option<*const f32>,
    ) {
        let Product {
            k,
            kc_max,
            mc_max,
            alpha,
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            beta,
            c,
            rsc,
            csc,
            bias,
            ..
        } = *self;
        BUFFERS.with(|buffers| {
            let (a_buf, b_buf) = &mut *buffers.borrow_mut();
            let a_pack = lines(a_buf, if shared_a.is_none() { MC * kc_max } else { 0 });
            let b_pack = lines(b_buf, if shared_b.is_none() { NC * kc_max } else { 0 });
            // A row-major A of a small product is read in place (BLIS's "sup" idea): the
            // micro-kernel broadcasts its values straight from the rows, and only a partial
            // last panel is packed; packing costs more there than the kernel gains.
            let a_in_place = self.a_in_place && shared_a.is_none();
            let a_columns_in_place = self.a_columns_in_place && shared_a.is_none();
            for jc in cols.clone().step_by(NC) {
                let nc = NC.min(cols.end - jc);
                for pc in (0..k).step_by(kc_max) {
                    let kc = kc_max.min(k - pc);
                    let beta_block = if pc == 0 { beta } else { 1.0 };
                    let b_block = b.offset(pc as isize * rsb + jc as isize * csb);
                    // Packed A with B packed here: each B panel is packed just before the
                    // first A block uses it (as MKL does), so it is still in L1/L2 for that
                    // block's tiles (GPT-2's linears 1.02× on one and two threads, alternated
                    // call by call); BLIS's order needs the whole block packed first.
                    let lazy_b = shared_b.is_none() && !a_in_place && !a_columns_in_place;
                    let b_panels = match shared_b {
                        Some(packed) => packed.add(shared_offset(jc, k, pc, nc, NR)),
                        None => {
                            if !lazy_b {
                                pack_b(kc, nc, b_block, rsb, csb, b_pack);
                            }
                            b_pack
                        }
                    };
                    for ic in rows.clone().step_by(mc_max) {
                        let mc = mc_max.min(rows.end - ic);
                        let a_block = a.offset(ic as isize * rsa + pc as isize * csa);
                        let full_rows = if a_in_place { mc - mc % MR } else { 0 };
                        let a_panels = match shared_a {
                            Some(packed) => packed.add(shared_offset(ic, k, pc, mc, MR)),
                            None if a_columns_in_place => a_block,
                            None => {
                                pack_a(
                                    mc - full_rows,
                                    kc,
                                    a_block.offset(full_rows as isize * rsa),
                                    rsa,
                                    csa,
                                    a_pack,
                                );
                                a_pack
                            }
                        };
                        let tile_at = |ir: usize, jr: usize, l2_next: *const f32| {
                            let tile = Tile {
                                c: c.offset((ic + ir) as isize * rsc + (jc + jr) as isize * csc),
                                rsc,
                                csc,
                                rows: MR.min(mc - ir),
                                cols: NR.min(nc - jr),
                                alpha,
                                beta: beta_block,
                                bias: if pc == 0 && !bias.is_null() {
                                    bias.add(jc + jr)
                                } else {
                                    std::ptr::null()
                                },
                                finish: TileFinish::NONE,
                            };
                            let b_panel = b_panels.add(jr * kc);
                            let (tail, tile) = if self.tail.is_null() || pc + kc < k {
                                (TailSteps::NONE, tile)
                            } else {
                                (*self.tail).at(ic + ir, jc + jr, tile)
                            };
                            if ir < full_rows {
                                kernel_rows(
                                    kc,
                                    a_block.offset(ir as isize * rsa),
                                    rsa,
                                    b_panel,
                                    tail,
                                    tile,
                                );
                            } else {
                                // A packed panel: 12 values per step of k; a column-major A
                                // read in place: its column stride.
                                let (a_panel, a_step) = if a_columns_in_place {
                                    (a_block.add(ir), csa)
                                } else {
                                    (a_panels.add((ir - full_rows) * kc), MR as isize)
                                };
                                // Exactly the tile's rows: an edge panel (T = 64 is five
                                // panels and 4 rows) does no FMAs on padding (attention's
                                // per-head products 1.07–1.11×, medians of 20 000 alternated
                                // calls), and a column-major A read in place has no padding
                                // rows to read.
                                kernel_for_rows(tile.rows)(
                                    kc, a_panel, a_step, b_panel, tail, tile, l2_next,
                                );
                            }
                        };
                        if a_in_place || a_columns_in_place {
                            // A read in place: one A panel stays in L1 while every B panel
                            // of the block streams past it from L2 (BLIS's order).
                            for ir in (0..mc).step_by(MR) {
                                for jr in (0..nc).step_by(NR) {
                                    tile_at(ir, jr, std::ptr::null());
                                }
                            }
                        } else {
                            // Packed A (MKL's order): one B panel (32 × kc) is used by every
                            // A panel of the block in turn, the A panels streaming from L2
                            // (prefetched by the kernel), and each tile asks for its slice
                            // of the next B panel into L2, so that panel is there when its
                            // turn comes. See [`L2_SLICE_FLOATS_PER_STEP`].
                            for jr in (0..nc).step_by(NR) {
                                if lazy_b && ic == rows.start {
                                    pack_b(
                                        kc,
                                        NR.min(nc - jr),
                                        b_block.offset(jr as isize * csb),
                                        rsb,
                                        csb,
                                        b_pack.add(jr * kc),
                                    );
                                }
                                let (this, next) =
                                    (b_panels.add(jr * kc), b_panels.add((jr + NR) * kc));
                                for (t, ir) in (0..mc).step_by(MR).enumerate() {
                                    let slice = t * L2_SLICE_FLOATS_PER_STEP * kc;
                                    let l2_next = if jr + NR < nc && slice < NR * kc {
                                        next.add(slice)
                                    } else {
                                        this
                                    };
                                    tile_at(ir, jr, l2_next);
                                }
                            }
                        }
                    }
                }
            }
        });
    }

    /// This product on every thread of the pool: first the shared operand is packed (its
    /// panels handed out from one counter), then chunks of rows or columns are handed out from
    /// another. A thread that runs out of packing work waits for the panels others are still
    /// packing — only for those, since a panel is claimed by a thread that is running — so
    /// the product completes even if some of the pool's threads never join in. Returns
    /// `false`, doing nothing, when the operand to pack is over [`SHARED_PACK_MAX_FLOATS`] (a
    /// row-major A read in place by a column split is not packed, whatever its size).
    unsafe fn run_parallel(&self) -> bool {
        use rayon::prelude::*;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let Product {
            m, k, n, kc_max, ..
        } = *self;
        let split_rows = m >= n;
        // The operand read whole by every chunk, as (start, width) blocks × k blocks.
        let pack_a_whole = !split_rows && !self.a_in_place;
        let (shared_len, block, panel) = if split_rows {
            (n, NC, NR)
        } else {
            (m, self.mc_max, MR)
        };
        let pack_whole = split_rows || pack_a_whole;
        if pack_whole && k * shared_len.next_multiple_of(panel) > SHARED_PACK_MAX_FLOATS {
            return false;
        }
        let mut own = Vec::new();
        let mut kept = SHARED_PACK.try_lock().ok();
        let buffer = kept.as_deref_mut().unwrap_or(&mut own);
        let shared_ptr = if pack_whole {
            lines(buffer, k * shared_len.next_multiple_of(panel)) as usize
        } else {
            0
        };
        // Packing tasks: (start of the block, k block, first panel) in groups of 8 panels.
        let mut tasks = Vec::new();
        if pack_whole {
            for start in (0..shared_len).step_by(block) {
                let width = block.min(shared_len - start);
                for pc in (0..k).step_by(kc_max) {
                    for first in (0..width).step_by(8 * panel) {
                        tasks.push((start, pc, first));
                    }
                }
            }
        }
        let threads = rayon::current_num_threads();
        let (next_task, packed, next_chunk) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        let total = if split_rows { m } else { n };
        (0..threads).into_par_iter().for_each(|_| {
            let shared = shared_ptr as *mut f32;
            loop {
                let task = next_task.fetch_add(1, Ordering::Relaxed);
                let Some(&(start, pc, first)) = tasks.get(task) else {
                    break;
                };
                let width = block.min(shared_len - start);
                let kc = kc_max.min(k - pc);
                let count = (8 * panel).min(width - first);
                let dst = shared.add(shared_offset(start, k, pc, width, panel) + first * kc);
                if split_rows {
                    let src = self
                        .b
                        .offset(pc as isize * self.rsb + (start + first) as isize * self.csb);
                    pack_b(kc, count, src, self.rsb, self.csb, dst);
                } else {
                    let src = self
                        .a
                        .offset((start + first) as isize * self.rsa + pc as isize * self.csa);
                    pack_a(count, kc, src, self.rsa, self.csa, dst);
                }
                packed.fetch_add(1, Ordering::Release);
            }
            while packed.load(Ordering::Acquire) < tasks.len() {
                std::hint::spin_loop();
            }
            let shared = shared as *const f32;
            let (align, min_chunk) = if split_rows {
                (MR, CHUNK_MIN_ROWS)
            } else {
                (NR, CHUNK_MIN_COLS)
            };
            loop {
                let mut start = next_chunk.load(Ordering::Relaxed);
                let end = loop {
                    if start >= total {
                        return;
                    }
                    let chunk = ((total - start) / (2 * threads))
                        .next_multiple_of(align)
                        .max(min_chunk);
                    let end = (start + chunk).min(total);
                    match next_chunk.compare_exchange_weak(
                        start,
                        end,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    ) {
                        Ok(_) => break end,
                        Err(now) => start = now,
                    }
                };
                if split_rows {
                    self.run(start..end, 0..n, None, Some(shared));
                } else {
                    self.run(0..m, start..end, pack_a_whole.then_some(shared), None);
                }
            }
        });
        drop(kept);
        true
    }
}

thread_local! {
    /// Buffers of dropped [`PackedB`]s, reused by the next ones on this thread (attention packs
    /// four operands per head, thousands of heads per step).
    static PACKED_POOL: RefCell<Vec<Vec<Line>>> = const { RefCell::new(Vec::new()) };
    /// The packed partial row panel of [`PackedB::multiply`]'s row-major A.
    static EDGE_PANEL: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// A `k × n` right operand packed once, whole, into the micro-kernel's 32-column panels (each
/// holding all `k` of its steps), for many small products that each read a range of its steps
/// and its first columns: attention's per-head products, where every block of queries reads
/// the keys it sees and every block of keys the queries that see it. [`sgemm`] would pack the
/// part each product reads again for every product.
#[cfg(target_arch = "x86_64")]
pub struct PackedB {
    lines: Vec<Line>,
    k: usize,
    n: usize,
}

#[cfg(target_arch = "x86_64")]
impl PackedB {
    /// Packs the `k × n` matrix at `b` (any strides).
    ///
    /// # Safety
    /// [`available`] returned true; `b`, `rsb`, `csb` describe a valid `k × n` matrix.
    pub unsafe fn new(k: usize, n: usize, b: *const f32, rsb: isize, csb: isize) -> Self {
        let mut lines = PACKED_POOL
            .with(|pool| pool.borrow_mut().pop())
            .unwrap_or_default();
        let out = self::lines(&mut lines, k * n.next_multiple_of(NR));
        pack_b(k, n, b, rsb, csb, out);
        PackedB { lines, k, n }
    }

    /// `C[m × cols] ← α·A·B[steps, ..cols]`, where A is `m × steps.len()` and C is row-major
    /// (row stride `rsc`; written, never read, so it may be uninitialised). A row-major A
    /// (`csa == 1`) is read in place twelve rows at a time (a partial last panel is packed);
    /// a column-major A (`rsa == 1`, a transposed view) is read in place up to
    /// [`COLUMNS_IN_PLACE_MAX_K`] steps and packed panel by panel beyond. Every element
    /// is one sum over `steps` in order, as in [`sgemm`] with a single k block.
    ///
    /// # Safety
    /// [`available`] returned true; `a` is a valid `m × steps.len()` matrix with `rsa == 1`
    /// or `csa == 1`; `steps.end ≤ k`, `cols ≤ n`; `c` is a valid `m × cols` matrix that
    /// aliases neither operand.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn multiply(
        &self,
        m: usize,
        steps: std::ops::Range<usize>,
        cols: usize,
        alpha: f32,
        (a, rsa, csa): (*const f32, isize, isize),
        c: *mut f32,
        rsc: isize,
    ) {
        assert!(
            steps.end <= self.k && cols <= self.n && (rsa == 1 || csa == 1),
            "PackedB::multiply: internal shape bug"
        );
        let kc = steps.len();
        let column_major = rsa == 1 && csa != 1;
        let columns_in_place = column_major && kc <= COLUMNS_IN_PLACE_MAX_K;
        for ir in (0..m).step_by(MR) {
            let rows = MR.min(m - ir);
            let a_panel = a.offset(ir as isize * rsa);
            // A partial panel of a row-major A, or a deep column-major one, packed (12 values
            // per step of k).
            let packed_a = ((column_major && !columns_in_place) || (!column_major && rows < MR))
                .then(|| {
                    EDGE_PANEL.with(|buffer| {
                        let packed = self::lines(&mut buffer.borrow_mut(), MR * kc);
                        pack_a(rows, kc, a_panel, rsa, csa, packed);
                        packed as *const f32
                    })
                });
            for jr in (0..cols).step_by(NR) {
                let tile = Tile {
                    c: c.offset(ir as isize * rsc + jr as isize),
                    rsc,
                    csc: 1,
                    rows,
                    cols: NR.min(cols - jr),
                    alpha,
                    beta: 0.0,
                    bias: std::ptr::null(),
                    finish: TileFinish::NONE,
                };
                let b_panel = self
                    .lines
                    .as_ptr()
                    .cast::<f32>()
                    .add(jr * self.k + steps.start * NR);
                let (a_start, a_step) = match packed_a {
                    Some(packed) => (packed, MR as isize),
                    None if columns_in_place => (a_panel, csa),
                    None => {
                        kernel_rows(kc, a_panel, rsa, b_panel, TailSteps::NONE, tile);
                        continue;
                    }
                };
                kernel_for_rows(rows)(
                    kc,
                    a_start,
                    a_step,
                    b_panel,
                    TailSteps::NONE,
                    tile,
                    std::ptr::null(),
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for PackedB {
    fn drop(&mut self) {
        let lines = std::mem::take(&mut self.lines);
        PACKED_POOL.with(|pool| pool.borrow_mut().push(lines));
    }
}

/// Steps of k per block for a product of depth `k` and `m` rows: the fewest blocks of at most
/// [`KC`] ([`KC_TALL`] from [`KC_TALL_MIN_ROWS`] rows), equal in size (a multiple of 16, for
/// the transposing B packer), so that k = 512 is two blocks of 256 rather than 384 + 128.
fn k_block(k: usize, m: usize) -> usize {
    let most = if m >= KC_TALL_MIN_ROWS { KC_TALL } else { KC };
    let blocks = k.div_ceil(most).max(1);
    k.div_ceil(blocks).next_multiple_of(16).min(most)
}

/// Packs `mc × kc` of A into 12-row panels: panel `p` holds, for each step of k, its 12 row
/// values side by side (zero past the last row).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_a(mc: usize, kc: usize, a: *const f32, rsa: isize, csa: isize, out: *mut f32) {
    for (panel, ir) in (0..mc).step_by(MR).enumerate() {
        let rows = MR.min(mc - ir);
        let dst = out.add(panel * MR * kc);
        if rows < MR {
            std::ptr::write_bytes(dst, 0, MR * kc);
        }
        if rsa == 1 {
            // Column-major A (a transposed view, e.g. xᵀ in ∂W = xᵀ·G): a panel's rows are
            // side by side in memory, so each step of k is one short contiguous copy.
            for p in 0..kc {
                let src = a.offset(ir as isize + p as isize * csa);
                if rows == MR {
                    // A fixed-size copy compiles to a few vector moves, not a memmove call.
                    dst.add(p * MR)
                        .cast::<[f32; MR]>()
                        .write_unaligned(src.cast::<[f32; MR]>().read_unaligned());
                } else {
                    std::ptr::copy_nonoverlapping(src, dst.add(p * MR), rows);
                }
            }
            continue;
        }
        if csa == 1 && rows == MR {
            // Row-major A (x in x·W): 16 steps of the 12 rows at a time, transposed in
            // registers instead of scattering each value to a stride-12 slot.
            let src = a.offset(ir as isize * rsa);
            let whole = kc - kc % 16;
            transpose_rows(whole, src, rsa, dst);
            for i in 0..MR {
                for p in whole..kc {
                    *dst.add(p * MR + i) = *src.offset(i as isize * rsa + p as isize);
                }
            }
            continue;
        }
        for i in 0..rows {
            let src = a.offset((ir + i) as isize * rsa);
            for p in 0..kc {
                *dst.add(p * MR + i) = *src.offset(p as isize * csa);
            }
        }
    }
}

/// Packs `kc × nc` of B into 32-column panels: panel `q` holds, for each step of k, its 32
/// column values side by side (zero past the last column).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_b(kc: usize, nc: usize, b: *const f32, rsb: isize, csb: isize, out: *mut f32) {
    for (panel, jr) in (0..nc).step_by(NR).enumerate() {
        let cols = NR.min(nc - jr);
        let dst = out.add(panel * NR * kc);
        if cols == NR && csb == 1 {
            for p in 0..kc {
                let src = b.offset(p as isize * rsb + jr as isize);
                dst.add(p * NR)
                    .cast::<[f32; NR]>()
                    .write(src.cast::<[f32; NR]>().read_unaligned());
            }
            continue;
        }
        if cols == NR && rsb == 1 {
            // Column-major B (a transposed weight, as in ∂x = G·Wᵀ): 16×16 blocks are
            // transposed in registers instead of scattering each value to a stride-32 slot.
            let src = b.offset(jr as isize * csb);
            let whole = kc - kc % 16;
            transpose_columns(whole, src, csb, dst);
            for j in 0..NR {
                for p in whole..kc {
                    *dst.add(p * NR + j) = *src.offset(j as isize * csb + p as isize);
                }
            }
            continue;
        }
        if cols < NR {
            std::ptr::write_bytes(dst, 0, NR * kc);
        }
        for j in 0..cols {
            let src = b.offset((jr + j) as isize * csb);
            for p in 0..kc {
                *dst.add(p * NR + j) = *src.offset(p as isize * rsb);
            }
        }
    }
}

/// For 32 contiguous columns of `kc` values (`kc` a multiple of 16) starting at `src`, `csb`
/// apart, writes row `p` of the 32-wide panel for every `p`: two 16×16 transposes per 16 steps.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_columns(kc: usize, src: *const f32, csb: isize, dst: *mut f32) {
    for p in (0..kc).step_by(16) {
        for half in 0..2 {
            let mut rows = [_mm512_setzero_ps(); 16];
            for (j, row) in rows.iter_mut().enumerate() {
                *row = _mm512_loadu_ps(src.offset((16 * half + j) as isize * csb + p as isize));
            }
            let columns = transpose16(rows);
            for (q, column) in columns.iter().enumerate() {
                _mm512_store_ps(dst.add((p + q) * NR + 16 * half), *column);
            }
        }
    }
}

/// For 12 contiguous rows of `kc` values (`kc` a multiple of 16) starting at `src`, `rsa`
/// apart, writes step `p` of the 12-wide panel for every `p`: one 16×16 transpose (four rows
/// of zeros) per 16 steps, each column stored as 12 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose_rows(kc: usize, src: *const f32, rsa: isize, dst: *mut f32) {
    const TWELVE_LANES: __mmask16 = (1 << MR) - 1;
    for p in (0..kc).step_by(16) {
        let mut rows = [_mm512_setzero_ps(); 16];
        for (i, row) in rows.iter_mut().take(MR).enumerate() {
            *row = _mm512_loadu_ps(src.offset(i as isize * rsa + p as isize));
        }
        let steps = transpose16(rows);
        for (q, step) in steps.iter().enumerate() {
            _mm512_mask_storeu_ps(dst.add((p + q) * MR), TWELVE_LANES, *step);
        }
    }
}

/// Transposes a 16×16 block held as 16 row vectors.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Interleave pairs of rows, then pairs of pairs (within 128-bit lanes), then move the
    // 128-bit lanes across (twice).
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let (a0, a1, b0, b1) = (t[4 * i], t[4 * i + 1], t[4 * i + 2], t[4 * i + 3]);
        u[4 * i] = _mm512_shuffle_ps::<0x44>(a0, b0);
        u[4 * i + 1] = _mm512_shuffle_ps::<0xEE>(a0, b0);
        u[4 * i + 2] = _mm512_shuffle_ps::<0x44>(a1, b1);
        u[4 * i + 3] = _mm512_shuffle_ps::<0xEE>(a1, b1);
    }
    // u[4i + c] holds, in each 128-bit lane L, column 4L + c of rows 4i..4i+4.
    let mut v = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        v[c] = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        v[4 + c] = _mm512_shuffle_f32x4::<0xDD>(u[c], u[4 + c]);
        v[8 + c] = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        v[12 + c] = _mm512_shuffle_f32x4::<0xDD>(u[8 + c], u[12 + c]);
    }
    let mut out = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        out[c] = _mm512_shuffle_f32x4::<0x88>(v[c], v[8 + c]);
        out[8 + c] = _mm512_shuffle_f32x4::<0xDD>(v[c], v[8 + c]);
        out[4 + c] = _mm512_shuffle_f32x4::<0x88>(v[4 + c], v[12 + c]);
        out[12 + c] = _mm512_shuffle_f32x4::<0xDD>(v[4 + c], v[12 + c]);
    }
    out
}

/// Where a micro-tile's result goes: `C[rows × cols] ← α·(A·B) + β·C`.
#[derive(Clone, Copy)]
struct Tile {
    c: *mut f32,
    rsc: isize,
    csc: isize,
    rows: usize,
    cols: usize,
    alpha: f32,
    beta: f32,
    /// The tile's columns of a row vector added to every row (a linear's bias, on the first
    /// k block only), or null.
    bias: *const f32,
    /// What happens to the finished values as the last k block stores them.
    finish: TileFinish,
}

/// A tile's epilogue, on the last k block only, after the bias and the low-rank terms: each
/// gives the bits of the separate pass it replaces over the finished product.
#[derive(Clone, Copy)]
pub(crate) struct TileFinish {
    /// The tile's block of a matrix added (a residual stream), rows `rsr` apart; or null.
    pub(crate) residual: *const f32,
    pub(crate) rsr: isize,
    /// GELU applied (GPT-2's tanh form, [`crate::ops::gelu_and_derivative`]) ...
    pub(crate) gelu: bool,
    /// ... and, unless null, its derivative at each pre-activation written here, rows `rsd`
    /// apart (what GELU's backward multiplies by).
    pub(crate) derivative: *mut f32,
    pub(crate) rsd: isize,
}

impl TileFinish {
    pub(crate) const NONE: TileFinish = TileFinish {
        residual: std::ptr::null(),
        rsr: 0,
        gelu: false,
        derivative: std::ptr::null_mut(),
        rsd: 0,
    };

    /// The same epilogue for the block starting `row` rows and `col` columns further on.
    pub(crate) unsafe fn offset(self, row: usize, col: usize) -> TileFinish {
        let mut moved = self;
        if !self.residual.is_null() {
            moved.residual = self.residual.offset(row as isize * self.rsr + col as isize);
        }
        if !self.derivative.is_null() {
            moved.derivative = self
                .derivative
                .offset(row as isize * self.rsd + col as isize);
        }
        moved
    }
}

/// GELU and its derivative at 16 pre-activations, through the scalar function the `gelu` op
/// maps over its input (LLVM turns the loop into vector code inside the AVX-512 kernels), so
/// the fused store has that op's bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn gelu_lanes(v: __m512) -> (__m512, __m512) {
    let mut x = [0.0f32; 16];
    _mm512_storeu_ps(x.as_mut_ptr(), v);
    let (mut y, mut d) = ([0.0f32; 16], [0.0f32; 16]);
    for i in 0..16 {
        (y[i], d[i]) = crate::ops::gelu_and_derivative(x[i]);
    }
    (_mm512_loadu_ps(y.as_ptr()), _mm512_loadu_ps(d.as_ptr()))
}

/// The 12×32 micro-kernel over `kc` steps of A and a packed B panel, computing its first
/// `ROWS` rows only (an edge panel's padding rows would be wasted FMAs). Each step of A is
/// `ROWS` consecutive values, `a_step` apart: a packed panel (12) or the column stride of a
/// column-major A read in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel<const ROWS: usize>(
    kc: usize,
    a: *const f32,
    a_step: isize,
    b: *const f32,
    tail: TailSteps,
    tile: Tile,
    l2_next: *const f32,
) {
    let mut left = [_mm512_setzero_ps(); MR];
    let mut right = [_mm512_setzero_ps(); MR];
    // A packed panel streamed past a B panel (the packed-A loop order of `Product::run`).
    let streamed = ROWS == MR && a_step == MR as isize && kc > 0 && !l2_next.is_null();
    // Such a loop asks for C's lines near its end; every other loop at its start.
    let late_c = (streamed && tile.csc == 1 && tile.rows == MR && kc >= LATE_C_MIN_STEPS)
        .then_some((tile.c, tile.rsc));
    if late_c.is_none() {
        prefetch_c(tile);
    }
    if streamed {
        steps_12x32_packed(kc, a, b, late_c, l2_next, &mut left, &mut right);
    } else if ROWS == MR && kc > 0 {
        steps_12x32(kc, a, a_step, b, &mut left, &mut right);
    } else {
        let (mut a, mut b) = (a, b);
        for _ in 0..kc {
            prefetch_b(b);
            let b0 = _mm512_load_ps(b);
            let b1 = _mm512_load_ps(b.add(16));
            for i in 0..ROWS {
                let ai = _mm512_set1_ps(*a.add(i));
                left[i] = _mm512_fmadd_ps(ai, b0, left[i]);
                right[i] = _mm512_fmadd_ps(ai, b1, right[i]);
            }
            a = a.offset(a_step);
            b = b.add(NR);
        }
    }
    tail.accumulate::<ROWS>(&mut left, &mut right);
    store(left, right, tile);
}

/// [`kernel`]'s k loop for a full 12-row tile: `kc ≥ 1` steps, each two 16-lane vectors of
/// the packed B panel against 12 values of A (`a_step` floats apart from one step to the
/// next), added to the accumulators (each row's left and right half). The same FMAs in the
/// same order as the generic loop, so the same bits.
///
/// Written in assembly for what each step costs the core's front end: the generic loop
/// compiles to one broadcast and two register FMAs per value of A (43 instructions per step
/// of 24 FMAs), while here each FMA reads its value straight from memory as a broadcast
/// operand (`{1to16}`; 31 per step). Both keep the FMA units busy on a core of their own. In
/// this machine's "slow phases" (docs/BENCHMARKS.md: the register-only FMA probe keeps its
/// rate while every kernel that loads from memory loses ≈ 25 %, as when the physical core's
/// other hardware thread runs another tenant's program and the two share the issue slots)
/// the shorter step loses less: 1.07–1.09× in a standalone copy in such minutes; 1.016× on
/// average on GPT-2's linears in this library (alternated call by call, 200 shape × run
/// medians, 91 % of them above 1).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn steps_12x32(
    kc: usize,
    a: *const f32,
    a_step: isize,
    b: *const f32,
    left: &mut [__m512; MR],
    right: &mut [__m512; MR],
) {
    // The offsets below (A at 0, 4, …, 44 bytes; B at 0 and 64, 128 per step) are this tile's.
    const _: () = assert!(
        MR == 12 && NR == 32,
        "steps_12x32 is written for a 12 × 32 tile"
    );
    // SAFETY: reads kc steps of A (12 floats each, a_step floats apart) and kc × 32 floats of
    // B (64-byte aligned, as the packing buffers are), the caller's contract; prefetches past
    // the panel never fault.
    std::arch::asm!(
        "2:",
        "prefetcht0 [{b} + {ahead}]",
        "prefetcht0 [{b} + {ahead} + 64]",
        "vmovaps zmm24, [{b}]",
        "vmovaps zmm25, [{b} + 64]",
        "vfmadd231ps zmm0, zmm24, dword ptr [{a}]{{1to16}}",
        "vfmadd231ps zmm1, zmm25, dword ptr [{a}]{{1to16}}",
        "vfmadd231ps zmm2, zmm24, dword ptr [{a} + 4]{{1to16}}",
        "vfmadd231ps zmm3, zmm25, dword ptr [{a} + 4]{{1to16}}",
        "vfmadd231ps zmm4, zmm24, dword ptr [{a} + 8]{{1to16}}",
        "vfmadd231ps zmm5, zmm25, dword ptr [{a} + 8]{{1to16}}",
        "vfmadd231ps zmm6, zmm24, dword ptr [{a} + 12]{{1to16}}",
        "vfmadd231ps zmm7, zmm25, dword ptr [{a} + 12]{{1to16}}",
        "vfmadd231ps zmm8, zmm24, dword ptr [{a} + 16]{{1to16}}",
        "vfmadd231ps zmm9, zmm25, dword ptr [{a} + 16]{{1to16}}",
        "vfmadd231ps zmm10, zmm24, dword ptr [{a} + 20]{{1to16}}",
        "vfmadd231ps zmm11, zmm25, dword ptr [{a} + 20]{{1to16}}",
        "vfmadd231ps zmm12, zmm24, dword ptr [{a} + 24]{{1to16}}",
        "vfmadd231ps zmm13, zmm25, dword ptr [{a} + 24]{{1to16}}",
        "vfmadd231ps zmm14, zmm24, dword ptr [{a} + 28]{{1to16}}",
        "vfmadd231ps zmm15, zmm25, dword ptr [{a} + 28]{{1to16}}",
        "vfmadd231ps zmm16, zmm24, dword ptr [{a} + 32]{{1to16}}",
        "vfmadd231ps zmm17, zmm25, dword ptr [{a} + 32]{{1to16}}",
        "vfmadd231ps zmm18, zmm24, dword ptr [{a} + 36]{{1to16}}",
        "vfmadd231ps zmm19, zmm25, dword ptr [{a} + 36]{{1to16}}",
        "vfmadd231ps zmm20, zmm24, dword ptr [{a} + 40]{{1to16}}",
        "vfmadd231ps zmm21, zmm25, dword ptr [{a} + 40]{{1to16}}",
        "vfmadd231ps zmm22, zmm24, dword ptr [{a} + 44]{{1to16}}",
        "vfmadd231ps zmm23, zmm25, dword ptr [{a} + 44]{{1to16}}",
        "add {a}, {a_bytes}",
        "sub {b}, -128",
        "dec {k}",
        "jnz 2b",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        k = inout(reg) kc => _,
        a_bytes = in(reg) a_step * 4,
        ahead = const PREFETCH_B_STEPS * NR * 4,
        inout("zmm0") left[0], inout("zmm1") right[0],
        inout("zmm2") left[1], inout("zmm3") right[1],
        inout("zmm4") left[2], inout("zmm5") right[2],
        inout("zmm6") left[3], inout("zmm7") right[3],
        inout("zmm8") left[4], inout("zmm9") right[4],
        inout("zmm10") left[5], inout("zmm11") right[5],
        inout("zmm12") left[6], inout("zmm13") right[6],
        inout("zmm14") left[7], inout("zmm15") right[7],
        inout("zmm16") left[8], inout("zmm17") right[8],
        inout("zmm18") left[9], inout("zmm19") right[9],
        inout("zmm20") left[10], inout("zmm21") right[10],
        inout("zmm22") left[11], inout("zmm23") right[11],
        out("zmm24") _,
        out("zmm25") _,
        options(nostack, readonly),
    );
}

/// One step of [`steps_12x32_packed`]'s unrolled loop: step `$s` (0–3) of the iteration, its
/// A values at `48·s + 4·i` bytes and its B vectors at `128·s` and `128·s + 64`.
#[rustfmt::skip]
macro_rules! step_12x32 {
    ($s:literal) => {
        concat!(
            "vmovaps zmm24, [{b} + 128*", $s, "]\n",
            "vmovaps zmm25, [{b} + 128*", $s, " + 64]\n",
            "vfmadd231ps zmm0, zmm24, dword ptr [{a} + 48*", $s, "]{{1to16}}\n",
            "vfmadd231ps zmm1, zmm25, dword ptr [{a} + 48*", $s, "]{{1to16}}\n",
            "vfmadd231ps zmm2, zmm24, dword ptr [{a} + 48*", $s, " + 4]{{1to16}}\n",
            "vfmadd231ps zmm3, zmm25, dword ptr [{a} + 48*", $s, " + 4]{{1to16}}\n",
            "vfmadd231ps zmm4, zmm24, dword ptr [{a} + 48*", $s, " + 8]{{1to16}}\n",
            "vfmadd231ps zmm5, zmm25, dword ptr [{a} + 48*", $s, " + 8]{{1to16}}\n",
            "vfmadd231ps zmm6, zmm24, dword ptr [{a} + 48*", $s, " + 12]{{1to16}}\n",
            "vfmadd231ps zmm7, zmm25, dword ptr [{a} + 48*", $s, " + 12]{{1to16}}\n",
            "vfmadd231ps zmm8, zmm24, dword ptr [{a} + 48*", $s, " + 16]{{1to16}}\n",
            "vfmadd231ps zmm9, zmm25, dword ptr [{a} + 48*", $s, " + 16]{{1to16}}\n",
            "vfmadd231ps zmm10, zmm24, dword ptr [{a} + 48*", $s, " + 20]{{1to16}}\n",
            "vfmadd231ps zmm11, zmm25, dword ptr [{a} + 48*", $s, " + 20]{{1to16}}\n",
            "vfmadd231ps zmm12, zmm24, dword ptr [{a} + 48*", $s, " + 24]{{1to16}}\n",
            "vfmadd231ps zmm13, zmm25, dword ptr [{a} + 48*", $s, " + 24]{{1to16}}\n",
            "vfmadd231ps zmm14, zmm24, dword ptr [{a} + 48*", $s, " + 28]{{1to16}}\n",
            "vfmadd231ps zmm15, zmm25, dword ptr [{a} + 48*", $s, " + 28]{{1to16}}\n",
            "vfmadd231ps zmm16, zmm24, dword ptr [{a} + 48*", $s, " + 32]{{1to16}}\n",
            "vfmadd231ps zmm17, zmm25, dword ptr [{a} + 48*", $s, " + 32]{{1to16}}\n",
            "vfmadd231ps zmm18, zmm24, dword ptr [{a} + 48*", $s, " + 36]{{1to16}}\n",
            "vfmadd231ps zmm19, zmm25, dword ptr [{a} + 48*", $s, " + 36]{{1to16}}\n",
            "vfmadd231ps zmm20, zmm24, dword ptr [{a} + 48*", $s, " + 40]{{1to16}}\n",
            "vfmadd231ps zmm21, zmm25, dword ptr [{a} + 48*", $s, " + 40]{{1to16}}\n",
            "vfmadd231ps zmm22, zmm24, dword ptr [{a} + 48*", $s, " + 44]{{1to16}}\n",
            "vfmadd231ps zmm23, zmm25, dword ptr [{a} + 48*", $s, " + 44]{{1to16}}\n",
        )
    };
}

/// Steps of k ahead that [`steps_12x32_packed`] asks L1 for its A panel (streamed from L2 in
/// the packed-A loop order): 16 steps, 768 bytes.
const PREFETCH_A_STEPS: usize = 16;

/// Floats of the next B panel that a packed-A tile asks into L2 per step of k (32 bytes per
/// turn of four steps, MKL's rate): with kc = 384, 3 KiB per tile, so the 48 KiB panel is in
/// L2 after 16 of a block's 22–28 tiles, before its turn comes. Without it each new panel came
/// from L3 while the kernel waited (0.92 against 0.96 of the FMA probe in a standalone copy).
const L2_SLICE_FLOATS_PER_STEP: usize = 2;

/// Steps of k after the last of the C tile's lines is asked for in [`steps_12x32_packed`]
/// (four turns of its loop).
const LATE_C_TAIL_STEPS: usize = 16;

/// Fewest steps of k for which [`steps_12x32_packed`] asks for C's lines near the end of the
/// loop (12 turns of four steps, one row of C each, then [`LATE_C_TAIL_STEPS`]); shorter
/// loops ask at their start.
const LATE_C_MIN_STEPS: usize = 4 * MR + LATE_C_TAIL_STEPS;

/// [`steps_12x32`] for a packed A panel (12 floats per step) in the packed-A loop order of
/// `Product::run`, where one B panel serves every A panel of the block in turn, so A is the
/// operand streamed from L2 (asked into L1 [`PREFETCH_A_STEPS`] ahead) and B is left to the
/// hardware prefetchers. Each turn of the loop also asks for 32 bytes of `l2_next` into L2
/// (the caller's slice of the next B panel; see [`L2_SLICE_FLOATS_PER_STEP`]). Four steps per
/// turn, so the loop's own instructions (three per turn) are spread over 96 FMAs instead of
/// 24. With `late_c = Some((c, rsc))` (a full tile whose rows are contiguous, `kc ≥`
/// [`LATE_C_MIN_STEPS`]) the last 12 turns but four each ask for one row of the C tile with
/// `prefetchw`: the lines arrive, writable, shortly before the tile is stored, whereas lines
/// asked for at the start of a 384-step loop have usually been pushed out of L1 by the 48 KiB
/// of B that streamed through it since. Same FMAs in the same order, so the same bits.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn steps_12x32_packed(
    kc: usize,
    a: *const f32,
    b: *const f32,
    late_c: Option<(*mut f32, isize)>,
    l2_next: *const f32,
    left: &mut [__m512; MR],
    right: &mut [__m512; MR],
) {
    const _: () = assert!(
        MR == 12 && NR == 32 && L2_SLICE_FLOATS_PER_STEP == 2,
        "steps_12x32_packed is written for a 12 × 32 tile and 32 bytes of L2 prefetch a turn"
    );
    let turns = kc / 4;
    let (c, c_row_bytes, c_turns, tail_turns) = match late_c {
        Some((c, rsc)) => (c, rsc * 4, MR, LATE_C_TAIL_STEPS / 4),
        None => (std::ptr::null_mut(), 0, 0, 0),
    };
    debug_assert!(turns >= c_turns + tail_turns);
    // SAFETY: reads kc steps of the packed A panel (12 floats each) and kc × 32 floats of B
    // (64-byte aligned, as the packing buffers are), the caller's contract; prefetches past
    // the panels or outside C never fault and change nothing.
    std::arch::asm!(
        // Turns before the C lines are asked for.
        "test {k}, {k}",
        "jz 3f",
        "2:",
        step_12x32!(0),
        "prefetcht0 [{a} + {a_ahead}]",
        step_12x32!(1),
        "prefetcht0 [{a} + {a_ahead} + 64]",
        step_12x32!(2),
        "prefetcht0 [{a} + {a_ahead} + 128]",
        "prefetcht2 [{l2}]",
        step_12x32!(3),
        "add {l2}, 32",
        "add {a}, 192",
        "add {b}, 512",
        "dec {k}",
        "jnz 2b",
        // One row of C per turn.
        "3:",
        "test {ck}, {ck}",
        "jz 5f",
        "4:",
        step_12x32!(0),
        "prefetcht0 [{a} + {a_ahead}]",
        "prefetchw [{c}]",
        step_12x32!(1),
        "prefetcht0 [{a} + {a_ahead} + 64]",
        "prefetchw [{c} + 64]",
        step_12x32!(2),
        "prefetcht0 [{a} + {a_ahead} + 128]",
        "prefetcht2 [{l2}]",
        step_12x32!(3),
        "add {l2}, 32",
        "add {c}, {c_row_bytes}",
        "add {a}, 192",
        "add {b}, 512",
        "dec {ck}",
        "jnz 4b",
        // The last turns.
        "5:",
        "test {tk}, {tk}",
        "jz 7f",
        "6:",
        step_12x32!(0),
        "prefetcht0 [{a} + {a_ahead}]",
        step_12x32!(1),
        "prefetcht0 [{a} + {a_ahead} + 64]",
        step_12x32!(2),
        "prefetcht0 [{a} + {a_ahead} + 128]",
        "prefetcht2 [{l2}]",
        step_12x32!(3),
        "add {l2}, 32",
        "add {a}, 192",
        "add {b}, 512",
        "dec {tk}",
        "jnz 6b",
        // Single steps left over (kc mod 4).
        "7:",
        "test {rest}, {rest}",
        "jz 9f",
        "8:",
        step_12x32!(0),
        "add {a}, 48",
        "add {b}, 128",
        "dec {rest}",
        "jnz 8b",
        "9:",
        a = inout(reg) a => _,
        b = inout(reg) b => _,
        k = inout(reg) turns - c_turns - tail_turns => _,
        ck = inout(reg) c_turns => _,
        tk = inout(reg) tail_turns => _,
        rest = inout(reg) kc % 4 => _,
        c = inout(reg) c => _,
        c_row_bytes = in(reg) c_row_bytes,
        l2 = inout(reg) l2_next => _,
        a_ahead = const PREFETCH_A_STEPS * MR * 4,
        inout("zmm0") left[0], inout("zmm1") right[0],
        inout("zmm2") left[1], inout("zmm3") right[1],
        inout("zmm4") left[2], inout("zmm5") right[2],
        inout("zmm6") left[3], inout("zmm7") right[3],
        inout("zmm8") left[4], inout("zmm9") right[4],
        inout("zmm10") left[5], inout("zmm11") right[5],
        inout("zmm12") left[6], inout("zmm13") right[6],
        inout("zmm14") left[7], inout("zmm15") right[7],
        inout("zmm16") left[8], inout("zmm17") right[8],
        inout("zmm18") left[9], inout("zmm19") right[9],
        inout("zmm20") left[10], inout("zmm21") right[10],
        inout("zmm22") left[11], inout("zmm23") right[11],
        out("zmm24") _,
        out("zmm25") _,
        options(nostack, readonly),
    );
}

/// [`kernel`]'s instance for a tile of `rows` rows (12 for anything larger).
#[cfg(target_arch = "x86_64")]
fn kernel_for_rows(
    rows: usize,
) -> unsafe fn(usize, *const f32, isize, *const f32, TailSteps, Tile, *const f32) {
    match rows {
        1 => kernel::<1>,
        2 => kernel::<2>,
        3 => kernel::<3>,
        4 => kernel::<4>,
        5 => kernel::<5>,
        6 => kernel::<6>,
        7 => kernel::<7>,
        8 => kernel::<8>,
        9 => kernel::<9>,
        10 => kernel::<10>,
        11 => kernel::<11>,
        _ => kernel::<MR>,
    }
}

/// The micro-kernel reading 12 full rows of a row-major A in place (row `i`, step `p` at
/// `a + i·rsa + p`) against a packed B panel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_rows(
    kc: usize,
    a: *const f32,
    rsa: isize,
    b: *const f32,
    tail: TailSteps,
    tile: Tile,
) {
    prefetch_c(tile);
    let mut left = [_mm512_setzero_ps(); MR];
    let mut right = [_mm512_setzero_ps(); MR];
    // Four base pointers, rows 0, 3, 6, 9; the others are one or two row strides further,
    // which x86 addressing ([base + index·4] / [base + index·8]) reaches without extra work.
    let mut bases = [a, a.offset(3 * rsa), a.offset(6 * rsa), a.offset(9 * rsa)];
    let mut b = b;
    for _ in 0..kc {
        prefetch_b(b);
        let b0 = _mm512_load_ps(b);
        let b1 = _mm512_load_ps(b.add(16));
        for (g, base) in bases.iter().enumerate() {
            for r in 0..3 {
                let i = 3 * g + r;
                let ai = _mm512_set1_ps(*base.offset(r as isize * rsa));
                left[i] = _mm512_fmadd_ps(ai, b0, left[i]);
                right[i] = _mm512_fmadd_ps(ai, b1, right[i]);
            }
        }
        for base in bases.iter_mut() {
            *base = base.add(1);
        }
        b = b.add(NR);
    }
    tail.accumulate::<MR>(&mut left, &mut right);
    store(left, right, tile);
}

/// Steps of k ahead that the micro-kernels ask L1 for the B panel (streamed from L2): 8 steps
/// (1 KiB) measured best against 0, 4, 6 and 16 — 5–10 % on GPT-2's products.
const PREFETCH_B_STEPS: usize = 8;

/// Asks for both cache lines of B's row [`PREFETCH_B_STEPS`] ahead of `b`. Prefetching past
/// the panel's end is harmless (a hint, never a fault).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_b(b: *const f32) {
    let ahead = b.wrapping_add(PREFETCH_B_STEPS * NR).cast::<i8>();
    _mm_prefetch::<_MM_HINT_T0>(ahead);
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
}

/// Asks for the C tile's cache lines while the k loop runs, so that the β load and the stores
/// at its end do not wait on L3 (C is touched once per k block and has left L2 by then).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn prefetch_c(tile: Tile) {
    if tile.csc == 1 {
        for i in 0..tile.rows {
            let row = tile.c.offset(i as isize * tile.rsc).cast::<i8>();
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(64));
        }
    }
}

/// `*dst ← value + β·*dst`, not reading `dst` when β = 0 (C may be uninitialised then): the
/// scalar store of outputs with strided rows and of the thin kernel's tiles.
#[inline(always)]
unsafe fn write_scaled(dst: *mut f32, value: f32, beta: f32) {
    *dst = if beta == 0.0 {
        value
    } else {
        beta.mul_add(*dst, value)
    };
}

/// Writes a finished 12×32 accumulator tile: vector stores along C's rows (masked to the
/// valid columns of an edge tile), or, for a C with strided rows (a transposed output), each
/// value through a local buffer.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store(left: [__m512; MR], right: [__m512; MR], tile: Tile) {
    let Tile {
        c,
        rsc,
        csc,
        rows,
        cols,
        alpha,
        beta,
        bias,
        finish,
    } = tile;
    let alpha_v = _mm512_set1_ps(alpha);
    if csc == 1 {
        // All 16 lanes of each half, or the first `cols` of the 32 (edge tiles).
        let lanes = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        let (mask_l, mask_r) = (lanes(cols), lanes(cols.saturating_sub(16)));
        let beta_v = _mm512_set1_ps(beta);
        for i in 0..rows {
            let row = c.offset(i as isize * rsc);
            let (mut l, mut r) = (
                _mm512_mul_ps(alpha_v, left[i]),
                _mm512_mul_ps(alpha_v, right[i]),
            );
            if beta != 0.0 {
                l = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_l, row), l);
                r = _mm512_fmadd_ps(beta_v, _mm512_maskz_loadu_ps(mask_r, row.add(16)), r);
            }
            if !bias.is_null() {
                l = _mm512_add_ps(l, _mm512_maskz_loadu_ps(mask_l, bias));
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask_r, bias.add(16)));
            }
            if !finish.residual.is_null() {
                let from = finish.residual.offset(i as isize * finish.rsr);
                l = _mm512_add_ps(l, _mm512_maskz_loadu_ps(mask_l, from));
                r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(mask_r, from.add(16)));
            }
            if finish.gelu {
                let ((gl, dl), (gr, dr)) = (gelu_lanes(l), gelu_lanes(r));
                (l, r) = (gl, gr);
                if !finish.derivative.is_null() {
                    let to = finish.derivative.offset(i as isize * finish.rsd);
                    _mm512_mask_storeu_ps(to, mask_l, dl);
                    _mm512_mask_storeu_ps(to.add(16), mask_r, dr);
                }
            }
            _mm512_mask_storeu_ps(row, mask_l, l);
            _mm512_mask_storeu_ps(row.add(16), mask_r, r);
        }
        return;
    }
    let mut buffer = [Line([0.0; 16]); 2 * MR];
    for i in 0..MR {
        _mm512_store_ps(
            buffer[2 * i].0.as_mut_ptr(),
            _mm512_mul_ps(alpha_v, left[i]),
        );
        _mm512_store_ps(
            buffer[2 * i + 1].0.as_mut_ptr(),
            _mm512_mul_ps(alpha_v, right[i]),
        );
    }
    for i in 0..rows {
        for j in 0..cols {
            let value = buffer[2 * i + j / 16].0[j % 16];
            let dst = c.offset(i as isize * rsc + j as isize * csc);
            write_scaled(dst, value, beta);
            if !bias.is_null() {
                *dst += *bias.add(j);
            }
            if !finish.residual.is_null() {
                *dst += *finish.residual.offset(i as isize * finish.rsr + j as isize);
            }
            if finish.gelu {
                let (y, d) = crate::ops::gelu_and_derivative(*dst);
                *dst = y;
                if !finish.derivative.is_null() {
                    *finish
                        .derivative
                        .offset(i as isize * finish.rsd + j as isize) = d;
                }
            }
        }
    }
}

/// Widest product [`sgemm_thin`] takes: one 16-lane vector per row of C.
pub const THIN_MAX: usize = 16;

/// `c ← α·a·b + β·c` for a product at most [`THIN_MAX`] columns wide — LoRA's rank-r side
/// (x·Aᵀ, ∂u = G·B, ∂Aᵀ = xᵀ·∂u). `b` (k × n) is packed once into k lines of 16, zero past
/// column n; `a` is taken twelve rows at a time: each step of k broadcasts one value per row
/// against the step's line, 12 FMAs into 12 accumulators. A row-major `a` (x, G) is read in
/// place, a column-major one (xᵀ) by columns loaded as vectors; any other layout is copied
/// into a 12-row panel first. The 12×32 kernel would waste 32 − n lanes of every FMA on such
/// a product (and matrixmultiply copies all of `a` into its packing buffer first); here n of
/// 16 lanes are useful. With β = 0, `c` is not read.
///
/// # Safety
/// As for [`sgemm`], and `n ≤ THIN_MAX`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_thin(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    assert!(n <= THIN_MAX, "sgemm_thin: {n} columns");
    #[cfg(target_arch = "x86_64")]
    BUFFERS.with(|buffers| {
        let (a_buf, b_buf) = &mut *buffers.borrow_mut();
        let b_lines = lines(b_buf, k * THIN_MAX);
        std::ptr::write_bytes(b_lines, 0, k * THIN_MAX);
        if csb == 1 {
            for p in 0..k {
                std::ptr::copy_nonoverlapping(
                    b.offset(p as isize * rsb),
                    b_lines.add(p * THIN_MAX),
                    n,
                );
            }
        } else {
            // Column by column: contiguous reads when B is column-major (a transposed view).
            for j in 0..n {
                for p in 0..k {
                    *b_lines.add(p * THIN_MAX + j) = *b.offset(p as isize * rsb + j as isize * csb);
                }
            }
        }
        if rsa == 1 && csa != 1 {
            // Column-major A (xᵀ in ∂Aᵀ = xᵀ·∂u): its columns are vectors, so load them.
            match n {
                0..=4 => thin_columns::<4, 4>(m, k, n, alpha, a, csa, b_lines, beta, c, rsc, csc),
                5..=8 => thin_columns::<8, 2>(m, k, n, alpha, a, csa, b_lines, beta, c, rsc, csc),
                _ => thin_columns::<16, 1>(m, k, n, alpha, a, csa, b_lines, beta, c, rsc, csc),
            }
            return;
        }
        let full = m - m % MR;
        for i in (0..full).step_by(MR) {
            let tile = Tile {
                c: c.offset(i as isize * rsc),
                rsc,
                csc,
                rows: MR,
                cols: n,
                alpha,
                beta,
                bias: std::ptr::null(),
                finish: TileFinish::NONE,
            };
            if csa == 1 {
                thin_rows(k, a.offset(i as isize * rsa), rsa, b_lines, tile);
            } else {
                let panel = lines(a_buf, MR * k);
                pack_a(MR, k, a.offset(i as isize * rsa), rsa, csa, panel);
                thin_kernel(k, panel, b_lines, tile);
            }
        }
        if full < m {
            let panel = lines(a_buf, MR * k);
            pack_a(m - full, k, a.offset(full as isize * rsa), rsa, csa, panel);
            let tile = Tile {
                c: c.offset(full as isize * rsc),
                rsc,
                csc,
                rows: m - full,
                cols: n,
                alpha,
                beta,
                bias: std::ptr::null(),
                finish: TileFinish::NONE,
            };
            thin_kernel(k, panel, b_lines, tile);
        }
    });
}

/// The thin product for a column-major `a` (`a[i, p]` at `a + i + p·csa`): blocks of `16·V`
/// rows, each step loading `V` vectors of a column of `a` and broadcasting the step's `N`
/// values of b (`N` ≥ n, padded with the packed zeros) — `V·N = 16` accumulators, every lane
/// useful, and `a` read once in place. C's block is written through a small buffer.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn thin_columns<const N: usize, const V: usize>(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    csa: isize,
    b: *const f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
) {
    for i0 in (0..m).step_by(16 * V) {
        let mut masks = [0 as __mmask16; V];
        for (v, mask) in masks.iter_mut().enumerate() {
            let rows = m.saturating_sub(i0 + 16 * v).min(16);
            *mask = ((1u32 << rows) - 1) as __mmask16;
        }
        let mut acc = [[_mm512_setzero_ps(); N]; V];
        let mut column = a.add(i0);
        let mut line = b;
        for _ in 0..k {
            let mut x = [_mm512_setzero_ps(); V];
            for v in 0..V {
                x[v] = _mm512_maskz_loadu_ps(masks[v], column.add(16 * v));
            }
            for (v, acc) in acc.iter_mut().enumerate() {
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(x[v], _mm512_set1_ps(*line.add(j)), *acc);
                }
            }
            column = column.offset(csa);
            line = line.add(THIN_MAX);
        }
        let alpha_v = _mm512_set1_ps(alpha);
        let mut out = Line([0.0; 16]);
        for (v, acc) in acc.iter().enumerate() {
            let rows = m.saturating_sub(i0 + 16 * v).min(16);
            for (j, acc) in acc.iter().enumerate().take(n) {
                _mm512_store_ps(out.0.as_mut_ptr(), _mm512_mul_ps(alpha_v, *acc));
                for (l, &value) in out.0.iter().enumerate().take(rows) {
                    let dst = c.offset((i0 + 16 * v + l) as isize * rsc + j as isize * csc);
                    write_scaled(dst, value, beta);
                }
            }
        }
    }
}

/// A packed 12-row panel of `a` (step `p`'s 12 values at `a + 12·p`) against `k` packed lines
/// of b; writes the tile's `rows × cols` part of C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn thin_kernel(k: usize, a: *const f32, b: *const f32, tile: Tile) {
    let mut acc = [_mm512_setzero_ps(); MR];
    let (mut a, mut b) = (a, b);
    for _ in 0..k {
        let line = _mm512_load_ps(b);
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(i)), line, *acc);
        }
        a = a.add(MR);
        b = b.add(THIN_MAX);
    }
    thin_store(acc, tile);
}

/// Twelve rows of a row-major `a` read in place (row `i`, step `p` at `a + i·rsa + p`) against
/// `k` packed lines of b, four steps at a time: the twelve row addresses, which the compiler
/// computes one from another, are then worked out once per four steps instead of every step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn thin_rows(k: usize, a: *const f32, rsa: isize, b: *const f32, tile: Tile) {
    let mut acc = [_mm512_setzero_ps(); MR];
    let mut b = b;
    let whole = k - k % 4;
    for p in (0..whole).step_by(4) {
        let lines = [0, 1, 2, 3].map(|s| _mm512_load_ps(b.add(s * THIN_MAX)));
        for (i, acc) in acc.iter_mut().enumerate() {
            let row = a.offset(i as isize * rsa + p as isize);
            for (s, line) in lines.iter().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*row.add(s)), *line, *acc);
            }
        }
        b = b.add(4 * THIN_MAX);
    }
    for p in whole..k {
        let line = _mm512_load_ps(b);
        for (i, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(
                _mm512_set1_ps(*a.offset(i as isize * rsa + p as isize)),
                line,
                *acc,
            );
        }
        b = b.add(THIN_MAX);
    }
    thin_store(acc, tile);
}

/// Writes a thin kernel's accumulators (one vector per row) to the tile's part of C.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn thin_store(acc: [__m512; MR], tile: Tile) {
    let Tile {
        c,
        rsc,
        csc,
        rows,
        cols,
        alpha,
        beta,
        ..
    } = tile;
    let alpha_v = _mm512_set1_ps(alpha);
    if csc == 1 {
        let mask: __mmask16 = ((1u32 << cols) - 1) as __mmask16;
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let row = c.offset(i as isize * rsc);
            let mut v = _mm512_mul_ps(alpha_v, *acc);
            if beta != 0.0 {
                v = _mm512_fmadd_ps(_mm512_set1_ps(beta), _mm512_maskz_loadu_ps(mask, row), v);
            }
            _mm512_mask_storeu_ps(row, mask, v);
        }
        return;
    }
    let mut line = Line([0.0; 16]);
    for (i, acc) in acc.iter().enumerate().take(rows) {
        _mm512_store_ps(line.0.as_mut_ptr(), _mm512_mul_ps(alpha_v, *acc));
        for (j, &value) in line.0.iter().enumerate().take(cols) {
            write_scaled(c.offset(i as isize * rsc + j as isize * csc), value, beta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::{Epilogue, LowRankU};

    /// Row-major `m × k` and `k × n` test operands with values in about ±0.6.
    fn operands(m: usize, k: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let a = (0..m * k)
            .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
            .collect();
        let b = (0..k * n)
            .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
            .collect();
        (a, b)
    }

    /// Reference product in f64.
    fn naive(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn packed_b_products_read_any_step_range_and_column_prefix() {
        if !available() {
            return;
        }
        // B is 300 × 70 (a partial third panel), packed from a row-major and from a
        // column-major copy. A: full and partial 12-row panels, row-major and column-major,
        // the latter in place (≤ 256 steps) and packed (280 steps).
        let (k, n) = (300, 70);
        let (_, b) = operands(1, k, n);
        let b_cols: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        for (b_ptr, rsb, csb) in [
            (b.as_ptr(), n as isize, 1),
            (b_cols.as_ptr(), 1, k as isize),
        ] {
            // SAFETY: AVX-512 checked above; both copies are valid k × n matrices.
            let packed = unsafe { PackedB::new(k, n, b_ptr, rsb, csb) };
            for (m, steps, cols, a_column_major) in [
                (30, 0..300, 70, false),
                (7, 40..100, 33, false),
                (25, 10..290, 64, true),
                (13, 0..200, 70, true),
                (1, 5..6, 1, false),
            ] {
                let kc = steps.len();
                let (a, _) = operands(m, kc, 1);
                let (a_data, rsa, csa) = if a_column_major {
                    let at: Vec<f32> = (0..m * kc).map(|i| a[(i % m) * kc + i / m]).collect();
                    (at, 1, m as isize)
                } else {
                    (a, kc as isize, 1)
                };
                // Three columns past each row of C that must stay untouched.
                let rsc = cols + 3;
                let mut c = vec![f32::NAN; m * rsc];
                // SAFETY: the shapes and strides describe the buffers above.
                unsafe {
                    packed.multiply(
                        m,
                        steps.clone(),
                        cols,
                        0.5,
                        (a_data.as_ptr(), rsa, csa),
                        c.as_mut_ptr(),
                        rsc as isize,
                    );
                }
                for i in 0..m {
                    for j in 0..rsc {
                        let got = c[i * rsc + j];
                        if j >= cols {
                            assert!(got.is_nan(), "wrote past column {cols}");
                            continue;
                        }
                        let want: f64 = 0.5
                            * steps
                                .clone()
                                .enumerate()
                                .map(|(p, step)| {
                                    a_data[i * rsa as usize + p * csa as usize] as f64
                                        * b[step * n + j] as f64
                                })
                                .sum::<f64>();
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{m}×{kc}, steps {steps:?}, A column-major {a_column_major}: \
                             ({i}, {j}) {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_bias_epilogue_gives_the_bits_of_writing_the_bias_rows_first() {
        if !available() {
            return;
        }
        // (m, k, n, A column-major, C column-major): row and column splits, A read in place,
        // packed per thread and packed shared, an edge of partial panels, several k blocks.
        let cases = [
            (300, 200, 150, false, false),
            (301, 801, 280, false, false),
            (97, 385, 700, true, false),
            (130, 70, 1000, false, false),
            (260, 801, 700, false, false),
            (100, 50, 90, false, true),
        ];
        for (m, k, n, a_cols, c_cols) in cases {
            let (a, b) = operands(m, k, n);
            let bias: Vec<f32> = (0..n).map(|j| (j % 17) as f32 * 0.37 - 2.0).collect();
            let (rsa, csa) = if a_cols {
                (1, m as isize)
            } else {
                (k as isize, 1)
            };
            let (rsc, csc) = if c_cols {
                (1, m as isize)
            } else {
                (n as isize, 1)
            };
            let mut two_pass = vec![0.0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    two_pass[i * rsc as usize + j * csc as usize] = bias[j];
                }
            }
            unsafe {
                sgemm(
                    m,
                    k,
                    n,
                    1.0,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    n as isize,
                    1,
                    1.0,
                    two_pass.as_mut_ptr(),
                    rsc,
                    csc,
                );
            }
            for threads in [1, 2, 3] {
                let mut fused = vec![f32::NAN; m * n];
                let done = crate::gemm::tests::on_threads(threads, || unsafe {
                    sgemm_parallel_bias(
                        m,
                        k,
                        n,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        n as isize,
                        1,
                        bias.as_ptr(),
                        fused.as_mut_ptr(),
                        rsc,
                        csc,
                    )
                });
                assert!(done, "{m}×{k}×{n}");
                let same = fused
                    .iter()
                    .zip(&two_pass)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{m}×{k}×{n} A column-major {a_cols} C column-major {c_cols}, {threads} threads");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn the_fma_peak_is_a_positive_rate_when_avx512_or_avx2_is_here() {
        match fma_peak_flops(0.01) {
            Some(flops) => assert!(flops.is_finite() && flops > 1e8, "{flops}"),
            None => {
                let avx2_fma = std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma");
                assert!(!std::arch::is_x86_feature_detected!("avx512f") && !avx2_fma)
            }
        }
    }

    #[test]
    fn k_blocks_are_balanced_multiples_of_16_within_kc() {
        for (m, most) in [
            (1, KC),
            (KC_TALL_MIN_ROWS - 1, KC),
            (KC_TALL_MIN_ROWS, KC_TALL),
        ] {
            for k in 1..3000 {
                let kc = k_block(k, m);
                assert!(
                    kc.is_multiple_of(16) && kc <= most && kc * k.div_ceil(most).max(1) >= k,
                    "k = {k}, m = {m}"
                );
            }
        }
        assert_eq!(
            (k_block(512, 128), k_block(768, 128), k_block(128, 128)),
            (256, 384, 128)
        );
        assert_eq!(
            (k_block(768, 1024), k_block(1024, 1024), k_block(3072, 1024)),
            (768, 512, 768)
        );
    }

    #[test]
    fn matches_a_naive_product_for_edge_sizes_strides_alpha_and_beta() {
        if !available() {
            return;
        }
        type Kernel = unsafe fn(
            usize,
            usize,
            usize,
            f32,
            *const f32,
            isize,
            isize,
            *const f32,
            isize,
            isize,
            f32,
            *mut f32,
            isize,
            isize,
        );
        let cases: &[(usize, usize, usize)] = &[
            (1, 1, 1),
            (12, 256, 32),
            (13, 257, 33),
            (125, 300, 1050),
            (7, 600, 5),
            (240, 3, 64),
            // Several k blocks of balanced size (800 → 3 × 272, the last one 256).
            (25, 800, 70),
            (36, 1000, 64),
            // Edge panels of 4, 8, 10, 1 and 11 rows, each run by the kernel of exactly its
            // rows (with k ≤ 256 a column-major A is read in place, and no row past the
            // matrix may be read).
            (64, 32, 64),
            (44, 70, 40),
            (58, 20, 33),
            (37, 100, 48),
            (35, 256, 40),
            // Large enough that a row-major A is packed (PACK_A_MIN_MACS, PACK_A_MIN_COLS),
            // with a partial last panel and a k block that is not a multiple of 16.
            (301, 801, 280),
            // Packed A panels in the four-step loop: last k blocks of 182 and 183 steps (two and
            // three single steps after the turns, C's lines asked for in the last turns), and
            // a 50-step block (too short for that: C asked for at the start).
            (182, 390, 960),
            (180, 391, 960),
            (1400, 50, 960),
            // Thin products (LoRA's rank side), for both kernels.
            (768, 128, 8),
            (30, 50, 16),
            (13, 7, 1),
            (5, 300, 12),
        ];
        let kernels: [(&str, Kernel); 2] = [("sgemm", sgemm), ("sgemm_thin", sgemm_thin)];
        for (name, kernel) in kernels {
            for &(m, k, n) in cases {
                if name == "sgemm_thin" && n > THIN_MAX {
                    continue;
                }
                let (a, b) = operands(m, k, n);
                let want = naive(m, k, n, &a, &b);
                let tolerance = 1e-4 * k as f64;
                // Row-major operands, β = 0 into garbage (must not be read: NaN would show).
                let mut c = vec![f32::NAN; m * n];
                unsafe {
                    kernel(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                for (got, want) in c.iter().zip(&want) {
                    assert!(
                        (*got as f64 - want).abs() < tolerance,
                        "{name} {m}×{k}×{n}: {got} vs {want}"
                    );
                }
                // Row-major C with β ≠ 0 (edge tiles load and store only their valid columns).
                let mut c2 = vec![2.0f32; m * n];
                unsafe {
                    kernel(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        -1.0,
                        c2.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                for (got, want) in c2.iter().zip(&want) {
                    assert!(
                        (*got as f64 - (want - 2.0)).abs() < tolerance,
                        "{name} {m}×{k}×{n}, β = −1: {got} vs {}",
                        want - 2.0
                    );
                }
                // Transposed operands (column-major views of the same data) and a column-major C,
                // with α = 2 and β = 0.5 onto ones.
                let at: Vec<f32> = (0..k * m).map(|idx| a[(idx % m) * k + idx / m]).collect();
                let bt: Vec<f32> = (0..n * k).map(|idx| b[(idx % k) * n + idx / k]).collect();
                let mut ct = vec![1.0f32; m * n];
                unsafe {
                    kernel(
                        m,
                        k,
                        n,
                        2.0,
                        at.as_ptr(),
                        1,
                        m as isize,
                        bt.as_ptr(),
                        1,
                        k as isize,
                        0.5,
                        ct.as_mut_ptr(),
                        1,
                        m as isize,
                    );
                }
                for i in 0..m {
                    for j in 0..n {
                        let (got, want) = (ct[j * m + i] as f64, 2.0 * want[i * n + j] + 0.5);
                        assert!(
                            (got - want).abs() < 2.0 * tolerance,
                            "{name} {m}×{k}×{n} transposed"
                        );
                    }
                }
            }
        }
    }

    /// Whether a fused low-rank kernel runs here: this module's, or the AVX2 one.
    fn low_rank_available() -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() {
            return true;
        }
        available()
    }

    /// The fused low-rank product of whichever kernel runs here (the AVX2 one writes a
    /// row-major C only).
    #[allow(clippy::too_many_arguments)]
    unsafe fn low_rank(
        a: ndarray::ArrayView2<f32>,
        b: ndarray::ArrayView2<f32>,
        bias: Option<&[f32]>,
        u: LowRankU<f32>,
        parts: &[crate::gemm::LowRankPart<f32>],
        epilogue: Epilogue<f32>,
        c: *mut f32,
        (rsc, csc): (isize, isize),
        threads: usize,
        dynamic: bool,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() {
            assert_eq!((rsc, csc), (b.ncols() as isize, 1));
            return crate::sgemm_avx2::sgemm_low_rank(
                a, b, bias, u, parts, epilogue, c, threads, dynamic,
            );
        }
        sgemm_low_rank(
            a,
            b,
            bias,
            u,
            parts,
            epilogue,
            c,
            (rsc, csc),
            threads,
            dynamic,
        )
    }

    /// The thin product of whichever kernel runs here.
    #[allow(clippy::too_many_arguments)]
    unsafe fn thin(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
        csc: isize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if crate::sgemm_avx2::available() {
            return crate::sgemm_avx2::sgemm_thin(
                m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc,
            );
        }
        sgemm_thin(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }

    #[test]
    fn low_rank_terms_summed_in_the_tiles_match_a_naive_sum_on_every_split() {
        use crate::gemm::LowRankPart;
        use ndarray::{Array2, ShapeBuilder};
        if !low_rank_available() {
            return;
        }
        // (m, k, n): edge row panels, one and several k blocks, a last column panel outside
        // the parts, row and column splits (at n = 700 the dynamic split's 128-column chunks
        // end inside the second part), a row-major A packed (≥ 2²⁶ multiply-adds, n ≥ 256);
        // each with A row-major and column-major (read in place where k ≤ 256).
        for (m, k, n) in [
            (13, 20, 96),
            (100, 385, 130),
            (37, 1, 128),
            (300, 800, 160),
            (40, 64, 700),
            (300, 800, 300),
        ] {
            let (a, b) = operands(m, k, n);
            let (a, b) = (
                Array2::from_shape_vec((m, k), a).unwrap(),
                Array2::from_shape_vec((k, n), b).unwrap(),
            );
            let bias: Vec<f32> = (0..n).map(|j| (j % 5) as f32 * 0.25 - 0.5).collect();
            let residual =
                Array2::from_shape_fn((m, n + 3), |(i, j)| ((i * 7 + j) % 13) as f32 * 0.3 - 1.7);
            // u with rows 9 apart (8 columns used), v₁ row-major, v₂ column-major (Bᵀ).
            let u_store =
                Array2::from_shape_fn((m, 9), |(i, j)| ((i * 3 + j * 5) % 7) as f32 * 0.2 - 0.6);
            let u = u_store.slice(ndarray::s![.., 1..9]);
            let v1 = Array2::from_shape_fn((3, 32), |(p, j)| ((p * 11 + j) % 9) as f32 * 0.1 - 0.4);
            let v2_width = if n >= 400 { 160 } else { 64 };
            let v2 = Array2::from_shape_fn((5, v2_width).f(), |(p, j)| {
                ((p + j * 3) % 8) as f32 * 0.1 - 0.3
            });
            let parts = [
                LowRankPart {
                    v: v1.view(),
                    start: 0,
                    u_from: 0,
                    scale: 0.5,
                },
                LowRankPart {
                    v: v2.view(),
                    start: n - n % 32 - v2_width,
                    u_from: 3,
                    scale: -2.0,
                },
            ];
            let mut want = naive(m, k, n, a.as_slice().unwrap(), b.as_slice().unwrap());
            for (i, row) in want.chunks_mut(n).enumerate() {
                for (j, value) in row.iter_mut().enumerate() {
                    *value += bias[j] as f64;
                    for part in &parts {
                        let (rank, width) = part.v.dim();
                        if (part.start..part.start + width).contains(&j) {
                            let term: f64 = (0..rank)
                                .map(|p| {
                                    u[[i, part.u_from + p]] as f64
                                        * part.v[[p, j - part.start]] as f64
                                })
                                .sum();
                            *value += part.scale as f64 * term;
                        }
                    }
                }
            }
            let a_t = a.t().to_owned();
            let splits = [(1, false), (2, false), (3, false), (2, true), (3, true)];
            for ((threads, dynamic), a) in splits
                .into_iter()
                .flat_map(|s| [(s, a.view()), (s, a_t.t())])
            {
                for with_bias in [true, false] {
                    let try_run = |epilogue: Epilogue<f32>| {
                        let mut c = vec![f32::NAN; m * n];
                        let done = crate::gemm::tests::on_threads(threads, || unsafe {
                            low_rank(
                                a,
                                b.view(),
                                with_bias.then_some(&bias[..]),
                                LowRankU::Given(u),
                                &parts,
                                epilogue,
                                c.as_mut_ptr(),
                                (n as isize, 1),
                                threads,
                                dynamic,
                            )
                        });
                        done.then_some(c)
                    };
                    let run = |epilogue| try_run(epilogue).expect("the fused kernel runs");
                    let c = run(Epilogue::None);
                    // A residual (rows 3 floats longer than n) gives the bits of adding it to
                    // the finished output ...
                    let onto = run(Epilogue::Residual(residual.slice(ndarray::s![.., ..n])));
                    for (i, (&got, &plain)) in onto.iter().zip(&c).enumerate() {
                        let want = plain + residual[[i / n, i % n]];
                        assert_eq!(got.to_bits(), want.to_bits(), "{m}×{k}×{n} at {i}");
                    }
                    // ... and GELU the bits of the gelu op's pass over it, with and without
                    // its derivative (the AVX2 kernel declines GELU).
                    let mut derivative = vec![f32::NAN; m * n];
                    let activated = try_run(Epilogue::Gelu(Some(derivative.as_mut_ptr())));
                    let activated_only = try_run(Epilogue::Gelu(None));
                    let (Some(activated), Some(activated_only)) = (activated, activated_only)
                    else {
                        assert!(!available());
                        continue;
                    };
                    for (i, &plain) in c.iter().enumerate() {
                        let (y, d) = crate::ops::gelu_and_derivative(plain);
                        let got = [activated[i], activated_only[i], derivative[i]];
                        assert_eq!(
                            got.map(f32::to_bits),
                            [y, y, d].map(f32::to_bits),
                            "{m}×{k}×{n} at {i}"
                        );
                    }
                    let worst = c
                        .iter()
                        .zip(&want)
                        .enumerate()
                        .map(|(i, (&got, &want))| {
                            let want = want - if with_bias { 0.0 } else { bias[i % n] as f64 };
                            (got as f64 - want).abs() / (1.0 + want.abs())
                        })
                        .fold(0.0, f64::max);
                    let a_cols = a.strides()[0] == 1;
                    assert!(
                        worst < 1e-5,
                        "{m}×{k}×{n} (A column-major {a_cols}) on {threads} threads (dynamic {dynamic}): {worst}"
                    );
                }
            }
        }
        // Where the kernel does not apply it does nothing: a part off a panel boundary,
        // overlapping parts, k = 0 ...
        let (a, b) = (Array2::<f32>::ones((40, 8)), Array2::<f32>::ones((8, 96)));
        let (u, v) = (Array2::<f32>::ones((40, 2)), Array2::<f32>::ones((1, 32)));
        let part = |start, u_from| LowRankPart {
            v: v.view(),
            start,
            u_from,
            scale: 1.0,
        };
        let mut c = vec![0.0f32; 40 * 96];
        // ... and a residual whose rows are not contiguous.
        let strided = Array2::<f32>::ones((96, 40));
        for (parts, epilogue) in [
            (vec![part(16, 0)], Epilogue::None),
            (vec![part(32, 0), part(32, 1)], Epilogue::None),
            (vec![part(32, 0)], Epilogue::Residual(strided.t())),
        ] {
            let done = unsafe {
                low_rank(
                    a.view(),
                    b.view(),
                    None,
                    LowRankU::Given(u.view()),
                    &parts,
                    epilogue,
                    c.as_mut_ptr(),
                    (96, 1),
                    1,
                    false,
                )
            };
            assert!(!done);
        }
        let empty = Array2::<f32>::ones((40, 0));
        let done = unsafe {
            low_rank(
                empty.view(),
                Array2::<f32>::ones((0, 96)).view(),
                None,
                LowRankU::Given(u.view()),
                &[part(0, 0)],
                Epilogue::None,
                c.as_mut_ptr(),
                (96, 1),
                1,
                false,
            )
        };
        assert!(!done && c.iter().all(|&x| x == 0.0));
        let _ = empty;
    }

    #[test]
    fn u_made_inside_the_product_gives_the_bits_of_u_made_first() {
        use crate::gemm::LowRankPart;
        use ndarray::Array2;
        if !low_rank_available() {
            return;
        }
        // (m, k, n, threads): one thread, two and three row parts (edge panels), k over one
        // block; rank 16 (q and v of rank 8) and 5.
        for (m, k, n, threads, rank) in [
            (40, 64, 96, 1, 16),
            (301, 70, 128, 2, 16),
            (100, 800, 64, 3, 5),
        ] {
            let (a, b) = operands(m, k, n);
            let (a, b) = (
                Array2::from_shape_vec((m, k), a).unwrap(),
                Array2::from_shape_vec((k, n), b).unwrap(),
            );
            let a_rows =
                Array2::from_shape_fn((rank, k), |(p, j)| ((p * 5 + j) % 11) as f32 * 0.1 - 0.5);
            let v =
                Array2::from_shape_fn((rank, 32), |(p, j)| ((p + 3 * j) % 7) as f32 * 0.2 - 0.6);
            let parts = [LowRankPart {
                v: v.view(),
                start: 32,
                u_from: 0,
                scale: 0.5,
            }];
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
            let mut u_first = vec![f32::NAN; m * rank];
            unsafe {
                thin(
                    m,
                    k,
                    rank,
                    1.0,
                    a.as_ptr(),
                    k as isize,
                    1,
                    a_rows.as_ptr(),
                    1,
                    k as isize,
                    0.0,
                    u_first.as_mut_ptr(),
                    rank as isize,
                    1,
                )
            };
            let u_first = Array2::from_shape_vec((m, rank), u_first).unwrap();
            let run_with = |u: LowRankU<f32>, parts: &[LowRankPart<f32>]| {
                let mut c = vec![f32::NAN; m * n];
                let done = crate::gemm::tests::on_threads(threads, || unsafe {
                    low_rank(
                        a.view(),
                        b.view(),
                        Some(&bias),
                        u,
                        parts,
                        Epilogue::None,
                        c.as_mut_ptr(),
                        (n as isize, 1),
                        threads,
                        false,
                    )
                });
                assert!(done, "{m}×{k}×{n}");
                c
            };
            let run = |u: LowRankU<f32>| run_with(u, &parts);
            let want = run(LowRankU::Given(u_first.view()));
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            // v column-major (LoRA's Bᵀ as a view of B) and with neither stride 1: each layout
            // is packed by its own loop, into the same panels.
            let v_columns = v.t().as_standard_layout().into_owned();
            let v_spread = Array2::from_shape_fn((rank, 64), |(p, j)| v[[p, j / 2]]);
            for v_other in [v_columns.t(), v_spread.slice(ndarray::s![.., ..;2])] {
                let other = [LowRankPart {
                    v: v_other,
                    ..parts[0]
                }];
                let got = run_with(LowRankU::Given(u_first.view()), &other);
                assert_eq!(bits(&got), bits(&want), "v strides {:?}", v_other.strides());
            }
            // A whole, and in two blocks of rows (LoRA's A_q and A_v, each read in place):
            // each block of u's columns has the bits of those columns of u made first.
            for blocks in [vec![(0, rank)], vec![(0, rank / 2), (rank / 2, rank)]] {
                let ats: Vec<_> = blocks
                    .iter()
                    .map(|&(from, to)| a_rows.slice(ndarray::s![from..to, ..]).reversed_axes())
                    .collect();
                let mut u_made = vec![f32::NAN; m * rank];
                let got = run(LowRankU::Computed {
                    ats: &ats,
                    out: u_made.as_mut_ptr(),
                });
                let case = format!("{m}×{k}×{n} on {threads}, {} blocks", blocks.len());
                assert_eq!(bits(&got), bits(&want), "{case}");
                assert_eq!(
                    bits(&u_made),
                    bits(u_first.as_slice().unwrap()),
                    "u, {case}"
                );
            }
        }
        // It declines (doing nothing) for shrinking chunks, column parts and ranks over 16.
        let (a, b) = (Array2::<f32>::ones((40, 8)), Array2::<f32>::ones((8, 96)));
        let wide = Array2::<f32>::ones((17, 8));
        let mut u = vec![0.0f32; 40 * 17];
        let mut c = vec![0.0f32; 40 * 96];
        for (at, threads, dynamic) in [
            (wide.slice(ndarray::s![..2, ..]), 1, true),
            (wide.slice(ndarray::s![..2, ..]), 2, false),
            (wide.view(), 1, false),
        ] {
            let ats = [at.t()];
            let done = unsafe {
                low_rank(
                    a.view(),
                    b.view(),
                    None,
                    LowRankU::Computed {
                        ats: &ats,
                        out: u.as_mut_ptr(),
                    },
                    &[],
                    Epilogue::None,
                    c.as_mut_ptr(),
                    (96, 1),
                    threads,
                    dynamic,
                )
            };
            assert!(!done);
        }
        assert!(u.iter().chain(&c).all(|&x| x == 0.0));
    }

    #[test]
    fn the_parallel_driver_gives_the_serial_bits_for_every_split_and_thread_count() {
        if !available() {
            return;
        }
        // (m, k, n, A column-major, B column-major): row splits with B shared (row- and
        // column-major B), column splits with A read in place and with A packed and shared
        // (column- and row-major A);
        // edges that leave partial panels, several k blocks, and more rows than one MC block.
        let cases = [
            (300, 200, 150, false, false),
            (301, 800, 97, false, true),
            (130, 70, 1000, false, false),
            (97, 385, 700, true, false),
            (250, 64, 2100, true, true),
            (1200, 40, 33, true, false),
            // Row-major A packed: by each thread (row split) and shared (column split).
            (301, 801, 280, false, false),
            (260, 801, 700, false, true),
        ];
        for (m, k, n, a_cols, b_cols) in cases {
            let (a, b) = operands(m, k, n);
            let (rsa, csa) = if a_cols {
                (1, m as isize)
            } else {
                (k as isize, 1)
            };
            let (rsb, csb) = if b_cols {
                (1, k as isize)
            } else {
                (n as isize, 1)
            };
            let start: Vec<f32> = (0..m * n).map(|i| (i % 3) as f32).collect();
            let mut serial = start.clone();
            unsafe {
                sgemm(
                    m,
                    k,
                    n,
                    1.5,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    0.5,
                    serial.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
            for threads in [1, 2, 3] {
                let mut parallel = start.clone();
                let done = crate::gemm::tests::on_threads(threads, || unsafe {
                    sgemm_parallel(
                        m,
                        k,
                        n,
                        1.5,
                        a.as_ptr(),
                        rsa,
                        csa,
                        b.as_ptr(),
                        rsb,
                        csb,
                        0.5,
                        parallel.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                });
                assert!(done);
                assert!(
                    serial
                        .iter()
                        .zip(&parallel)
                        .all(|(s, p)| s.to_bits() == p.to_bits()),
                    "{m}×{k}×{n} (A col-major {a_cols}, B col-major {b_cols}) on {threads} threads"
                );
            }
        }
    }
}
