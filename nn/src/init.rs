//! Initialisers (GPT-2 / nanoGPT conventions, and the kaiming-uniform PEFT uses for LoRA A).

use ndarray::ArrayD;
use rand::Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::parameter::Parameter;

/// Fills with samples of N(0, std²).
pub fn normal_(p: &mut Parameter, std: f64, rng: &mut impl Rng) {
    let normal = Normal::new(0.0f64, std).expect("std is finite and ≥ 0");
    p.value =
        ArrayD::from_shape_simple_fn(p.value.raw_dim(), || normal.sample(rng) as f32).into_shared();
}

/// Fills with samples of U(−bound, bound).
pub fn uniform_(p: &mut Parameter, bound: f64, rng: &mut impl Rng) {
    let uniform = Uniform::new_inclusive(-bound, bound).expect("bound is finite and ≥ 0");
    p.value = ArrayD::from_shape_simple_fn(p.value.raw_dim(), || uniform.sample(rng) as f32)
        .into_shared();
}

/// PyTorch's `kaiming_uniform_(w, a)` for a weight with `fan_in` inputs:
/// bound = √(6 / ((1 + a²)·fan_in)). PEFT initialises LoRA's A with a = √5, as `nn.Linear` does.
pub fn kaiming_uniform_(p: &mut Parameter, a: f64, fan_in: usize, rng: &mut impl Rng) {
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let bound = gain * (3.0 / fan_in.max(1) as f64).sqrt();
    uniform_(p, bound, rng);
}

pub fn zeros_(p: &mut Parameter) {
    p.value = ArrayD::zeros(p.value.raw_dim()).into_shared();
}

pub fn ones_(p: &mut Parameter) {
    p.value = ArrayD::ones(p.value.raw_dim()).into_shared();
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn normal_has_the_requested_spread_and_kaiming_its_bound() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let mut p = Parameter::new("w", ArrayD::zeros(ndarray::IxDyn(&[200, 100])));
        normal_(&mut p, 0.02, &mut rng);
        let std = (p.value.mapv(|v| (v as f64).powi(2)).sum() / p.numel() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.001, "{std}");
        kaiming_uniform_(&mut p, 5f64.sqrt(), 100, &mut rng);
        let bound = 1.0 / 10.0; // √(6/(6·100))
        assert!(p.value.iter().all(|&v| (v as f64).abs() <= bound + 1e-7));
        assert!(p.value.iter().any(|&v| (v as f64).abs() > 0.9 * bound));
    }
}
