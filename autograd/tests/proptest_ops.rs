//! Property tests: every op's tape gradient matches finite differences on random shapes —
//! random ranks and sizes, broadcasting with size-1 dims, repeated embedding indices.

use ndarray::{ArrayD, IxDyn};
use proptest::prelude::*;
use tapelora_autograd::{attention, concat, gradcheck, GradcheckOptions, Result, Var};

fn filled(shape: &[usize], seed: u64) -> ArrayD<f64> {
    // A cheap deterministic pseudo-random fill in [-1, 1).
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 33) as f64 / (1u64 << 31) as f64) - 1.0
    })
}

fn check<F>(f: F, inputs: &[ArrayD<f64>]) -> std::result::Result<(), TestCaseError>
where
    F: for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>>,
{
    let report = gradcheck(f, inputs, &GradcheckOptions::default())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(report.passed, "{report:?}");
    Ok(())
}

/// A shape and a second shape that broadcasts against it: some dims replaced by 1, some
/// leading dims dropped.
fn broadcast_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    prop::collection::vec(1usize..4, 1..=4).prop_flat_map(|shape| {
        let n = shape.len();
        (Just(shape), prop::collection::vec(any::<bool>(), n), 0..n).prop_map(
            |(shape, ones, drop)| {
                let other: Vec<usize> = shape
                    .iter()
                    .zip(&ones)
                    .map(|(&d, &one)| if one { 1 } else { d })
                    .collect();
                (shape, other[drop..].to_vec())
            },
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn binary_ops_broadcast_either_way((a, b) in broadcast_pair(), seed in 0u64..1000, swap in any::<bool>()) {
        let (a, b) = if swap { (b, a) } else { (a, b) };
        let (x, y) = (filled(&a, seed), filled(&b, seed + 1));
        let y_nonzero = y.mapv(|v| v.signum() * (0.5 + v.abs()));
        check(|v| v[0].add(&v[1]), &[x.clone(), y.clone()])?;
        check(|v| v[0].sub(&v[1]), &[x.clone(), y.clone()])?;
        check(|v| v[0].mul(&v[1]), &[x.clone(), y])?;
        check(|v| v[0].div(&v[1]), &[x, y_nonzero])?;
    }

    #[test]
    fn matmul_any_sizes(m in 1usize..5, k in 1usize..5, n in 1usize..5, batch in 0usize..3, transpose_b in any::<bool>(), seed in 0u64..1000) {
        let mut a_shape = vec![m, k];
        let mut b_shape = if transpose_b { vec![n, k] } else { vec![k, n] };
        if batch > 0 {
            a_shape.insert(0, batch);
            b_shape.insert(0, batch);
        }
        let rank = b_shape.len();
        check(move |v| {
            let b = if transpose_b { v[1].transpose(rank - 2, rank - 1)? } else { v[1].clone() };
            v[0].matmul(&b)
        }, &[filled(&a_shape, seed), filled(&b_shape, seed + 7)])?;
    }

    #[test]
    fn reductions_over_random_axes(shape in prop::collection::vec(1usize..4, 1..=4), mask in prop::collection::vec(any::<bool>(), 4), keepdim in any::<bool>(), seed in 0u64..1000) {
        let axes: Vec<usize> = (0..shape.len()).filter(|&i| mask[i]).collect();
        let x = filled(&shape, seed);
        let a = axes.clone();
        check(move |v| v[0].sum(&a, keepdim), &[x.clone()])?;
        check(move |v| v[0].mean(&axes, keepdim), &[x])?;
    }

    #[test]
    fn unary_ops_on_random_shapes(shape in prop::collection::vec(1usize..4, 0..=3), seed in 0u64..1000) {
        let x = filled(&shape, seed);
        let positive = x.mapv(|v| v.abs() + 0.3);
        check(|v| v[0].exp(), &[x.clone()])?;
        check(|v| v[0].tanh(), &[x.clone()])?;
        check(|v| v[0].gelu(), &[x.mapv(|v| 2.5 * v)])?;
        check(|v| v[0].log(), &[positive.clone()])?;
        check(|v| v[0].sqrt(), &[positive.clone()])?;
        check(|v| v[0].pow(1.5), &[positive])?;
    }

    #[test]
    fn embedding_with_repeated_ids(vocab in 1usize..5, dim in 1usize..4, ids in prop::collection::vec(0usize..5, 1..10), seed in 0u64..1000) {
        let ids: Vec<usize> = ids.into_iter().map(|i| i % vocab).collect();
        let ids = ArrayD::from_shape_vec(IxDyn(&[ids.len()]), ids).expect("1-D");
        check(move |v| v[0].embedding(&ids)?.exp(), &[filled(&[vocab, dim], seed)])?;
    }

    #[test]
    fn row_ops_on_random_shapes(rows in prop::collection::vec(1usize..4, 0..=2), classes in 1usize..6, seed in 0u64..1000) {
        let mut shape = rows.clone();
        shape.push(classes);
        let x = filled(&shape, seed).mapv(|v| 3.0 * v);
        check(|v| v[0].softmax(), &[x.clone()])?;
        check(|v| v[0].log_softmax(), &[x.clone()])?;
        let n_rows: usize = rows.iter().product();
        let targets: Vec<i64> = (0..n_rows).map(|r| if r % 4 == 3 { -100 } else { ((r * 7 + seed as usize) % classes) as i64 }).collect();
        if targets.iter().any(|&t| t >= 0) {
            check(move |v| v[0].cross_entropy(&targets, Some(-100)), &[x.clone()])?;
        }
        let c = classes + 1; // layer norm over one value is degenerate (x̂ ≡ 0)
        let mut ln_shape = rows;
        ln_shape.push(c);
        check(|v| v[0].layer_norm(&v[1], &v[2], 1e-5), &[filled(&ln_shape, seed), filled(&[c], seed + 1), filled(&[c], seed + 2)])?;
    }

    #[test]
    fn attention_random_sizes(batch in 1usize..3, tq in 1usize..4, extra_keys in 0usize..3, heads in 1usize..3, head_dim in 1usize..4, causal in any::<bool>(), seed in 0u64..1000) {
        let tk = tq + extra_keys;
        let c = heads * head_dim;
        check(move |v| attention(&v[0], &v[1], &v[2], heads, causal), &[filled(&[batch, tq, c], seed), filled(&[batch, tk, c], seed + 1), filled(&[batch, tk, c], seed + 2)])?;
    }

    #[test]
    fn concat_and_narrow(shape in prop::collection::vec(1usize..4, 1..=3), axis_pick in 0usize..3, extra in 1usize..3, seed in 0u64..1000) {
        let axis = axis_pick % shape.len();
        let mut other = shape.clone();
        other[axis] = extra;
        check(move |v| concat(&[&v[0], &v[1]], axis), &[filled(&shape, seed), filled(&other, seed + 3)])?;
        let len = shape[axis];
        let start = seed as usize % len;
        check(move |v| v[0].narrow(axis, start, len - start), &[filled(&shape, seed)])?;
    }
}
