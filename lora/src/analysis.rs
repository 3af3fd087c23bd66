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
}
