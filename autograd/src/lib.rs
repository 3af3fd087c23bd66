//! # tapelora-autograd — a reverse-mode autodiff engine you can read
//!
//! A tape (Wengert list) of ops over `ndarray` arrays, with each op's forward computation and
//! backward rule written side by side.
//!
//! ## Map of the crate
//! | module | what it holds |
//! |---|---|
//! | [`tape`] | [`Tape`], [`Var`], [`Node`] records, [`Tape::backward`], [`Gradients`], `no_grad`, anomaly mode |
//! | `ops/` | every op, one file per family (see [`ops`]), each with its gradcheck tests |
//! | [`gemm`] | every strided matmul goes through here (our AVX-512 kernels or matrixmultiply): the thread splits (dynamic, fixed halves, along k for deep products), GEMV, the GEMM call/FLOP counters |
//! | [`gradcheck`](mod@gradcheck) | central-difference gradient checking in `f64` |
//! | `display` | the tape as a text table (`Display`) and as Graphviz DOT ([`Tape::to_dot`]) |
//! | [`sgemm_avx512`] | the f32 GEMM used where AVX-512 is present (12×32 FMA micro-kernel; the thin kernel for LoRA's rank side; LoRA's low-rank terms summed inside a linear's tiles) |
//! | `sgemm_avx2` | the f32 GEMM on x86-64 CPUs with AVX2 but not AVX-512: a 6×16 FMA micro-kernel and its two-thread driver (one shared packed operand, dynamic chunks) for products at least 32 wide, small ones reading A in place, the bias, a residual and LoRA's low-rank terms added in its tiles; LoRA's thin products (at most 16 wide or tall; 9–16 rows against 32 or more columns go to the 6×16 kernel) and rank-r updates of a wide output (at most 16 deep), read in place |
//! | [`frozen_packs`] | frozen weights' GEMM panels packed once and kept across products and steps (registered by [`Tape::frozen`], read by `sgemm_avx2`; copy on write keeps them from going stale) |
//! | [`attention_avx512`] | one attention head of a short sequence (T ≤ 384) in f32 from register tiles; for T ≤ 64 its scores, softmax and ∂S stay in registers (nanogpt-cpu's heads) |
//! | [`attention_avx2`] | the same on AVX2 (T ≤ 256): 6 × 16 register tiles for every product of a head, causal tiles stopping at the keys their rows see; scores and ∂P through the row in L1, the general path's softmax and ∂S rows |
//! | [`partner`] | a spinning second thread for decoding's short parallel sections ([`partner::with_partner`]; its `map` and `join` are rayon's elsewhere), the same sections on one thread ([`partner::alone`]), and a [`partner::Pacer`] that picks between the two by timing |
//! | [`simd`] | run-time choice of AVX-512 / AVX2 builds for the elementwise loops |
//! | [`element`] | the [`Float`] trait: `f32` for training, `f64` for checking |
//! | [`error`] | [`AutogradError`], typed errors naming the op and shapes |
//!
//! ## One step, end to end
//! ```
//! use tapelora_autograd::{Tape, Var};
//! use ndarray::array;
//!
//! let tape = Tape::<f32>::new();
//! let w = tape.frozen("w0", array![[1.0f32, 2.0], [3.0, 4.0]].into_dyn()); // frozen base
//! let a = tape.param("a", array![[0.5f32, 0.0], [0.0, 0.5]].into_dyn());   // trainable
//! let x = tape.constant(array![[1.0f32, 1.0]].into_dyn());                 // data
//! let y = x.matmul(&w)?.add(&x.matmul(&a)?)?;
//! let loss = y.mul(&y)?.mean_all()?;
//! let grads = tape.backward(&loss)?;
//! assert!(grads.get(&a).is_some());    // the parameter's gradient
//! assert!(grads.get(&w).is_none());    // never computed for the frozen weight
//! println!("{tape}");                  // the tape as a table
//! # Ok::<(), tapelora_autograd::AutogradError>(())
//! ```
//!
//! ## Element types
//! Everything is generic over [`Float`] (`f32`, `f64`); `Tape` and `Var` default to `f32`.
//! Gradient checks run the same op code in `f64`.
//!
//! ## Design rules
//! * A backward rule computes only the input gradients asked for (`needs[i]`); an input needs a
//!   gradient iff a trainable leaf lies behind it. A sub-graph reaching no trainable leaf records
//!   no backward rule and saves nothing.
//! * Transposes, permutes and narrows are views (shared buffers with new strides); matmul reads
//!   any strides, so no op copies to transpose.
//! * Elementwise and row-wise loops use rayon above [`ops::PARALLEL_MIN_LEN`] elements; large
//!   GEMMs are split into blocks on the same pool. Reductions are ordered, so results are
//!   deterministic for a given thread count.

pub mod attention_avx2;
pub mod attention_avx512;
pub mod display;
pub mod element;
mod env_switch;
pub mod error;
pub mod frozen_packs;
pub mod gemm;
pub mod gradcheck;
pub mod ops;
pub mod partner;
#[cfg(target_arch = "x86_64")]
pub mod sgemm_avx2;
pub mod sgemm_avx512;
pub mod simd;
pub mod tape;

pub use display::DotOptions;
pub use element::Float;
pub use error::{AutogradError, Result};
pub use gradcheck::{gradcheck, GradcheckOptions, GradcheckReport};
pub use ops::attention::{attention, attention_qkv};
pub use ops::unary::{gelu_derivative, gelu_scalar};
pub use ops::{concat, LoraTerm};
pub use tape::{
    GradStatus, Gradients, Node, NodeId, OpProfile, OpTime, SavedInfo, Tape, Tensor, Var,
};

pub use ndarray;
