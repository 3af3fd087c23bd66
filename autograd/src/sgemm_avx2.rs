//! f32 products on x86-64 CPUs with AVX2 and FMA but not AVX-512 (Zen 1–3, Intel client chips
//! before Ice Lake). Three kernels, all computing each element of C as one in-order FMA chain
//! over k (in blocks of 256 steps for [`sgemm`]), then `α·sum + β·c`:
//!
//! * [`sgemm`]: BLIS-style blocking around a 6×16 micro-kernel. matrixmultiply's AVX2 kernel
//!   is 8×8: each step over k loads one vector of B and broadcasts eight values of A for eight
//!   FMAs. Here each step loads two vectors of B (16 columns) and broadcasts six values of A
//!   for twelve FMAs into twelve accumulators (the shape OpenBLAS and BLIS use on these
//!   cores). [`sgemm_parallel`] is its two-thread driver: the operand every part of C reads
//!   whole is packed once, by all threads, into one buffer, and the threads take shrinking
//!   chunks of rows (or columns) of C from a counter — the same bits as [`sgemm`]. On one
//!   thread this kernel is only 1.05–1.1× matrixmultiply; the driver is what pays: GPT-2's
//!   LoRA step ran 1.16× faster with both than with matrixmultiply in fixed halves
//!   (`docs/BENCHMARKS.md`, session 27).
//!
//! ```text
//! jc: NC columns of B/C     pack B[pc.., jc..] into 16-column panels (kc × 16 each)
//!   pc: KC steps of k
//!     ic: MC rows of A/C    pack A[ic.., pc..] into 6-row panels (kc × 6 each), in L2
//!       jr: 16-col panel    one B panel (16 KiB at kc = 256) stays in L1
//!         ir: 6-row panel   micro-kernel: C[6×16] ← α·Apanel·Bpanel + β·C
//! ```
//!   Panels are zero-padded at the edges; an edge tile runs the kernel for exactly its rows
//!   and writes only its valid columns. β applies on the first k block only; with β = 0, C is never read, so it
//!   may be uninitialised memory. A transposed operand is packed through 8×8 in-register
//!   transposes. Products under 2²⁶ multiply-adds whose A has a stride of 1 skip A's packing:
//!   each tile broadcasts from A in place, running the kernel for exactly its rows.
//! * [`sgemm_bias`] and [`sgemm_low_rank`]: the same kernel with a linear's bias added as the
//!   first k block's tiles are stored, and LoRA's low-rank terms (u's r values against the
//!   part's scale·Bᵀ, as r more steps of the last k block) and a residual added before the
//!   last ones are: a LoRA forward or a layer's output projection writes its output once.
//! * [`sgemm_thin`]: products at most 16 wide (or tall, as Cᵀ = Bᵀ·Aᵀ) — LoRA's rank side
//!   (x·Aᵀ, ∂u = G·B, ∂A, ∂B), where copying the wide operand into a packing buffer would cost
//!   as much as the multiply-adds: that operand is read in place.
//! * [`sgemm_shallow`]: products at most 16 deep — LoRA's rank-r updates of a wide output —
//!   C swept once, row by row.

use std::arch::x86_64::*;
use std::cell::RefCell;

use crate::sgemm_avx512::{lines as floats, Line, Tail, TailSteps, TileFinish};

/// Rows of the micro-tile.
const MR: usize = 6;
/// Columns of the micro-tile (two 8-lane vectors).
const NR: usize = 16;
/// Steps of k per packed block: a 16 KiB B panel in a 32 KiB L1.
const KC: usize = 256;
/// Rows of A per packed block (a multiple of MR): 144 × 256 × 4 B = 144 KiB of a 512 KiB L2.
const MC: usize = 144;
/// Columns of B per packed block (a multiple of NR): 256 × 2048 × 4 B = 2 MiB, in L3.
const NC: usize = 2048;

/// Whether these kernels run here: the process's vector width ([`crate::simd::width`]) is
/// AVX2 (so not on AVX-512 machines, which have [`crate::sgemm_avx512`]), and they are not
/// switched off with `TAPELORA_GEMM=matrixmultiply` (for timing against matrixmultiply).
pub fn available() -> bool {
    use std::sync::OnceLock;
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        std::env::var("TAPELORA_GEMM").as_deref() != Ok("matrixmultiply")
            && crate::simd::width() == crate::simd::Width::Avx2
            && supported()
    })
}

/// Whether the CPU has what the kernels need (AVX2 and FMA), whatever the process chose.
pub fn supported() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

thread_local! {
    /// Per-thread buffers (rows of A or parked sums; lines of B), reused across calls;
    /// 64-byte aligned lines.
    static BUFFERS: RefCell<(Vec<Line>, Vec<Line>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

pub const THIN_MAX: usize = 16;

/// Most rows a thin product with at least 32 columns takes on the thin kernel; from 9 rows
/// the 6×16 kernel is quicker there (one thread, fastest of 200 alternated calls: 10 × 768 ×
/// 3072 2.7×, 16 × 768 × 2304 1.6×, 16 × 1024 × 768 1.17×; 8 rows 0.78–0.96×, so 8 stay).
pub const THIN_ONLY_MAX_ROWS: usize = 8;

/// Whether [`sgemm`] takes a product of this shape: at least one full tile each way (smaller
/// ones waste most of a padded tile), and some depth.
pub fn takes(m: usize, k: usize, n: usize) -> bool {
    m >= MR && n >= NR && k > 0
}

/// `c ← α·a·b + β·c` with element strides, like matrixmultiply's `sgemm`; with β = 0, `c` is
/// not read.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`supported`]); [`takes`] must hold; the pointers and
/// strides must describe valid `m × k`, `k × n` and `m × n` matrices, `c` aliasing neither
/// input and no two of its elements at one address.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    let out = Output::plain(alpha, beta, c, rsc, csc);
    sgemm_into(m, k, n, a, rsa, csa, b, rsb, csb, &out)
}

/// [`sgemm`] into `out`, with its bias, low-rank terms and epilogue.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn sgemm_into(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    out: &Output,
) {
    debug_assert!(takes(m, k, n));
    BUFFERS.with(|buffers| {
        let (a_buffer, b_buffer) = &mut *buffers.borrow_mut();
        let kc_most = k.min(KC);
        let packed_a = floats(a_buffer, MC.min(m.next_multiple_of(MR)) * kc_most);
        let packed_b = floats(b_buffer, NC.min(n.next_multiple_of(NR)) * kc_most);
        let in_place = reads_a_in_place(m, k, n, rsa, csa);
        let width = n.next_multiple_of(NR);
        let frozen = frozen_panels(k, n, b, rsb, csb);
        for jc in (0..n).step_by(NC) {
            let nc = NC.min(n - jc);
            for pc in (0..k).step_by(KC) {
                let kc = KC.min(k - pc);
                let packed_b = match &frozen {
                    // Block (jc, pc) of B whole-packed: its first panel.
                    Some(panels) => panels.as_ptr().add(pc * width + jc * kc),
                    None => {
                        pack_b(
                            kc,
                            nc,
                            b.offset(pc as isize * rsb + jc as isize * csb),
                            rsb,
                            csb,
                            packed_b,
                        );
                        packed_b.cast_const()
                    }
                };
                for ic in (0..m).step_by(MC) {
                    let mc = MC.min(m - ic);
                    if in_place {
                        for jr in (0..nc).step_by(NR) {
                            let panel_b = packed_b.add(jr * kc);
                            for ir in (0..mc).step_by(MR) {
                                let (row, col) = (ic + ir, jc + jr);
                                let (tail, tile) = out.tile(row, col, m, n, pc, kc, k);
                                let a = a.offset(row as isize * rsa + pc as isize * csa);
                                kernel_for_rows(kc, a, rsa, csa, panel_b, tail, tile);
                            }
                        }
                        continue;
                    }
                    pack_a(
                        mc,
                        kc,
                        a.offset(ic as isize * rsa + pc as isize * csa),
                        rsa,
                        csa,
                        packed_a,
                    );
                    for jr in (0..nc).step_by(NR) {
                        let panel_b = packed_b.add(jr * kc);
                        for ir in (0..mc).step_by(MR) {
                            let (tail, tile) = out.tile(ic + ir, jc + jr, m, n, pc, kc, k);
                            kernel(kc, packed_a.add(ir * kc), panel_b, tail, tile);
                        }
                    }
                }
            }
        }
    })
}

/// Where a product's C goes and what is added on the way: `c ← α·a·b + β·c`, plus, as the
/// tiles are stored, a bias row (on the first k block), and low-rank terms and an epilogue
/// ([`Tail`], on the last k block). C's element (i, j) of this call is (i, j) + `origin` of
/// the whole product the tail describes (a part of it, on one thread).
#[derive(Clone, Copy)]
struct Output<'t> {
    alpha: f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    /// This call's columns of the bias row, or null.
    bias: *const f32,
    tail: Option<&'t Tail>,
    origin: (usize, usize),
}

// SAFETY: the threads of a product write disjoint tiles of C and only read the rest.
unsafe impl Send for Output<'_> {}
unsafe impl Sync for Output<'_> {}

impl Output<'_> {
    fn plain(alpha: f32, beta: f32, c: *mut f32, rsc: isize, csc: isize) -> Output<'static> {
        Output {
            alpha,
            beta,
            c,
            rsc,
            csc,
            bias: std::ptr::null(),
            tail: None,
            origin: (0, 0),
        }
    }

    /// The tile at C[row, col] of an `m × n` call, for the k block of `kc` steps from `pc`
    /// (of `k`), with its extra steps.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn tile(
        &self,
        row: usize,
        col: usize,
        m: usize,
        n: usize,
        pc: usize,
        kc: usize,
        k: usize,
    ) -> (TailSteps, Tile) {
        let first = pc == 0;
        let mut tile = Tile {
            c: self
                .c
                .offset(row as isize * self.rsc + col as isize * self.csc),
            rsc: self.rsc,
            csc: self.csc,
            rows: MR.min(m - row),
            cols: NR.min(n - col),
            alpha: self.alpha,
            beta: if first { self.beta } else { 1.0 },
            bias: if first && !self.bias.is_null() {
                self.bias.add(col)
            } else {
                std::ptr::null()
            },
            finish: TileFinish::NONE,
        };
        let steps = match self.tail {
            Some(tail) if pc + kc == k => {
                let (row, col) = (row + self.origin.0, col + self.origin.1);
                tile.finish = tail.finish_at(row, col);
                tail.steps_at(row, col)
            }
            _ => TailSteps::NONE,
        };
        (steps, tile)
    }

    /// This output with low-rank terms and an epilogue.
    fn with_tail<'t>(&self, tail: &'t Tail) -> Output<'t> {
        Output {
            tail: Some(tail),
            ..*self
        }
    }

    /// The same output from row `row` and column `col` of this one on.
    unsafe fn from(&self, row: usize, col: usize) -> Self {
        let mut moved = *self;
        moved.c = self
            .c
            .offset(row as isize * self.rsc + col as isize * self.csc);
        if !self.bias.is_null() {
            moved.bias = self.bias.add(col);
        }
        moved.origin = (self.origin.0 + row, self.origin.1 + col);
        moved
    }
}

/// `c ← a·b + bias` (the bias row added to every row of C as each tile of the first k block
/// is stored): a linear's forward, with the bits of writing the bias rows first and then
/// accumulating the product onto them (`1·sum + 1·bias` is `sum + bias`).
///
/// # Safety
/// As for [`sgemm`], and `bias` points at `n` values.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    let out = Output {
        bias,
        ..Output::plain(1.0, 0.0, c, rsc, csc)
    };
    sgemm_into(m, k, n, a, rsa, csa, b, rsb, csb, &out)
}

/// [`crate::sgemm_avx512::sgemm_low_rank`] on the 6×16 kernel: `c ← a·b + bias + Σ parts`
/// (+ a residual) into a row-major `m × n` output, each tile of a low-rank part taking u's r
/// values of its rows against the part's scale·v as r more steps of its last k block before
/// it is stored, and the bias and residual added as it is stored. Parts must start and end on
/// multiples of 32 columns (the check shared with the AVX-512 kernel; GPT-2's widths are
/// multiples of 64). Returns `false`, doing nothing, where it does not apply: as the
/// AVX-512 one, a product under one tile, and GELU — applied in the store it made the
/// nanogpt-cpu full step 1.7–2.2 % slower than the gelu op's separate pass (steps alternated
/// in one process), where the low-rank terms and the residual made it 0–1 % quicker.
///
/// # Safety
/// [`available`] returned true; `c` is a row-major `m × n` output that aliases none of the
/// inputs (it is written, never read, so it may be uninitialised).
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_low_rank(
    a: ndarray::ArrayView2<f32>,
    b: ndarray::ArrayView2<f32>,
    bias: Option<&[f32]>,
    u: crate::gemm::LowRankU<f32>,
    parts: &[crate::gemm::LowRankPart<f32>],
    epilogue: crate::gemm::Epilogue<f32>,
    c: *mut f32,
    threads: usize,
    dynamic: bool,
) -> bool {
    use crate::sgemm_avx512::{for_each_fixed_part, low_rank_setup};
    let ((m, k), n) = (a.dim(), b.ncols());
    if !takes(m, k, n) || matches!(epilogue, crate::gemm::Epilogue::Gelu(_)) {
        return false;
    }
    let Some((spec, make_u)) = low_rank_setup(a, b, bias, u, parts, epilogue, threads, dynamic)
    else {
        return false;
    };
    let ([rsa, csa], [rsb, csb]) = (
        [0, 1].map(|i| a.strides()[i]),
        [0, 1].map(|i| b.strides()[i]),
    );
    let (a, b) = (Shared(a.as_ptr()), Shared(b.as_ptr()));
    let plain = Output {
        bias: bias.map_or(std::ptr::null(), |bias| bias.as_ptr()),
        ..Output::plain(1.0, 0.0, c, n as isize, 1)
    };
    if dynamic {
        let (_panels, tail) = spec.pack(NR);
        let out = plain.with_tail(&tail);
        if sgemm_parallel_into(m, k, n, a.get(), rsa, csa, b.get(), rsb, csb, &out) {
            return true;
        }
    }
    // Each part packs the low-rank panels for itself, after the split (as on AVX-512).
    let run_part = |rows: std::ops::Range<usize>, cols: std::ops::Range<usize>| {
        let (_panels, tail) = spec.pack(NR);
        if let Some(maker) = &make_u {
            maker.rows(rows.clone());
        }
        let out = plain.with_tail(&tail).from(rows.start, cols.start);
        sgemm_into(
            rows.len(),
            k,
            cols.len(),
            a.get().offset(rows.start as isize * rsa),
            rsa,
            csa,
            b.get().offset(cols.start as isize * csb),
            rsb,
            csb,
            &out,
        );
    };
    for_each_fixed_part(m, n, threads, NR, run_part);
    true
}

/// Products under this many multiply-adds read A in place (when it has a stride of 1).
const IN_PLACE_MAX_MACS: usize = 1 << 26;
/// Deepest product whose column-major A is read in place (each step of k is a new line).
const COLUMNS_IN_PLACE_MAX_K: usize = 512;

/// Whether [`sgemm`] reads A in place rather than packing it: a small product whose A has a
/// stride of 1 either way. A row-major tile broadcasts from its rows side by side, a
/// column-major one from six neighbouring floats per step — what a packed panel holds. At
/// nanogpt-cpu's sizes, packing cost as much as a few tiles' work: in place, attention's
/// per-head products ran 1.10–1.26× and its linears' 1.00–1.09× (alternated in one process),
/// and `lora-vs-full` went from 0.712–0.718 to 0.695–0.699 (`docs/BENCHMARKS.md`, session 28).
fn reads_a_in_place(m: usize, k: usize, n: usize, rsa: isize, csa: isize) -> bool {
    m * k * n < IN_PLACE_MAX_MACS && (csa == 1 || (rsa == 1 && k <= COLUMNS_IN_PLACE_MAX_K))
}

/// Most floats of an operand packed once for all threads of a [`sgemm_parallel`] (64 MiB):
/// GPT-2's weights and activations fit; the tied lm_head's wte (38.6 M floats) does not.
const SHARED_PACK_MAX_FLOATS: usize = 16 << 20;
/// Fewest rows / columns of C a thread takes at a time in a parallel product (four panels).
const CHUNK_MIN_ROWS: usize = 4 * MR;
const CHUNK_MIN_COLS: usize = 4 * NR;

/// A pointer handed to the pool's threads; what each may touch through it is said where it
/// is used.
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: only raw pointers are wrapped, and every use says why the threads' accesses are
// disjoint or read-only.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The pointer (a method, so that closures capture the whole wrapper, not its field).
    fn get(self) -> T {
        self.0
    }
}

thread_local! {
    /// The calling thread's buffer for the operand a [`sgemm_parallel`] packs once.
    static SHARED_PACK: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
}

/// [`sgemm`] on all threads of rayon's pool, with [`sgemm`]'s bits (every element of C is
/// still one micro-kernel's sum over the same k blocks, in the same order). Returns `false`,
/// doing nothing, when [`takes`] does not hold or the operand to share would be larger than
/// 64 MiB.
///
/// The operand every chunk reads whole — B when rows are split (`m ≥ n`), A when columns
/// are — is packed once, by all threads, into one buffer; then the threads take chunks of
/// rows (or columns) of C from a shared counter, shrinking ones (half of each thread's share
/// of what is left, down to four panels), each packing its part of the other operand, so a
/// core slowed by another process hands its work to the other instead of holding it up.
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
    let out = Output::plain(alpha, beta, c, rsc, csc);
    sgemm_parallel_into(m, k, n, a, rsa, csa, b, rsb, csb, &out)
}

/// [`sgemm_parallel`] into `out`, with its bias, low-rank terms and epilogue.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_parallel_into(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    out: &Output,
) -> bool {
    use rayon::prelude::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if !takes(m, k, n) {
        return false;
    }
    let split_rows = m >= n;
    // The shared operand's padded width (B's columns or A's rows) and the panel it is cut in.
    let (width, panel) = if split_rows {
        (n.next_multiple_of(NR), NR)
    } else {
        (m.next_multiple_of(MR), MR)
    };
    if width * k > SHARED_PACK_MAX_FLOATS {
        return false;
    }
    let threads = rayon::current_num_threads().max(1);
    // A frozen weight's B is packed already, in this layout.
    let frozen = if split_rows {
        frozen_panels(k, n, b, rsb, csb)
    } else {
        None
    };
    // Taken out of the cell while in use: a product this thread runs in the meantime (rayon
    // may hand it one while it waits) finds the cell empty and packs into its own buffer.
    let mut buffer = SHARED_PACK.take();
    let packed = match &frozen {
        Some(panels) => Shared(panels.as_ptr()),
        None => Shared(floats(&mut buffer, width * k).cast_const()),
    };
    let (a, b) = (Shared(a), Shared(b));
    // Block pc (KC steps from `pc`) of the shared operand starts at `pc·width`, its panel
    // from column (row) `j` at `pc·width + j·kc`.
    let groups: Vec<(usize, usize)> = if frozen.is_some() {
        Vec::new()
    } else {
        (0..k)
            .step_by(KC)
            .flat_map(|pc| (0..width).step_by(16 * panel).map(move |j| (pc, j)))
            .collect()
    };
    groups.par_iter().for_each(|&(pc, j)| {
        let kc = KC.min(k - pc);
        let out = packed.get().add(pc * width + j * kc).cast_mut();
        // SAFETY: each group writes its own panels of the buffer (ours, not a frozen weight's:
        // there are no groups then); the operands are read.
        if split_rows {
            let cols = (16 * panel).min(n - j.min(n));
            if cols > 0 {
                pack_b(
                    kc,
                    cols,
                    b.get().offset(pc as isize * rsb + j as isize * csb),
                    rsb,
                    csb,
                    out,
                );
            }
        } else {
            let rows = (16 * panel).min(m - j.min(m));
            if rows > 0 {
                pack_a(
                    rows,
                    kc,
                    a.get().offset(j as isize * rsa + pc as isize * csa),
                    rsa,
                    csa,
                    out,
                );
            }
        }
    });
    // Chunks of whole tiles: rows in 6s, columns in 16s (a column chunk cut mid-tile would
    // end on an edge tile, and a tile would straddle a low-rank part's edge).
    let (len, least, most, tile) = if split_rows {
        (m, CHUNK_MIN_ROWS, MC, MR)
    } else {
        (n, CHUNK_MIN_COLS, NC, NR)
    };
    let next = AtomicUsize::new(0);
    // Hands out [start, end) of what is left, in shrinking chunks.
    let take = || loop {
        let start = next.load(Ordering::Relaxed);
        if start >= len {
            return None;
        }
        let share = (len - start).div_ceil(2 * threads).next_multiple_of(tile);
        let end = (start + share.clamp(least, most)).min(len);
        if next
            .compare_exchange(start, end, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            return Some(start..end);
        }
    };
    (0..threads).into_par_iter().for_each(|_| {
        while let Some(chunk) = take() {
            // SAFETY: each chunk writes its own rows (columns) of C; the shared buffer is
            // only read now (every group was packed before this loop began).
            if split_rows {
                let a = a.get().offset(chunk.start as isize * rsa);
                let out = out.from(chunk.start, 0);
                rows_chunk(chunk.len(), k, n, a, rsa, csa, packed.get(), width, &out);
            } else {
                let b = b.get().offset(chunk.start as isize * csb);
                let out = out.from(0, chunk.start);
                columns_chunk(chunk.len(), m, k, packed.get(), width, b, rsb, csb, &out);
            }
        }
    });
    SHARED_PACK.set(buffer);
    true
}

/// `mc` rows of C (at most [`MC`]) from A read in place and B packed whole (`packed_b`).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_chunk(
    mc: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    packed_b: *const f32,
    width: usize,
    out: &Output,
) {
    BUFFERS.with(|buffers| {
        let (a_buffer, _) = &mut *buffers.borrow_mut();
        let packed_a = floats(a_buffer, mc.next_multiple_of(MR) * k.min(KC));
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_a(mc, kc, a.offset(pc as isize * csa), rsa, csa, packed_a);
            for jr in (0..n).step_by(NR) {
                let panel_b = packed_b.add(pc * width + jr * kc);
                for ir in (0..mc).step_by(MR) {
                    let (tail, tile) = out.tile(ir, jr, mc, n, pc, kc, k);
                    kernel(kc, packed_a.add(ir * kc), panel_b, tail, tile);
                }
            }
        }
    })
}

/// `nc` columns of C (at most [`NC`]) from A packed whole (`packed_a`) and B read in place.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn columns_chunk(
    nc: usize,
    m: usize,
    k: usize,
    packed_a: *const f32,
    width: usize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    out: &Output,
) {
    BUFFERS.with(|buffers| {
        let (_, b_buffer) = &mut *buffers.borrow_mut();
        let packed_b = floats(b_buffer, nc.next_multiple_of(NR) * k.min(KC));
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b(kc, nc, b.offset(pc as isize * rsb), rsb, csb, packed_b);
            for ic in (0..m).step_by(MC) {
                let mc = MC.min(m - ic);
                for jr in (0..nc).step_by(NR) {
                    let panel_b = packed_b.add(jr * kc);
                    for ir in (ic..ic + mc).step_by(MR) {
                        let (tail, tile) = out.tile(ir, jr, m, nc, pc, kc, k);
                        let panel_a = packed_a.add(pc * width + ir * kc);
                        kernel(kc, panel_a, panel_b, tail, tile);
                    }
                }
            }
        }
    })
}

/// B's panels kept by [`crate::frozen_packs`] when B is a view of a frozen weight: all of B
/// packed as [`sgemm_parallel`] packs it (block `pc` at `pc·width`, the panel from column `j`
/// at `pc·width + j·kc`, `width` = n rounded up to 16), by this call if it is the first.
///
/// # Safety
/// `b`, `rsb`, `csb` describe a readable `k × n` matrix the caller holds for the call.
unsafe fn frozen_panels(
    k: usize,
    n: usize,
    b: *const f32,
    rsb: isize,
    csb: isize,
) -> Option<std::sync::Arc<crate::frozen_packs::Panels>> {
    let width = n.next_multiple_of(NR);
    let key = crate::frozen_packs::Key {
        b: b as usize,
        k,
        n,
        rsb,
        csb,
    };
    crate::frozen_packs::panels(key, width * k, |out| {
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            pack_b(
                kc,
                n,
                b.offset(pc as isize * rsb),
                rsb,
                csb,
                out.add(pc * width),
            );
        }
    })
}

/// Rows of a row-major B that [`pack_b`] copies side by side, left to right across every
/// panel, where B's rows span more than [`PACK_B_STREAM_MIN_FLOATS`]: four sequential streams
/// through B. Panel after panel (sixteen floats from each of `kc` rows in turn) is `kc`
/// streams at once, which the prefetchers do not follow: a 16 × 768 × 3072 product (a
/// prompt's c_fc) read its weight from memory at 3–5 GB/s, and ran 1.4–2× quicker this way
/// (8 rows: 1.5×, 16: 1.3×, 1 and 2: 1.4–1.5×).
const PACK_B_ROWS: usize = 4;

/// A B block whose rows span at most this many floats (a Zen 3 core's 512 KiB L2) is packed
/// panel after panel, as before: such a block is mostly in cache (all of nanogpt-cpu's), where
/// the row order gained nothing (its full step with every block by rows: ≈ 3 % slower, within
/// the machine's noise).
const PACK_B_STREAM_MIN_FLOATS: usize = 1 << 17;

/// Packs `kc × nc` of B into 16-column panels, panel `j` at `out + j·kc` (row `p` of a panel
/// at `16p`), zero past column `nc`.
#[target_feature(enable = "avx2")]
unsafe fn pack_b(kc: usize, nc: usize, b: *const f32, rsb: isize, csb: isize, out: *mut f32) {
    // Row-major B (a weight in the forward) from memory: its full panels [`PACK_B_ROWS`] rows
    // at a time, sixteen contiguous floats of each per panel.
    let streamed = csb == 1 && kc * rsb.unsigned_abs() > PACK_B_STREAM_MIN_FLOATS;
    let row_major_panels = if streamed { nc / NR * NR } else { 0 };
    for p0 in (0..kc).step_by(PACK_B_ROWS) {
        for jp in (0..row_major_panels).step_by(NR) {
            let panel = out.add(jp * kc);
            for p in p0..(p0 + PACK_B_ROWS).min(kc) {
                let row = b.offset(p as isize * rsb).add(jp);
                _mm256_store_ps(panel.add(NR * p), _mm256_loadu_ps(row));
                _mm256_store_ps(panel.add(NR * p + 8), _mm256_loadu_ps(row.add(8)));
            }
        }
    }
    for jp in (row_major_panels..nc).step_by(NR) {
        let cols = NR.min(nc - jp);
        let panel = out.add(jp * kc);
        let src = b.offset(jp as isize * csb);
        if cols == NR && csb == 1 {
            // Row-major B in cache: sixteen contiguous floats per step.
            for p in 0..kc {
                let row = src.offset(p as isize * rsb);
                _mm256_store_ps(panel.add(NR * p), _mm256_loadu_ps(row));
                _mm256_store_ps(panel.add(NR * p + 8), _mm256_loadu_ps(row.add(8)));
            }
        } else if cols == NR && rsb == 1 {
            // Column-major B (Wᵀ in ∂x = G·Wᵀ): 8 × 8 blocks transposed in registers.
            let whole = kc / 8 * 8;
            for half in 0..2 {
                let columns = src.offset(8 * half as isize * csb);
                for p in (0..whole).step_by(8) {
                    let rows = transpose8(std::array::from_fn(|j| {
                        _mm256_loadu_ps(columns.offset(j as isize * csb).add(p))
                    }));
                    for (r, row) in rows.into_iter().enumerate() {
                        _mm256_store_ps(panel.add(NR * (p + r) + 8 * half), row);
                    }
                }
            }
            for j in 0..NR {
                let column = src.offset(j as isize * csb);
                for p in whole..kc {
                    *panel.add(NR * p + j) = *column.add(p);
                }
            }
        } else {
            // An edge, or B with neither stride 1: column by column, each read in order.
            for j in 0..NR {
                if j < cols {
                    let column = src.offset(j as isize * csb);
                    for p in 0..kc {
                        *panel.add(NR * p + j) = *column.offset(p as isize * rsb);
                    }
                } else {
                    for p in 0..kc {
                        *panel.add(NR * p + j) = 0.0;
                    }
                }
            }
        }
    }
}

/// Packs `mc × kc` of A into 6-row panels, panel `i` at `out + i·kc` (step `p` of a panel at
/// `6p`), zero past row `mc`.
#[target_feature(enable = "avx2")]
unsafe fn pack_a(mc: usize, kc: usize, a: *const f32, rsa: isize, csa: isize, out: *mut f32) {
    let six = _mm256_setr_epi32(-1, -1, -1, -1, -1, -1, 0, 0);
    // A step's six floats stored as eight run two floats into the next step's place, which
    // that step then overwrites; the panel's last step stores only its six, so nothing past
    // the panel is touched (threads pack neighbouring panels of one shared buffer).
    let store_step = |panel: *mut f32, p: usize, step: __m256| {
        if p + 1 < kc {
            _mm256_storeu_ps(panel.add(MR * p), step);
        } else {
            _mm256_maskstore_ps(panel.add(MR * p), six, step);
        }
    };
    for ip in (0..mc).step_by(MR) {
        let rows = MR.min(mc - ip);
        let panel = out.add(ip * kc);
        let src = a.offset(ip as isize * rsa);
        if rows == MR && rsa == 1 {
            // Column-major A (Gᵀ in ∂W = Xᵀ·G read as a transpose): six contiguous floats,
            // as one masked load (no read past them).
            for p in 0..kc {
                let column = src.offset(p as isize * csa);
                store_step(panel, p, _mm256_maskload_ps(column, six));
            }
        } else if rows == MR && csa == 1 {
            // Row-major A (activations, incoming gradients): 8 steps of the six rows (and two
            // zero rows) transposed in registers.
            let whole = kc / 8 * 8;
            let zero = _mm256_setzero_ps();
            for p in (0..whole).step_by(8) {
                let steps = transpose8(std::array::from_fn(|i| {
                    if i < MR {
                        _mm256_loadu_ps(src.offset(i as isize * rsa).add(p))
                    } else {
                        zero
                    }
                }));
                for (r, step) in steps.into_iter().enumerate() {
                    store_step(panel, p + r, step);
                }
            }
            for i in 0..MR {
                let row = src.offset(i as isize * rsa);
                for p in whole..kc {
                    *panel.add(MR * p + i) = *row.add(p);
                }
            }
        } else {
            // An edge, or A with neither stride 1: row by row, in order.
            for i in 0..MR {
                if i < rows {
                    let row = src.offset(i as isize * rsa);
                    for p in 0..kc {
                        *panel.add(MR * p + i) = *row.offset(p as isize * csa);
                    }
                } else {
                    for p in 0..kc {
                        *panel.add(MR * p + i) = 0.0;
                    }
                }
            }
        }
    }
}

/// Where a micro-tile's result goes: its corner in C, C's strides, how much of the 6 × 16
/// tile is inside C, and what the store does besides `α·sum + β·c`.
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
    /// What happens to the finished values as the last k block stores them (a residual
    /// added, GELU applied).
    finish: TileFinish,
}

/// `C[tile] ← α·(Apanel·Bpanel + tail) + β·C[tile]` over `kc` steps (C not read when β = 0),
/// then the tile's bias and epilogue.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, tail: TailSteps, tile: Tile) {
    if tile.rows == MR {
        kernel_rows::<MR>(kc, a, 1, MR as isize, b, tail, tile)
    } else {
        // Exactly the tile's rows: no FMAs on the panel's padding, and no reads of u's rows
        // past the matrix by the low-rank steps.
        kernel_for_rows(kc, a, 1, MR as isize, b, tail, tile)
    }
}

/// [`kernel`] on the first `ROWS` rows of A read with any strides (step `p` of row `i` at
/// `a + i·rsa + p·csa`): a packed panel (`1`, `MR`), or A in place (row- or column-major),
/// where rows past the tile's must not be read. The low-rank steps of `tail` continue each
/// element's FMA chain after the k block's.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_rows<const ROWS: usize>(
    kc: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    tail: TailSteps,
    tile: Tile,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; ROWS];
    // The tile's lines of C asked for now, to arrive while the k loop runs (C is read for
    // β ≠ 0 and written in any case; missing it at the store cost large products ≈ 10 %).
    for i in 0..tile.rows {
        let row = tile.c.offset(i as isize * tile.rsc);
        _mm_prefetch::<_MM_HINT_T0>(row.cast());
        _mm_prefetch::<_MM_HINT_T0>(row.offset(15 * tile.csc).cast());
    }
    let rows: [*const f32; ROWS] = std::array::from_fn(|i| a.offset(i as isize * rsa));
    for p in 0..kc {
        let b0 = _mm256_load_ps(b.add(NR * p));
        let b1 = _mm256_load_ps(b.add(NR * p + 8));
        let step = p as isize * csa;
        for (acc, row) in acc.iter_mut().zip(rows) {
            let x = _mm256_broadcast_ss(&*row.offset(step));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    // u's values of each row (row `i`, step `p` at `tail.a + i·rsa + p`) against the packed
    // scale·v panel.
    for p in 0..tail.steps {
        let b0 = _mm256_load_ps(tail.b.add(NR * p));
        let b1 = _mm256_load_ps(tail.b.add(NR * p + 8));
        for (i, acc) in acc.iter_mut().enumerate() {
            let x = _mm256_broadcast_ss(&*tail.a.offset(i as isize * tail.rsa + p as isize));
            acc[0] = _mm256_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(x, b1, acc[1]);
        }
    }
    // The store reads a copy: with `acc` itself borrowed there, the accumulators lived on
    // the stack and the low-rank loop stored all twelve on every step.
    let finished = acc;
    store(&finished, tile);
}

/// [`kernel_rows`] for a tile of `tile.rows` rows.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_for_rows(
    kc: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    tail: TailSteps,
    tile: Tile,
) {
    match tile.rows {
        6 => kernel_rows::<6>(kc, a, rsa, csa, b, tail, tile),
        5 => kernel_rows::<5>(kc, a, rsa, csa, b, tail, tile),
        4 => kernel_rows::<4>(kc, a, rsa, csa, b, tail, tile),
        3 => kernel_rows::<3>(kc, a, rsa, csa, b, tail, tile),
        2 => kernel_rows::<2>(kc, a, rsa, csa, b, tail, tile),
        _ => kernel_rows::<1>(kc, a, rsa, csa, b, tail, tile),
    }
}

/// Writes a finished tile (its first `tile.rows` rows of `acc`): `α·acc + β·c`, then the
/// bias and the residual — each with the bits of the separate pass it replaces. Vector
/// stores along C's rows for whole 16-column tiles of a C with contiguous rows; otherwise
/// element by element. (No GELU: see [`sgemm_low_rank`].)
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn store<const ROWS: usize>(acc: &[[__m256; 2]; ROWS], tile: Tile) {
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
    debug_assert!(!finish.gelu, "sgemm_low_rank declines GELU");
    let alpha = _mm256_set1_ps(alpha);
    if cols == NR && csc == 1 {
        for (i, acc) in acc.iter().enumerate().take(rows) {
            let row = c.offset(i as isize * rsc);
            for (h, &acc) in acc.iter().enumerate() {
                let mut value = _mm256_mul_ps(alpha, acc);
                if beta != 0.0 {
                    let old = _mm256_loadu_ps(row.add(8 * h));
                    value = _mm256_fmadd_ps(_mm256_set1_ps(beta), old, value);
                }
                if !bias.is_null() {
                    value = _mm256_add_ps(value, _mm256_loadu_ps(bias.add(8 * h)));
                }
                if !finish.residual.is_null() {
                    let from = finish
                        .residual
                        .offset(i as isize * finish.rsr + 8 * h as isize);
                    value = _mm256_add_ps(value, _mm256_loadu_ps(from));
                }
                _mm256_storeu_ps(row.add(8 * h), value);
            }
        }
        return;
    }
    let mut local = [[0.0f32; NR]; ROWS];
    for (row, acc) in local.iter_mut().zip(acc) {
        _mm256_storeu_ps(row.as_mut_ptr(), _mm256_mul_ps(alpha, acc[0]));
        _mm256_storeu_ps(row.as_mut_ptr().add(8), _mm256_mul_ps(alpha, acc[1]));
    }
    for (i, row) in local.iter().enumerate().take(rows) {
        for (j, &value) in row.iter().enumerate().take(cols) {
            let out = c.offset(i as isize * rsc + j as isize * csc);
            let mut value = if beta != 0.0 {
                beta.mul_add(*out, value)
            } else {
                value
            };
            if !bias.is_null() {
                value += *bias.add(j);
            }
            if !finish.residual.is_null() {
                value += *finish.residual.offset(i as isize * finish.rsr + j as isize);
            }
            *out = value;
        }
    }
}

/// `c ← α·a·b + β·c` for a product at most [`THIN_MAX`] columns wide — LoRA's rank-r side
/// (x·Aᵀ, ∂u = G·B; ∂A = ∂uᵀ·x with the operands swapped). `b` (k × n) is copied once into
/// k lines of 8 or 16 floats, zero past column n. A row-major `a` (x, G) is read in place,
/// `12/V` rows at a time (`V` vectors per line): each step of k broadcasts one value per row
/// against the step's line. A column-major `a` (Gᵀ, xᵀ) is read in place by columns, eight
/// rows as one vector against the step's eight broadcast values of `b`. Any other layout,
/// and the last rows of the row-major case, go through a small copied panel. matrixmultiply
/// copies all of `a` into its packing buffer first, and on a product this thin that copy
/// costs as much as the multiply-adds. Every element of C is one running sum over k in order
/// (FMAs), then `α·sum + β·c`: the same bits whichever of the two layouts, row split or
/// orientation (`Cᵀ = Bᵀ·Aᵀ`) computes it. With β = 0, `c` is not read.
///
/// # Safety
/// The CPU must support AVX2 and FMA ([`supported`]); `n ≤ THIN_MAX` and `k > 0`; the
/// pointers and strides must describe valid `m × k`, `k × n` and `m × n` matrices, `c`
/// aliasing neither input and no two of its elements at one address.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    debug_assert!(n <= THIN_MAX && k > 0);
    let out = Out {
        alpha,
        beta,
        c,
        rsc,
        csc,
    };
    if n <= 8 {
        thin::<1>(m, k, n, a, rsa, csa, b, rsb, csb, out);
    } else {
        thin::<2>(m, k, n, a, rsa, csa, b, rsb, csb, out);
    }
}

/// Where a thin product's result goes: C's corner and strides, and α, β.
#[derive(Clone, Copy)]
struct Out {
    alpha: f32,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
}

impl Out {
    /// `C[i, j] ← α·value + β·C[i, j]` (C not read when β = 0), in the kernel's rounding.
    unsafe fn write(self, i: usize, j: usize, value: f32) {
        let at = self.c.offset(i as isize * self.rsc + j as isize * self.csc);
        let scaled = self.alpha * value;
        *at = if self.beta != 0.0 {
            self.beta.mul_add(*at, scaled)
        } else {
            scaled
        };
    }
}

/// [`sgemm_thin`] with lines of `V` vectors.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn thin<const V: usize>(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    out: Out,
) {
    let line = 8 * V;
    BUFFERS.with(|buffers| {
        let (a_buffer, b_buffer) = &mut *buffers.borrow_mut();
        let lines = floats(b_buffer, k * line);
        std::ptr::write_bytes(lines, 0, k * line);
        for j in 0..n {
            // Column by column: contiguous reads when b is column-major (Aᵀ, Bᵀ as views).
            for p in 0..k {
                *lines.add(p * line + j) = *b.offset(p as isize * rsb + j as isize * csb);
            }
        }
        if rsa == 1 && csa != 1 {
            let sums = floats(a_buffer, 8 * m.next_multiple_of(8));
            for from in (0..n).step_by(8) {
                let out = Out {
                    c: out.c.offset(from as isize * out.csc),
                    ..out
                };
                let lines = lines.add(from);
                thin_columns(m, k, (n - from).min(8), a, csa, lines, line, sums, out);
            }
            return;
        }
        let rows = 12 / V;
        let in_place = if csa == 1 { m - m % rows } else { 0 };
        for i in (0..in_place).step_by(rows) {
            let out = Out {
                c: out.c.offset(i as isize * out.rsc),
                ..out
            };
            thin_rows::<V>(rows, n, k, a.offset(i as isize * rsa), rsa, lines, out);
        }
        // The rest (or all of a strided `a`) copied into a zero-padded panel of rows.
        let panel = floats(a_buffer, rows * k);
        for i in (in_place..m).step_by(rows) {
            let count = rows.min(m - i);
            for r in 0..rows {
                for p in 0..k {
                    *panel.add(r * k + p) = if r < count {
                        *a.offset((i + r) as isize * rsa + p as isize * csa)
                    } else {
                        0.0
                    };
                }
            }
            let out = Out {
                c: out.c.offset(i as isize * out.rsc),
                ..out
            };
            thin_rows::<V>(count, n, k, panel, k as isize, lines, out);
        }
    })
}

/// `12/V` rows of a thin product from a row-major `a` (rows `rsa` apart), the first `rows`
/// of them written to C (`n` columns).
#[target_feature(enable = "avx2,fma")]
unsafe fn thin_rows<const V: usize>(
    rows: usize,
    n: usize,
    k: usize,
    a: *const f32,
    rsa: isize,
    lines: *const f32,
    out: Out,
) {
    const MOST: usize = 12;
    let r_count = 12 / V;
    let mut acc = [[_mm256_setzero_ps(); V]; MOST];
    for p in 0..k {
        let line: [__m256; V] = std::array::from_fn(|v| _mm256_load_ps(lines.add(8 * (V * p + v))));
        for (r, acc) in acc.iter_mut().enumerate().take(r_count) {
            let x = _mm256_broadcast_ss(&*a.offset(r as isize * rsa).add(p));
            for (acc, &line) in acc.iter_mut().zip(&line) {
                *acc = _mm256_fmadd_ps(x, line, *acc);
            }
        }
    }
    let mut values = [0.0f32; 16];
    for (r, acc) in acc.iter().enumerate().take(rows) {
        for (v, &acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(values.as_mut_ptr().add(8 * v), acc);
        }
        for (j, &value) in values.iter().enumerate().take(n) {
            out.write(r, j, value);
        }
    }
}

/// A thin product's `n ≤ 8` columns from a column-major `a` (`a[i, p]` at `a + i + p·csa`):
/// eight rows at a time, each step loading them as one vector and broadcasting the step's
/// eight values of b (`lines`, `line` floats apart, zero past n) into eight accumulators,
/// one per column; the last rows by a masked load, reading nothing past row m. The steps
/// are taken [`THIN_DEPTH`] at a time for all rows, the running sums parked in `sums`
/// (`8·m` floats) in between: a column of a crosses a page per step (a row of G or x is
/// kilobytes long), and going down all k steps for each eight rows would touch more pages
/// than the TLB holds, and each line twice from L2.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn thin_columns(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    csa: isize,
    lines: *const f32,
    line: usize,
    sums: *mut f32,
    out: Out,
) {
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for from in (0..k).step_by(THIN_DEPTH) {
        let to = k.min(from + THIN_DEPTH);
        for i in (0..m).step_by(8) {
            let count = 8.min(m - i);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(count as i32), lanes);
            let parked = sums.add(8 * i);
            let mut acc: [__m256; 8] = if from == 0 {
                [_mm256_setzero_ps(); 8]
            } else {
                std::array::from_fn(|j| _mm256_load_ps(parked.add(8 * j)))
            };
            for p in from..to {
                let column = a.offset(p as isize * csa).add(i);
                let x = if count == 8 {
                    _mm256_loadu_ps(column)
                } else {
                    _mm256_maskload_ps(column, mask)
                };
                let values = lines.add(p * line);
                for (j, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_fmadd_ps(x, _mm256_broadcast_ss(&*values.add(j)), *acc);
                }
            }
            if to < k {
                for (j, acc) in acc.iter().enumerate() {
                    _mm256_store_ps(parked.add(8 * j), *acc);
                }
                continue;
            }
            // acc[j] holds column j of the eight rows; rows of C after the transpose.
            let rows = transpose8(acc);
            let mut values = [0.0f32; 8];
            for (r, row) in rows.iter().enumerate().take(count) {
                _mm256_storeu_ps(values.as_mut_ptr(), *row);
                for (j, &value) in values.iter().enumerate().take(n) {
                    out.write(i + r, j, value);
                }
            }
        }
    }
}

/// Steps of k [`thin_columns`] takes for all rows before the next ones. GPT-2's ∂A
/// (8 × 1024 × 768 read as Gᵀ), fastest of 20 alternated calls: whole 260–284 µs, chunks of
/// 512 229–235, 256 222–229, 128 215–228 µs; nanogpt-cpu's (k = 384) level throughout.
const THIN_DEPTH: usize = 256;

/// Deepest product [`sgemm_shallow`] takes (LoRA's rank).
pub const SHALLOW_MAX: usize = 16;

/// `c ← α·a·b + β·c` for a product at most [`SHALLOW_MAX`] deep — LoRA's rank-r updates of a
/// wide output (the forward's `+ s·u·Bᵀ`, ∂x's `+ ∂u·A`), where each element is a handful
/// of multiply-adds and the time goes into reading and writing C. C is swept once, row by
/// row, 32 columns at a time (four independent sums), `b` read in place when its rows are
/// contiguous (else copied once), `a`'s values broadcast from where they are. matrixmultiply
/// copies both operands and runs its 8×8 tiles for k steps each. Every element of C is one
/// running sum over k in order (FMAs), then `α·sum + β·c`, as in [`sgemm_thin`]. With β = 0,
/// `c` is not read.
///
/// # Safety
/// As for [`sgemm_thin`], with `0 < k ≤ SHALLOW_MAX` instead of the width.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub unsafe fn sgemm_shallow(
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
    debug_assert!(k > 0 && k <= SHALLOW_MAX);
    if csc != 1 && rsc == 1 {
        // A column-major C: Cᵀ = bᵀ·aᵀ is row-major.
        return sgemm_shallow(n, k, m, alpha, b, csb, rsb, a, csa, rsa, beta, c, csc, rsc);
    }
    BUFFERS.with(|buffers| {
        let (_, b_buffer) = &mut *buffers.borrow_mut();
        // b's rows contiguous: read in place; else copied row by row (k × n is small).
        let (rows, stride) = if csb == 1 {
            (b, rsb)
        } else {
            let copy = floats(b_buffer, k * n);
            for p in 0..k {
                for j in 0..n {
                    *copy.add(p * n + j) = *b.offset(p as isize * rsb + j as isize * csb);
                }
            }
            (copy.cast_const(), n as isize)
        };
        let out = Out {
            alpha,
            beta,
            c,
            rsc,
            csc,
        };
        for i in 0..m {
            shallow_row(k, n, a.offset(i as isize * rsa), csa, rows, stride, out, i);
        }
    })
}

/// Row `i` of a shallow product: `a_row[p]` (`csa` apart) against b's rows (`rsb` apart).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn shallow_row(
    k: usize,
    n: usize,
    a_row: *const f32,
    csa: isize,
    b: *const f32,
    rsb: isize,
    out: Out,
    i: usize,
) {
    let alpha = _mm256_set1_ps(out.alpha);
    let beta = _mm256_set1_ps(out.beta);
    let c_row = out.c.offset(i as isize * out.rsc);
    let finish = |sum: __m256, at: *mut f32| {
        let scaled = _mm256_mul_ps(alpha, sum);
        if out.beta != 0.0 {
            _mm256_fmadd_ps(beta, _mm256_loadu_ps(at), scaled)
        } else {
            scaled
        }
    };
    // Vectors along C's row when its columns are adjacent; element by element otherwise.
    let vectors = if out.csc == 1 { n } else { 0 };
    let mut j = 0;
    while j + 32 <= vectors {
        let mut acc = [_mm256_setzero_ps(); 4];
        for p in 0..k {
            let x = _mm256_broadcast_ss(&*a_row.offset(p as isize * csa));
            let line = b.offset(p as isize * rsb).add(j);
            for (q, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(line.add(8 * q)), *acc);
            }
        }
        for (q, &acc) in acc.iter().enumerate() {
            let at = c_row.add(j + 8 * q);
            _mm256_storeu_ps(at, finish(acc, at));
        }
        j += 32;
    }
    while j + 8 <= vectors {
        let mut acc = _mm256_setzero_ps();
        for p in 0..k {
            let x = _mm256_broadcast_ss(&*a_row.offset(p as isize * csa));
            acc = _mm256_fmadd_ps(x, _mm256_loadu_ps(b.offset(p as isize * rsb).add(j)), acc);
        }
        let at = c_row.add(j);
        _mm256_storeu_ps(at, finish(acc, at));
        j += 8;
    }
    for j in j..n {
        let mut sum = 0.0f32;
        for p in 0..k {
            sum =
                (*a_row.offset(p as isize * csa)).mul_add(*b.offset(p as isize * rsb).add(j), sum);
        }
        out.write(i, j, sum);
    }
}

/// `rows[r][c]` → `out[c][r]`: an 8 × 8 block transposed in registers.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn transpose8(rows: [__m256; 8]) -> [__m256; 8] {
    let [r0, r1, r2, r3, r4, r5, r6, r7] = rows;
    let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
    let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
    let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
    let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
    let (u0, u1) = (
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
    );
    let (u2, u3) = (
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    );
    let (u4, u5) = (
        _mm256_shuffle_ps::<0x44>(t4, t6),
        _mm256_shuffle_ps::<0xEE>(t4, t6),
    );
    let (u6, u7) = (
        _mm256_shuffle_ps::<0x44>(t5, t7),
        _mm256_shuffle_ps::<0xEE>(t5, t7),
    );
    [
        _mm256_permute2f128_ps::<0x20>(u0, u4),
        _mm256_permute2f128_ps::<0x20>(u1, u5),
        _mm256_permute2f128_ps::<0x20>(u2, u6),
        _mm256_permute2f128_ps::<0x20>(u3, u7),
        _mm256_permute2f128_ps::<0x31>(u0, u4),
        _mm256_permute2f128_ps::<0x31>(u1, u5),
        _mm256_permute2f128_ps::<0x31>(u2, u6),
        _mm256_permute2f128_ps::<0x31>(u3, u7),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `α·a·b + β·c` in f64, the reference (`a` m × k, `b` k × n, `c` m × n, row-major).
    fn naive(
        (a, b, c): (&[f32], &[f32], &[f32]),
        (m, k, n): (usize, usize, usize),
        alpha: f32,
        beta: f32,
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                    .sum();
                out[i * n + j] = alpha as f64 * dot + beta as f64 * c[i * n + j] as f64;
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 + seed * 101) % 211) as f32 / 105.0 - 1.0)
            .collect()
    }

    /// `x` (rows × cols, row-major) stored in `layout`: 0 row-major, 1 column-major, 2 with
    /// both strides above 1 (every other row and column of a larger matrix). Returns the
    /// storage and the strides.
    fn stored(x: &[f32], rows: usize, cols: usize, layout: usize) -> (Vec<f32>, isize, isize) {
        match layout {
            0 => (x.to_vec(), cols as isize, 1),
            1 => {
                let t = (0..rows * cols)
                    .map(|e| x[(e % rows) * cols + e / rows])
                    .collect();
                (t, 1, rows as isize)
            }
            _ => {
                let mut big = vec![f32::NAN; 4 * rows * cols];
                for i in 0..rows {
                    for j in 0..cols {
                        big[2 * i * 2 * cols + 2 * j] = x[i * cols + j];
                    }
                }
                (big, 4 * cols as isize, 2)
            }
        }
    }

    /// The raw signature both kernels share.
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

    /// `kernel` on each shape, with a, b and C row-major, column-major or strided both ways,
    /// and three (α, β): each result within 1e-5 of the naive product, and of the same bits
    /// in every layout.
    fn check_every_layout(kernel: Kernel, shapes: &[(usize, usize, usize)]) {
        for &(m, k, n) in shapes {
            let (a, b, c0) = (values(m * k, 1), values(k * n, 2), values(m * n, 3));
            for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0), (2.0, -0.5)] {
                let want = naive((&a, &b, &c0), (m, k, n), alpha, beta);
                let mut first: Option<Vec<u32>> = None;
                for layout in 0..18 {
                    let (a_layout, b_layout, c_layout) = (layout % 3, layout / 3 % 3, layout / 9);
                    let (a_store, rsa, csa) = stored(&a, m, k, a_layout);
                    let (b_store, rsb, csb) = stored(&b, k, n, b_layout);
                    let (mut c, rsc, csc) = stored(&c0, m, n, c_layout);
                    if beta == 0.0 {
                        // NaN where β = 0, so a read of C would show.
                        c.iter_mut().for_each(|x| *x = f32::NAN);
                    }
                    // SAFETY: the strides describe the stored matrices; c is separate.
                    unsafe {
                        kernel(
                            m,
                            k,
                            n,
                            alpha,
                            a_store.as_ptr(),
                            rsa,
                            csa,
                            b_store.as_ptr(),
                            rsb,
                            csb,
                            beta,
                            c.as_mut_ptr(),
                            rsc,
                            csc,
                        );
                    }
                    let got: Vec<f32> = (0..m * n)
                        .map(|e| c[(e / n) * rsc as usize + (e % n) * csc as usize])
                        .collect();
                    for (e, (&got, &want)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (got as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{m}×{k}×{n} layout {layout} α {alpha} β {beta} at {e}: {got} vs {want}"
                        );
                    }
                    // Rows read in place, copied into a panel, or as columns: the same sums.
                    let bits: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
                    match &first {
                        None => first = Some(bits),
                        Some(first) => assert!(bits == *first, "{m}×{k}×{n} layout {layout}"),
                    }
                }
            }
        }
    }

    #[test]
    fn products_of_every_layout_match_a_naive_product_and_each_other_bit_for_bit() {
        if !supported() {
            return;
        }
        // Full tiles, edges both ways, more than one k block, more than one row block
        // (MC = 144) and column block (NC = 2048). A row- or column-major A is read in place
        // (but the column-major one at k = 513), a strided one packed: the same bits. At
        // 7 × 300 × 600 a row-major B's first k block spans more than PACK_B_STREAM_MIN_FLOATS
        // and is packed rows first, its second panel after panel.
        check_every_layout(
            sgemm,
            &[
                (6, 1, 16),
                (7, 3, 17),
                (12, 256, 32),
                (29, 300, 45),
                (150, 513, 40),
                (13, 40, 2100),
                (7, 300, 600),
            ],
        );
    }

    #[test]
    fn the_bias_added_as_tiles_are_stored_gives_the_bits_of_writing_the_bias_rows_first() {
        if !supported() {
            return;
        }
        // Edges both ways, several k blocks, A read in place and packed, C row- or column-major.
        for (m, k, n) in [(7, 17, 17), (29, 300, 45), (150, 513, 40)] {
            let (a, b) = (values(m * k, 21), values(k * n, 22));
            let bias = values(n, 23);
            for layout in 0..18 {
                let (a_layout, b_layout, c_layout) = (layout % 3, layout / 3 % 3, layout / 9);
                let (a_store, rsa, csa) = stored(&a, m, k, a_layout);
                let (b_store, rsb, csb) = stored(&b, k, n, b_layout);
                let rows: Vec<f32> = (0..m * n).map(|e| bias[e % n]).collect();
                let (mut two_pass, rsc, csc) = stored(&rows, m, n, c_layout);
                let mut fused = vec![f32::NAN; two_pass.len()];
                // SAFETY: the strides describe the stored matrices; the outputs are separate.
                unsafe {
                    let (a, b) = (a_store.as_ptr(), b_store.as_ptr());
                    let c = two_pass.as_mut_ptr();
                    sgemm(m, k, n, 1.0, a, rsa, csa, b, rsb, csb, 1.0, c, rsc, csc);
                    let (bias, c) = (bias.as_ptr(), fused.as_mut_ptr());
                    sgemm_bias(m, k, n, a, rsa, csa, b, rsb, csb, bias, c, rsc, csc);
                }
                for i in 0..m {
                    for j in 0..n {
                        let e = i * rsc as usize + j * csc as usize;
                        assert_eq!(
                            fused[e].to_bits(),
                            two_pass[e].to_bits(),
                            "{m}×{k}×{n} layout {layout} at ({i}, {j})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_frozen_weights_kept_panels_give_the_bits_of_packing_it_each_time() {
        if !supported() {
            return;
        }
        // B = W (k × n, two k blocks, n not a multiple of 16) and B = Wᵀ, each serial and on
        // the parallel driver (rows split, B shared), twice: packed by the first product,
        // read from the kept panels by the second.
        let (k, n) = (300, 70);
        let weight = ndarray::Array2::from_shape_vec((k, n), values(k * n, 21))
            .unwrap()
            .into_dyn()
            .into_shared();
        assert!(crate::frozen_packs::register(&weight));
        let copy = weight.to_owned().into_shared();
        let product = |b: &crate::Tensor<f32>, transposed: bool, m: usize, parallel: bool| {
            let (kk, nn, rsb, csb) = if transposed {
                (n, k, 1, n as isize)
            } else {
                (k, n, n as isize, 1)
            };
            let a = values(m * kk, 22);
            let mut c = vec![0.0f32; m * nn];
            let kernel: Kernel = if parallel {
                |m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc| {
                    // SAFETY: the caller's, passed on.
                    let taken = unsafe {
                        sgemm_parallel(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
                    };
                    assert!(taken);
                }
            } else {
                sgemm
            };
            // SAFETY: row-major a and c; b is the k × n weight or its transpose.
            unsafe {
                kernel(
                    m,
                    kk,
                    nn,
                    1.0,
                    a.as_ptr(),
                    kk as isize,
                    1,
                    b.as_ptr(),
                    rsb,
                    csb,
                    0.0,
                    c.as_mut_ptr(),
                    nn as isize,
                    1,
                );
            }
            c.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        };
        for transposed in [false, true] {
            for (m, parallel) in [(50, false), (400, true)] {
                let expected = product(&copy, transposed, m, parallel);
                for round in 0..2 {
                    assert!(
                        product(&weight, transposed, m, parallel) == expected,
                        "transposed {transposed}, {m} rows, parallel {parallel}, round {round}"
                    );
                }
            }
        }
        assert_eq!(crate::frozen_packs::packs_of(&weight), 2);
        // Written through another handle, the weight is copied first: the product reads the
        // new values, not the kept panels of the old ones.
        let mut written = weight.clone();
        written[[0, 0]] = 9.0;
        let mut written_copy = copy.clone();
        written_copy[[0, 0]] = 9.0;
        assert_ne!(written.as_ptr(), weight.as_ptr());
        assert!(product(&written, false, 50, false) == product(&written_copy, false, 50, false));
    }

    #[test]
    fn the_parallel_driver_gives_the_serial_kernels_bits_on_any_thread_count() {
        if !supported() {
            return;
        }
        // Rows split (B shared) and columns split (A shared, packed by threads side by side
        // into neighbouring panels of one buffer), B transposed in one, β ≠ 0.
        for (m, k, n, b_transposed) in [(301, 530, 70, false), (200, 300, 900, true)] {
            let (a, b, c0) = (values(m * k, 11), values(k * n, 12), values(m * n, 13));
            let (rsb, csb) = if b_transposed {
                (1, k as isize)
            } else {
                (n as isize, 1)
            };
            let serial = {
                let mut c = c0.clone();
                // SAFETY: row-major a and c; b stored as its strides say (values only).
                unsafe {
                    sgemm(
                        m,
                        k,
                        n,
                        0.5,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        rsb,
                        csb,
                        2.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                c
            };
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let mut c = c0.clone();
                // SAFETY: as above.
                let taken = pool.install(|| unsafe {
                    sgemm_parallel(
                        m,
                        k,
                        n,
                        0.5,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        rsb,
                        csb,
                        2.0,
                        c.as_mut_ptr(),
                        n as isize,
                        1,
                    )
                });
                assert!(taken);
                assert!(
                    c.iter()
                        .zip(&serial)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{m}×{k}×{n} on {threads} threads"
                );
            }
        }
    }

    #[test]
    fn thin_products_of_every_layout_match_a_naive_product_and_each_other_bit_for_bit() {
        if !supported() {
            return;
        }
        // Widths 1–16 (one and two vectors), row counts around the 6- and 12-row blocks and
        // the 8-row column blocks, depths across a THIN_DEPTH chunk.
        check_every_layout(
            sgemm_thin,
            &[
                (1, 1, 1),
                (5, 3, 8),
                (12, 17, 7),
                (13, 40, 16),
                (29, 300, 9),
                (64, 600, 8),
                (37, 513, 4),
            ],
        );
    }

    #[test]
    fn shallow_products_of_every_layout_match_a_naive_product_and_each_other_bit_for_bit() {
        if !supported() {
            return;
        }
        // Depths 1–16; widths across the 32- and 8-column steps and an element-wise tail.
        check_every_layout(
            sgemm_shallow,
            &[(1, 1, 1), (3, 8, 32), (17, 4, 45), (40, 16, 77), (9, 13, 8)],
        );
    }

    #[test]
    fn thin_and_shallow_kernels_give_a_product_both_take_the_same_bits() {
        if !supported() {
            return;
        }
        let (m, k, n) = (30, 12, 14);
        let (a, b, c0) = (values(m * k, 8), values(k * n, 9), values(m * n, 10));
        let run = |kernel: Kernel| {
            let mut c = c0.clone();
            // SAFETY: row-major a, b and c of the stated shapes.
            unsafe {
                let (k_, n_) = (k as isize, n as isize);
                kernel(
                    m,
                    k,
                    n,
                    0.5,
                    a.as_ptr(),
                    k_,
                    1,
                    b.as_ptr(),
                    n_,
                    1,
                    -1.5,
                    c.as_mut_ptr(),
                    n_,
                    1,
                );
            }
            c
        };
        let (thin, shallow) = (run(sgemm_thin), run(sgemm_shallow));
        assert!(thin
            .iter()
            .zip(&shallow)
            .all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    #[test]
    fn a_transposed_or_row_split_thin_product_keeps_its_bits() {
        if !supported() {
            return;
        }
        let (m, k, n) = (40, 700, 8);
        let (a, b) = (values(m * k, 4), values(k * n, 5));
        let product = |rows: std::ops::Range<usize>| -> Vec<f32> {
            let mut c = vec![0.0f32; rows.len() * n];
            // SAFETY: row-major a (rows of it), b and c.
            unsafe {
                sgemm_thin(
                    rows.len(),
                    k,
                    n,
                    1.0,
                    a.as_ptr().add(rows.start * k),
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
            c
        };
        let whole = product(0..m);
        let parts: Vec<f32> = [0..7, 7..27, 27..40]
            .into_iter()
            .flat_map(product)
            .collect();
        assert_eq!(whole, parts);
        // Cᵀ = bᵀ·aᵀ, as the dispatch takes a product with at most 16 rows: a 12 × k × 10
        // product both ways round (C written row- and column-major).
        let (m, n) = (12, 10);
        let (a, b) = (values(m * k, 6), values(k * n, 7));
        let (mut straight, mut swapped) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        // SAFETY: row-major a, b and C; then bᵀ, aᵀ and Cᵀ as the same memory, strides swapped.
        unsafe {
            let (a, b) = (a.as_ptr(), b.as_ptr());
            let (k_, n_) = (k as isize, n as isize);
            let c = straight.as_mut_ptr();
            sgemm_thin(m, k, n, 1.0, a, k_, 1, b, n_, 1, 0.0, c, n_, 1);
            let c = swapped.as_mut_ptr();
            sgemm_thin(n, k, m, 1.0, b, 1, n_, a, 1, k_, 0.0, c, 1, n_);
        }
        let back = swapped;
        assert_eq!(straight, back);
    }
}
