//! Linear algebra on adapters: ΔW, its singular values and numerical rank (SVD from nalgebra,
//! a pure-Rust crate), per module.

use ndarray::Array2;

use crate::layer::LoraLinear;

/// Singular values of `m`, descending (nalgebra's SVD, in f64).
pub fn singular_values(m: &Array2<f64>) -> Vec<f64> {
    let (rows, cols) = m.dim();
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    let mat = nalgebra::DMatrix::from_fn(rows, cols, |i, j| m[[i, j]]);
    let mut sv: Vec<f64> = mat.singular_values().iter().copied().collect();
    sv.sort_by(|a, b| b.total_cmp(a));
    sv
}

/// Relative tolerance of [`numerical_rank`]: singular values below `RANK_RTOL · σ_max` count as
/// zero. ΔW is formed in f64 from f32 factors, so its exact-zero directions come out near
/// 1e-16·σ_max; 1e-10 leaves a wide margin either side.
pub const RANK_RTOL: f64 = 1e-10;

/// Number of singular values above `RANK_RTOL · σ_max`.
pub fn numerical_rank(singular_values: &[f64]) -> usize {
    let max = singular_values.first().copied().unwrap_or(0.0);
    if max == 0.0 {
        return 0;
    }
    singular_values
        .iter()
        .filter(|&&s| s > RANK_RTOL * max)
        .count()
}

/// ‖m‖_F.
pub fn frobenius(m: &Array2<f64>) -> f64 {
    m.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// The full ΔW `[out, in]` (PEFT orientation) of adapter `name` on one layer, in f64, with the
/// parts of a q/k/v-sliced adapter placed in their rows.
pub fn delta_w(layer: &LoraLinear, name: &str) -> Option<Array2<f64>> {
    let adapter = layer.adapters.get(name)?;
    let mut delta = Array2::<f64>::zeros((layer.out_features, layer.in_features));
    for part in &adapter.parts {
        let d = part.delta();
        delta
            .slice_mut(ndarray::s![
                part.slice.start..part.slice.start + part.slice.len,
                ..
            ])
            .assign(&d);
    }
    Some(delta)
}

/// What `tapelora inspect` reports per adapted module.
#[derive(Clone, Debug)]
pub struct ModuleReport {
    pub name: String,
    pub r: usize,
    pub rank: usize,
    pub delta_fro_norm: f64,
    pub singular_values: Vec<f64>,
}

/// ΔW statistics of adapter `name` on every layer it adapts; `top` limits the singular values
/// listed (all of them up to the rank bound r·parts are kept when `top` is None).
pub fn module_reports(layers: &[&LoraLinear], name: &str, top: Option<usize>) -> Vec<ModuleReport> {
    layers
        .iter()
        .filter_map(|layer| {
            let adapter = layer.adapters.get(name)?;
            let delta = delta_w(layer, name)?;
            let r: usize = adapter.parts.iter().map(|p| p.r).sum();
            let mut sv = singular_values(&delta);
            let rank = numerical_rank(&sv);
            sv.truncate(top.unwrap_or(r.max(rank)));
            Some(ModuleReport {
                name: layer.module.clone(),
                r,
                rank,
                delta_fro_norm: frobenius(&delta),
                singular_values: sv,
            })
        })
        .collect()
}

/// Right-singular vectors of `a` (`[r, k]`, rows = rank directions) as the columns of a `k × r'`
/// matrix, ordered by decreasing singular value (r' = min(r, k)).
pub fn right_singular_vectors(a: &Array2<f64>) -> Array2<f64> {
    let (rows, cols) = a.dim();
    let m = nalgebra::DMatrix::from_fn(rows, cols, |i, j| a[[i, j]]);
    let svd = m.svd(false, true);
    let vt = svd.v_t.expect("requested");
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    Array2::from_shape_fn((cols, order.len()), |(c, j)| vt[(order[j], c)])
}

/// Subspace similarity of the paper's §7.2 (Eq. 4):
/// φ(A₁, A₂, i, j) = ‖U₁ᵢᵀ·U₂ⱼ‖²_F / min(i, j) ∈ [0, 1], where U₁ᵢ holds the top-i right-singular
/// vectors of A₁ (`[r₁, k]`) and U₂ⱼ the top-j of A₂. (Appendix G writes the denominator with a
/// typo; min(i, j) is what makes φ a normalised overlap.) Returns the grid for i = 1..=r₁,
/// j = 1..=r₂ as `grid[i-1][j-1]`.
pub fn subspace_similarity(a1: &Array2<f64>, a2: &Array2<f64>) -> Array2<f64> {
    let (u1, u2) = (right_singular_vectors(a1), right_singular_vectors(a2));
    let overlap = u1.t().dot(&u2); // [r1, r2]: cosines between directions
    let sq = overlap.mapv(|v| v * v);
    // Cumulative sums give ‖U₁ᵢᵀU₂ⱼ‖²_F for every (i, j) at once.
    let (n1, n2) = sq.dim();
    let mut cum = Array2::<f64>::zeros((n1, n2));
    for i in 0..n1 {
        for j in 0..n2 {
            let up = if i > 0 { cum[[i - 1, j]] } else { 0.0 };
            let left = if j > 0 { cum[[i, j - 1]] } else { 0.0 };
            let diag = if i > 0 && j > 0 {
                cum[[i - 1, j - 1]]
            } else {
                0.0
            };
            cum[[i, j]] = sq[[i, j]] + up + left - diag;
        }
    }
    Array2::from_shape_fn((n1, n2), |(i, j)| cum[[i, j]] / ((i + 1).min(j + 1)) as f64)
}

/// The expected φ for two independent random subspaces of dimensions i and j in ℝᵏ:
/// E‖U₁ᵀU₂‖²_F = i·j/k, so φ ≈ max(i, j)/k.
pub fn random_subspace_similarity(i: usize, j: usize, k: usize) -> f64 {
    (i * j) as f64 / k as f64 / i.min(j) as f64
}

/// Top-`r` left and right singular vectors of `m` (`[d, k]`): U `[d, r]`, V `[k, r]`.
fn top_singular_vectors(m: &Array2<f64>, r: usize) -> (Array2<f64>, Array2<f64>) {
    let (rows, cols) = m.dim();
    let mat = nalgebra::DMatrix::from_fn(rows, cols, |i, j| m[[i, j]]);
    let svd = mat.svd(true, true);
    let (u, vt) = (svd.u.expect("requested"), svd.v_t.expect("requested"));
    let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
    order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let r = r.min(order.len());
    (
        Array2::from_shape_fn((rows, r), |(i, j)| u[(i, order[j])]),
        Array2::from_shape_fn((cols, r), |(c, j)| vt[(order[j], c)]),
    )
}

/// The paper's §7.3 (Table 7): how strongly ΔW amplifies directions of W.
#[derive(Clone, Debug, PartialEq)]
pub struct Amplification {
    /// ‖ΔW‖_F.
    pub delta_norm: f64,
    /// ‖UᵀWV‖_F with U, V the top-r singular vectors of ΔW.
    pub w_on_delta_directions: f64,
    /// ‖UᵀWV‖_F with U, V the top-r singular vectors of W itself.
    pub w_on_own_directions: f64,
    /// ‖UᵀWV‖_F with U, V random orthonormal r-frames.
    pub w_on_random_directions: f64,
    /// ‖ΔW‖_F / ‖UᵀWV‖_F on ΔW's directions — the amplification factor.
    pub factor: f64,
}

/// Amplification factor of ΔW (`[d, k]`) over W (`[d, k]`, same orientation) at rank `r`,
/// with W's own top-r directions and random directions (seeded) for comparison.
pub fn amplification(w: &Array2<f64>, delta: &Array2<f64>, r: usize, seed: u64) -> Amplification {
    use rand::{Rng, SeedableRng};
    let projected = |u: &Array2<f64>, v: &Array2<f64>| frobenius(&u.t().dot(w).dot(v));
    let (du, dv) = top_singular_vectors(delta, r);
    let (wu, wv) = top_singular_vectors(w, r);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut random_frame = |n: usize| {
        let g = Array2::from_shape_simple_fn((n, r.min(n)), || rng.random_range(-1.0..1.0));
        top_singular_vectors(&g, r).0 // an orthonormal basis of a random r-dimensional subspace
    };
    let (ru, rv) = (random_frame(w.nrows()), random_frame(w.ncols()));
    let delta_norm = frobenius(delta);
    let on_delta = projected(&du, &dv);
    Amplification {
        delta_norm,
        w_on_delta_directions: on_delta,
        w_on_own_directions: projected(&wu, &wv),
        w_on_random_directions: projected(&ru, &rv),
        factor: delta_norm / on_delta.max(1e-300),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_of_a_known_matrix() {
        let m = ndarray::arr2(&[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]]);
        let sv = singular_values(&m);
        assert_eq!(numerical_rank(&sv), 2);
        let f = frobenius(&m);
        assert!((sv.iter().map(|s| s * s).sum::<f64>().sqrt() - f).abs() < 1e-12);
        assert_eq!(numerical_rank(&singular_values(&Array2::zeros((3, 4)))), 0);
    }

    #[test]
    fn subspace_similarity_of_equal_orthogonal_and_nested_subspaces() {
        let a = ndarray::arr2(&[[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]);
        let same = subspace_similarity(&a, &a);
        assert!((same[[1, 1]] - 1.0).abs() < 1e-12 && (same[[0, 0]] - 1.0).abs() < 1e-12);
        let other = ndarray::arr2(&[[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 1.0]]);
        assert!(subspace_similarity(&a, &other)
            .iter()
            .all(|&v| v.abs() < 1e-12));
        // A 1-d subspace inside a 2-d one: φ(·, ·, 1, 2) = 1. `a`'s top direction is e₂ (σ = 2),
        // the line's too, so φ(·, ·, 1, 1) = 1 as well.
        let line = ndarray::arr2(&[[0.0, 5.0, 0.0, 0.0]]);
        let phi = subspace_similarity(&line, &a);
        assert!((phi[[0, 1]] - 1.0).abs() < 1e-12 && (phi[[0, 0]] - 1.0).abs() < 1e-12);
        assert!((random_subspace_similarity(2, 8, 64) - 0.125).abs() < 1e-12);
    }

    #[test]
    fn amplification_of_a_delta_along_w_is_small_and_orthogonal_large() {
        let mut w = Array2::<f64>::zeros((6, 5));
        for i in 0..5 {
            w[[i, i]] = 5.0 - i as f64; // singular values 5, 4, 3, 2, 1 along e_i
        }
        let mut along = Array2::<f64>::zeros((6, 5));
        along[[0, 0]] = 1.0; // ΔW on W's strongest direction
        let mut orthogonal = Array2::<f64>::zeros((6, 5));
        orthogonal[[5, 4]] = 1.0; // a row W does not use
        let a = amplification(&w, &along, 1, 0);
        assert!((a.w_on_delta_directions - 5.0).abs() < 1e-9 && (a.factor - 0.2).abs() < 1e-9);
        assert!((a.w_on_own_directions - 5.0).abs() < 1e-9);
        let o = amplification(&w, &orthogonal, 1, 0);
        assert!(
            o.factor > 1e6,
            "ΔW on directions W ignores is amplified: {o:?}"
        );
    }
}
