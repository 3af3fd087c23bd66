//! Checks every op's backward rule against central finite differences (in f64) and prints one
//! row per op: the shapes tried, the largest absolute and relative errors, and the verdict.
//! Exits non-zero if any op fails.
//!
//!     cargo run --release --example gradcheck_all

use ndarray::{ArrayD, IxDyn};
use rand::{Rng, SeedableRng};
use tapelora::autograd::{attention, concat, gradcheck, GradcheckOptions, LoraTerm, Result, Var};

fn rand(shape: &[usize], seed: u64) -> ArrayD<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    ArrayD::from_shape_simple_fn(IxDyn(shape), || rng.random_range(-1.0..1.0))
}

fn positive(shape: &[usize], seed: u64) -> ArrayD<f64> {
    rand(shape, seed).mapv(|v| v.abs() + 0.3)
}

type OpFn = Box<dyn for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>>>;

struct Case {
    op: &'static str,
    f: OpFn,
    inputs: Vec<ArrayD<f64>>,
}

fn case(
    op: &'static str,
    inputs: Vec<ArrayD<f64>>,
    f: impl for<'t> Fn(&[Var<'t, f64>]) -> Result<Var<'t, f64>> + 'static,
) -> Case {
    Case {
        op,
        f: Box::new(f),
        inputs,
    }
}

fn cases() -> Vec<Case> {
    let ids = ArrayD::from_shape_vec(IxDyn(&[2, 4]), vec![3, 1, 3, 0, 2, 2, 3, 1]).expect("2×4");
    vec![
        case("matmul", vec![rand(&[2, 3, 4], 1), rand(&[4, 5], 2)], |x| {
            x[0].matmul(&x[1])
        }),
        case(
            "matmul",
            vec![rand(&[2, 3, 4], 3), rand(&[2, 4, 2], 4)],
            |x| x[0].matmul(&x[1]),
        ),
        case(
            "linear",
            vec![rand(&[2, 3, 4], 101), rand(&[5, 4], 102), rand(&[5], 103)],
            |x| x[0].linear(&x[1].transpose(0, 1)?, Some(&x[2])),
        ),
        case(
            "add_low_rank_columns",
            vec![
                rand(&[2, 3, 6], 104),
                rand(&[2, 3, 2], 105),
                rand(&[2, 2], 106),
            ],
            |x| x[0].clone().add_low_rank_columns(&x[1], &[(&x[2], 4, 0.5)]),
        ),
        case(
            "linear_low_rank",
            vec![
                rand(&[2, 3, 4], 107),
                rand(&[4, 6], 108),
                rand(&[6], 109),
                rand(&[2, 3, 3], 110),
                rand(&[2, 2], 111),
                rand(&[2, 1], 112),
            ],
            |x| {
                let vt = x[5].transpose(0, 1)?;
                x[0].linear_low_rank(
                    &x[1],
                    Some(&x[2]),
                    &x[3],
                    &[(&x[4], 0, 0.5), (&vt, 4, -2.0)],
                )
            },
        ),
        case(
            "linear_lora",
            vec![
                rand(&[2, 3, 4], 113),
                rand(&[4, 6], 114),
                rand(&[6], 115),
                rand(&[2, 4], 116),
                rand(&[3, 2], 117),
                rand(&[1, 4], 118),
                rand(&[2, 1], 126),
            ],
            |x| {
                let terms = [
                    LoraTerm {
                        a: &x[3],
                        b: &x[4],
                        start: 0,
                        scale: 0.5,
                    },
                    LoraTerm {
                        a: &x[5],
                        b: &x[6],
                        start: 4,
                        scale: -2.0,
                    },
                ];
                x[0].linear_lora(&x[1], Some(&x[2]), &terms)
            },
        ),
        case(
            "linear_residual",
            vec![
                rand(&[2, 3, 4], 119),
                rand(&[4, 5], 120),
                rand(&[5], 121),
                rand(&[2, 3, 5], 122),
            ],
            |x| x[0].linear_residual(&x[1], Some(&x[2]), &x[3]),
        ),
        case(
            "linear_gelu",
            vec![rand(&[2, 3, 4], 123), rand(&[4, 5], 124), rand(&[5], 125)],
            |x| x[0].linear_gelu(&x[1], Some(&x[2])),
        ),
        case("add", vec![rand(&[2, 3, 4], 5), rand(&[3, 1], 6)], |x| {
            x[0].add(&x[1])
        }),
        case("sub", vec![rand(&[2, 1, 4], 7), rand(&[3, 4], 8)], |x| {
            x[0].sub(&x[1])
        }),
        case(
            "mul",
            vec![rand(&[2, 3, 4], 9), rand(&[1, 3, 1], 10)],
            |x| x[0].mul(&x[1]),
        ),
        case("div", vec![rand(&[2, 3], 11), positive(&[3], 12)], |x| {
            x[0].div(&x[1])
        }),
        case("neg", vec![rand(&[3, 4], 13)], |x| x[0].neg()),
        case("scale", vec![rand(&[3, 4], 14)], |x| x[0].scale(-1.7)),
        case("pow", vec![positive(&[3, 4], 15)], |x| x[0].pow(2.5)),
        case("exp", vec![rand(&[3, 4], 16)], |x| x[0].exp()),
        case("log", vec![positive(&[3, 4], 17)], |x| x[0].log()),
        case("sqrt", vec![positive(&[3, 4], 18)], |x| x[0].sqrt()),
        case("tanh", vec![rand(&[3, 4], 19)], |x| x[0].tanh()),
        case("gelu", vec![rand(&[3, 4], 20).mapv(|v| 3.0 * v)], |x| {
            x[0].gelu()
        }),
        case(
            "relu",
            vec![rand(&[3, 4], 21).mapv(|v| if v.abs() < 0.05 { 0.5 } else { v })],
            |x| x[0].relu(),
        ),
        case("sum", vec![rand(&[2, 3, 4], 22)], |x| {
            x[0].sum(&[0, 2], false)
        }),
        case("mean", vec![rand(&[2, 3, 4], 23)], |x| {
            x[0].mean(&[1], true)
        }),
        case("reshape", vec![rand(&[2, 3, 4], 24)], |x| {
            x[0].transpose(0, 2)?.reshape(&[4, 6])
        }),
        case("transpose", vec![rand(&[2, 3, 4], 25)], |x| {
            x[0].transpose(1, 2)
        }),
        case("permute", vec![rand(&[2, 3, 4], 26)], |x| {
            x[0].permute(&[2, 0, 1])
        }),
        case("embedding", vec![rand(&[4, 3], 27)], move |x| {
            x[0].embedding(&ids)
        }),
        case(
            "softmax",
            vec![rand(&[2, 3, 5], 28).mapv(|v| 3.0 * v)],
            |x| x[0].softmax(),
        ),
        case(
            "log_softmax",
            vec![rand(&[2, 3, 5], 29).mapv(|v| 3.0 * v)],
            |x| x[0].log_softmax(),
        ),
        case(
            "cross_entropy",
            vec![rand(&[2, 3, 5], 30).mapv(|v| 3.0 * v)],
            |x| x[0].cross_entropy(&[0, 4, -100, 2, 2, 1], Some(-100)),
        ),
        case(
            "layer_norm",
            vec![
                rand(&[2, 3, 6], 31),
                rand(&[6], 32).mapv(|v| 1.0 + v),
                rand(&[6], 33),
            ],
            |x| x[0].layer_norm(&x[1], &x[2], 1e-5),
        ),
        case(
            "attention",
            vec![
                rand(&[2, 4, 6], 34),
                rand(&[2, 4, 6], 35),
                rand(&[2, 4, 6], 36),
            ],
            |x| attention(&x[0], &x[1], &x[2], 3, true),
        ),
        case(
            "attention",
            vec![
                rand(&[1, 2, 4], 37),
                rand(&[1, 5, 4], 38),
                rand(&[1, 5, 4], 39),
            ],
            |x| attention(&x[0], &x[1], &x[2], 2, true),
        ),
        case("concat", vec![rand(&[2, 3], 40), rand(&[2, 2], 41)], |x| {
            concat(&[&x[0], &x[1]], 1)
        }),
        case("slice", vec![rand(&[3, 5], 42)], |x| x[0].narrow(1, 1, 3)),
        case("dropout", vec![rand(&[4, 5], 43)], |x| {
            x[0].dropout(0.3, true, &mut rand::rngs::StdRng::seed_from_u64(0))
        }),
    ]
}

/// Runs every case, prints the table, and returns the number of failing ops.
fn run() -> usize {
    let opts = GradcheckOptions::default();
    println!(
        "gradcheck: central differences in f64, eps={:e}, pass iff |analytic − numeric| ≤ {:e} + {:e}·|numeric|\n",
        opts.eps, opts.atol, opts.rtol
    );
    println!(
        "{:<14} {:<34} {:>8} {:>12} {:>12}  result",
        "op", "input shapes", "checked", "max abs err", "max rel err"
    );
    let mut failures = 0;
    for c in cases() {
        let shapes = c
            .inputs
            .iter()
            .map(|x| format!("{:?}", x.shape()))
            .collect::<Vec<_>>()
            .join(" ");
        match gradcheck(&c.f, &c.inputs, &opts) {
            Ok(r) => {
                if !r.passed {
                    failures += 1;
                }
                println!(
                    "{:<14} {:<34} {:>8} {:>12.2e} {:>12.2e}  {}",
                    c.op,
                    shapes,
                    r.checked,
                    r.max_abs_err,
                    r.max_rel_err,
                    if r.passed {
                        "ok".to_string()
                    } else {
                        format!("FAILED at {:?}", r.first_failure)
                    }
                );
            }
            Err(e) => {
                failures += 1;
                println!("{:<14} {:<34} error: {e}", c.op, shapes);
            }
        }
    }
    failures
}

fn main() {
    let failures = run();
    if failures > 0 {
        eprintln!("\n{failures} op check(s) failed");
        std::process::exit(1);
    }
    println!("\nall ops pass");
}
