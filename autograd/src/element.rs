//! The element types a tape can hold.
//!
//! Training runs in `f32`; gradient checking runs the very same op code in `f64`, so every op is
//! generic over [`Float`]. The trait adds to `num_traits::Float` the two things the ops need that
//! the standard traits do not give: conversion from `f64` literals and a strided GEMM kernel
//! (matrixmultiply's `sgemm`/`dgemm`), so that transposed views never have to be copied.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

use ndarray::{LinalgScalar, ScalarOperand};

/// A floating-point element type usable on a [`Tape`](crate::Tape): `f32` or `f64`.
pub trait Float:
    num_traits::Float
    + LinalgScalar
    + ScalarOperand
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Default
    + Debug
    + Display
    + Send
    + Sync
    + 'static
{
    /// `"f32"` or `"f64"`, for printing.
    const DTYPE: &'static str;

    /// Converts an `f64` constant (a literal, a statistic) to this type.
    fn from_f64(x: f64) -> Self;

    /// Widens to `f64` (norms and statistics are accumulated in `f64`).
    fn as_f64(self) -> f64;

    /// `C ← α·A·B + β·C` on strided memory (matrixmultiply's kernel for this type).
    ///
    /// # Safety
    /// The pointers and strides must describe valid `m×k`, `k×n` and `m×n` matrices, and `c`
    /// must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    );
}

impl Float for f32 {
    const DTYPE: &'static str = "f32";
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Float for f64 {
    const DTYPE: &'static str = "f64";
    fn from_f64(x: f64) -> Self {
        x
    }
    fn as_f64(self) -> f64 {
        self
    }
    unsafe fn gemm(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
        csc: isize,
    ) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}
