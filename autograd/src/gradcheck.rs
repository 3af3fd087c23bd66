//! Gradient checking: the tape's gradients against central finite differences, in `f64`.
//!
//! For an op `f` with inputs x₁…xₙ and a non-scalar output, the check uses the scalar
//! L = Σ f(x) ⊙ R with a fixed random R (a random projection — it tests the full
//! vector-Jacobian product rule, not just its sum). For every element of every input:
//!
//! ```text
//! numeric  = (L(x + ε·eᵢ) − L(x − ε·eᵢ)) / 2ε
//! analytic = (∂L/∂x)ᵢ from Tape::backward
//! pass iff |analytic − numeric| ≤ atol + rtol·|numeric|      (PyTorch's gradcheck rule)
//! ```

use ndarray::{ArrayD, IxDyn, Zip};
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::tape::{Tape, Var};

/// Tolerances and step of [`gradcheck`]; the defaults are PyTorch's (ε = 1e-6, atol = 1e-5,
/// rtol = 1e-3).
#[derive(Debug, Clone, Copy)]
pub struct GradcheckOptions {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
    /// Seed of the random projection R.
    pub seed: u64,
}

impl Default for GradcheckOptions {
    fn default() -> Self {
        GradcheckOptions {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-3,
            seed: 0,
        }
    }
}

/// Outcome of [`gradcheck`].
#[derive(Debug, Clone, PartialEq)]
pub struct GradcheckReport {
    pub passed: bool,
    /// Largest |analytic − numeric| over all checked elements.
    pub max_abs_err: f64,
    /// Largest |analytic − numeric| / max(|numeric|, 1e-12) over elements whose numeric
    /// gradient exceeds atol (relative error of a near-zero gradient means nothing).
    pub max_rel_err: f64,
    /// Number of input elements checked.
    pub checked: usize,
    /// First failing element: (input index, flat element index, analytic, numeric).
    pub first_failure: Option<(usize, usize, f64, f64)>,
}

/// The function a gradient check differentiates: input variables in, one output out.
pub type CheckedFn<'f> = dyn for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>> + 'f;

/// Checks the tape's gradients of `f` at `inputs` against central differences.
pub fn gradcheck<F>(
    f: F,
    inputs: &[ArrayD<f64>],
    opts: &GradcheckOptions,
) -> Result<GradcheckReport>
where
    F: for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>>,
{
    // One compiled body for every caller: a copy per closure type cost the test crates
    // minutes of compiling, and a call through a pointer is nothing next to a tape.
    gradcheck_dyn(&f, inputs, opts)
}

fn gradcheck_dyn(
    f: &CheckedFn<'_>,
    inputs: &[ArrayD<f64>],
    opts: &GradcheckOptions,
) -> Result<GradcheckReport> {
    // Analytic: backward of L = Σ f(x) ⊙ R.
    let tape = Tape::<f64>::new();
    let vars: Vec<Var<'_, f64>> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| tape.param(format!("x{i}"), x.clone()))
        .collect();
    let out = f(&vars)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let projection: ArrayD<f64> =
        ArrayD::from_shape_simple_fn(IxDyn(out.shape()), || rng.random_range(-1.0..1.0));
    let loss = out.mul(&tape.constant(projection.clone()))?.sum_all()?;
    let grads = tape.backward(&loss)?;

    // Numeric: perturb one element at a time, recording nothing.
    let projected = |xs: &[ArrayD<f64>]| -> Result<f64> {
        let tape = Tape::<f64>::new();
        tape.no_grad(|| {
            let vars: Vec<Var<'_, f64>> = xs.iter().map(|x| tape.constant(x.clone())).collect();
            let out = f(&vars)?;
            Ok(Zip::from(out.value())
                .and(&projection)
                .fold(0.0, |s, &o, &r| s + o * r))
        })
    };
    let mut report = GradcheckReport {
        passed: true,
        max_abs_err: 0.0,
        max_rel_err: 0.0,
        checked: 0,
        first_failure: None,
    };
    let mut work: Vec<ArrayD<f64>> = inputs
        .iter()
        .map(|x| x.as_standard_layout().into_owned())
        .collect();
    for (input, var) in vars.iter().enumerate() {
        let analytic = grads
            .get(var)
            .map(|g| g.as_standard_layout().into_owned())
            .unwrap_or_else(|| ArrayD::zeros(IxDyn(var.shape())));
        for e in 0..work[input].len() {
            let original = work[input].as_slice().expect("standard layout")[e];
            work[input].as_slice_mut().expect("standard layout")[e] = original + opts.eps;
            let plus = projected(&work)?;
            work[input].as_slice_mut().expect("standard layout")[e] = original - opts.eps;
            let minus = projected(&work)?;
            work[input].as_slice_mut().expect("standard layout")[e] = original;

            let numeric = (plus - minus) / (2.0 * opts.eps);
            let got = analytic.as_slice().expect("standard layout")[e];
            let abs_err = (got - numeric).abs();
            report.max_abs_err = report.max_abs_err.max(abs_err);
            if numeric.abs() > opts.atol {
                report.max_rel_err = report.max_rel_err.max(abs_err / numeric.abs().max(1e-12));
            }
            let within = abs_err <= opts.atol + opts.rtol * numeric.abs();
            if !within {
                report.passed = false;
                report.first_failure.get_or_insert((input, e, got, numeric));
            }
            report.checked += 1;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradcheck_catches_a_wrong_backward_rule() {
        // exp's gradient applied to a function that is really exp(x)·2 must fail…
        let x = ndarray::arr1(&[0.1, -0.4, 0.7]).into_dyn();
        let wrong = gradcheck(
            |x| {
                let doubled_value = x[0].exp()?.detach().scale(2.0)?;
                // value 2·eˣ, but the gradient only flows through one eˣ
                let exp = x[0].exp()?;
                exp.add(&doubled_value.sub(&exp.detach())?)
            },
            &[x.clone()],
            &GradcheckOptions::default(),
        )
        .unwrap();
        assert!(!wrong.passed, "{wrong:?}");
        assert!(wrong.first_failure.is_some());
        // …and pass for the honest composition.
        let right = gradcheck(
            |x| x[0].exp()?.scale(2.0),
            &[x],
            &GradcheckOptions::default(),
        )
        .unwrap();
        assert!(right.passed, "{right:?}");
        assert!(right.max_abs_err < 1e-8);
    }
}
