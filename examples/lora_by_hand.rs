//! LoRA by hand: one `Linear` layer (nn.Linear layout, W₀ `[out, in]`) with a rank-2 LoRA
//! adapter, trained for a few plain-SGD steps on a toy regression, with every number printed.
//!
//! ```text
//! y = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ        x [N, in]  W₀ [out, in] (frozen)  A [r, in]  B [out, r]  s = α/r
//! L = mean((y − t)²)
//! ```
//!
//! Each step prints A, B, y, the loss and ∂L/∂A, ∂L/∂B from the tape, checks them against the
//! closed forms (G = ∂L/∂y = 2(y − t)/(N·out); ∂L/∂B = s·Gᵀ·(x·Aᵀ); ∂L/∂A = s·(G·B)ᵀ·x) and
//! against central finite differences in f64 (`gradcheck`), then applies A ← A − lr·∂L/∂A,
//! B ← B − lr·∂L/∂B number by number. Along the way it shows that B = 0 makes the first output
//! equal the base output bit for bit, that W₀ gets no gradient and is never changed, that
//! rank(ΔW) ≤ r, and finally merges W = W₀ + s·B·A and checks the merged layer.
//! `docs/lora-step-by-step.md` walks through the numbers.
//!
//!     cargo run --release --example lora_by_hand

use ndarray::{Array2, ArrayBase, ArrayD, Data, Ix2, IxDyn};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tapelora::autograd::{gradcheck, Float, GradcheckOptions, Tape, Var};
use tapelora_lora::analysis::{delta_w, numerical_rank, singular_values};
use tapelora_lora::{LoraAdapter, LoraLinear, LoraPart, OutSlice};
use tapelora_nn::{Ctx, Linear, Module, Parameter, WeightLayout};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const D_IN: usize = 4;
const D_OUT: usize = 3;
const R: usize = 2;
const BATCH: usize = 5;
const ALPHA: f64 = 4.0;
const LR: f32 = 0.5;
const STEPS: usize = 3;
const W0_NAME: &str = "layer.weight";
const A_NAME: &str = "layer.lora_A.default.weight";
const B_NAME: &str = "layer.lora_B.default.weight";

/// A `rows × cols` matrix of seeded uniform values in ±`range`, rounded to two decimals so the
/// printout is easy to read (and to redo by hand).
fn rounded(rng: &mut ChaCha8Rng, rows: usize, cols: usize, range: f32) -> Array2<f32> {
    Array2::from_shape_simple_fn((rows, cols), || {
        (rng.random_range(-range..range) * 100.0).round() / 100.0
    })
}

fn to2<T: Float, S: Data<Elem = T>>(a: &ArrayBase<S, IxDyn>) -> Res<Array2<f64>> {
    Ok(a.view().into_dimensionality::<Ix2>()?.mapv(|v| v.as_f64()))
}

fn show<T: Float, S: Data<Elem = T>>(label: &str, m: &ArrayBase<S, IxDyn>) {
    println!("{label}  {:?}", m.shape());
    for row in m.rows() {
        let cells: Vec<String> = row
            .iter()
            .map(|v| format!("{:>10.5}", v.as_f64()))
            .collect();
        println!("    [{} ]", cells.join(""));
    }
}

fn max_abs(m: &Array2<f64>) -> f64 {
    m.iter().fold(0.0, |acc, v| acc.max(v.abs()))
}

fn max_abs_diff(a: &Array2<f64>, b: &Array2<f64>) -> f64 {
    a.iter()
        .zip(b.iter())
        .fold(0.0, |acc, (x, y)| acc.max((x - y).abs()))
}

fn bits_equal(a: &ArrayD<f32>, b: &ArrayD<f32>) -> bool {
    a.shape() == b.shape()
        && a.iter()
            .zip(b.iter())
            .all(|(x, y)| x.to_bits() == y.to_bits())
}

/// Tape gradient vs closed form: max |difference| must be within 1e-5 relative (f32 tape vs
/// f64 formula), with a tiny absolute floor for an all-zero gradient.
fn compare(what: &str, tape: &Array2<f64>, closed: &Array2<f64>) -> Res<()> {
    let diff = max_abs_diff(tape, closed);
    let bound = 1e-5 * max_abs(closed) + 1e-9;
    println!("    max |tape − closed form| for {what} = {diff:.3e}   (allowed {bound:.3e})");
    if diff > bound {
        return Err(format!(
            "{what}: tape and closed form differ by {diff:.3e} (allowed {bound:.3e})"
        )
        .into());
    }
    Ok(())
}

/// The LoRA layer's loss written directly with tape ops, for any element type: the f64 copy
/// is what `gradcheck` differentiates numerically.
fn lora_loss<'t, T: Float>(
    x: &Var<'t, T>,
    w0: &Var<'t, T>,
    a: &Var<'t, T>,
    b: &Var<'t, T>,
    t: &Var<'t, T>,
    s: f64,
) -> tapelora::autograd::Result<Var<'t, T>> {
    let base = x.matmul(&w0.transpose(0, 1)?)?;
    let delta = x
        .matmul(&a.transpose(0, 1)?)?
        .matmul(&b.transpose(0, 1)?)?
        .scale(s)?;
    let err = base.add(&delta)?.sub(t)?;
    err.mul(&err)?.mean_all()
}

fn param_value(layer: &Linear, name: &str) -> Res<ArrayD<f32>> {
    layer
        .parameters()
        .into_iter()
        .find(|p| p.name == name)
        .map(|p| p.value.to_owned())
        .ok_or_else(|| format!("no parameter {name}").into())
}

fn set_param(layer: &mut Linear, name: &str, value: ArrayD<f32>) -> Res<()> {
    let p = layer
        .parameters_mut()
        .into_iter()
        .find(|p| p.name == name)
        .ok_or(format!("no parameter {name}"))?;
    p.value = value.into_shared();
    Ok(())
}

/// The layer's output for `x` on a fresh tape, with recording off.
fn output(layer: &Linear, x: &ArrayD<f32>) -> Res<ArrayD<f32>> {
    let tape = Tape::<f32>::new();
    let y = tape.no_grad(|| layer.forward(&Ctx::eval(&tape), &tape.constant(x.clone())))?;
    Ok(y.value().to_owned())
}

fn loss_of(y: &ArrayD<f32>, t: &ArrayD<f32>) -> f64 {
    let n = y.len() as f64;
    y.iter()
        .zip(t.iter())
        .map(|(y, t)| (f64::from(*y) - f64::from(*t)).powi(2))
        .sum::<f64>()
        / n
}

/// Runs the lesson; `Err` names the first check that failed.
fn lesson() -> Res<()> {
    let s = ALPHA / R as f64;
    println!("== LoRA by hand: one Linear layer, d_in = {D_IN}, d_out = {D_OUT}, r = {R}, α = {ALPHA}, s = α/r = {s}, batch N = {BATCH}, SGD lr = {LR}\n");

    // --- data, base weight, hidden target -------------------------------------------------
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let x = rounded(&mut rng, BATCH, D_IN, 1.0).into_dyn();
    let w0 = rounded(&mut rng, D_OUT, D_IN, 0.5).into_dyn();
    // The "true" weight differs from W₀ by a rank-2 change U·V that LoRA has to discover.
    let u = rounded(&mut rng, D_OUT, R, 1.0);
    let v = rounded(&mut rng, R, D_IN, 1.0);
    let w_true = &w0.view().into_dimensionality::<Ix2>()? + &u.dot(&v);
    let t = x
        .view()
        .into_dimensionality::<Ix2>()?
        .dot(&w_true.t())
        .into_dyn();
    // LoRA's initialisation: A small and random, B exactly zero.
    let a0 = rounded(&mut rng, R, D_IN, 0.5).into_dyn();
    let b0 = ArrayD::<f32>::zeros(IxDyn(&[D_OUT, R]));

    show("x (the batch of inputs)", &x);
    show(
        "W₀ = layer.weight (frozen, nn.Linear layout [out, in])",
        &w0,
    );
    show(
        "t = x·(W₀ + U·V)ᵀ (the targets; U·V is a hidden rank-2 change to W₀)",
        &t,
    );

    // --- the layer: a frozen Linear with a LoRA adapter attached by hand -------------------
    let mut linear = Linear::new("layer", D_IN, D_OUT, false, WeightLayout::OutIn);
    linear.weight.value = w0.clone().into_shared();
    linear.weight.trainable = false;
    let part = LoraPart {
        slice: OutSlice {
            label: None,
            start: 0,
            len: D_OUT,
        },
        a: Parameter::new(A_NAME, a0.clone()),
        b: Parameter::new(B_NAME, b0.clone()),
        r: R,
        alpha: ALPHA,
        use_rslora: false,
    };
    let mut lora = LoraLinear {
        module: "layer".into(),
        in_features: D_IN,
        out_features: D_OUT,
        ..Default::default()
    };
    lora.adapters.insert(
        "default".into(),
        LoraAdapter {
            parts: vec![part],
            dropout: 0.0,
        },
    );
    lora.active = vec![("default".into(), 1.0)];
    linear.adapter = Some(Box::new(lora));
    println!(
        "\nparameters: {} in total, {} trainable (A: {}×{}, B: {}×{}); W₀'s {} are frozen\n",
        linear.num_params(),
        linear.num_trainable_params(),
        R,
        D_IN,
        D_OUT,
        R,
        D_OUT * D_IN
    );

    let xm = to2(&x)?;
    let tm = to2(&t)?;
    let w0m = to2(&w0)?;
    let mut losses = Vec::new();

    for step in 0..STEPS {
        println!("================================ step {step} ================================");
        let a = param_value(&linear, A_NAME)?;
        let b = param_value(&linear, B_NAME)?;
        show("A = lora_A", &a);
        show("B = lora_B", &b);

        // Forward on a fresh tape: x → Linear (+ LoRA) → MSE against t.
        let tape = Tape::<f32>::new();
        tape.set_track_norms(step == 0);
        let x_var = tape.constant(x.clone());
        let y = linear.forward(&Ctx::train(&tape, 0), &x_var)?;
        let err = y.sub(&tape.constant(t.clone()))?;
        let loss = err.mul(&err)?.mean_all()?;
        let loss_value = loss.item().ok_or("loss is not a scalar")?;
        losses.push(loss_value);
        show("y = x·W₀ᵀ + s·(x·Aᵀ)·Bᵀ", y.value());
        println!("loss L = mean((y − t)²) = {loss_value:.6}");

        if step == 0 {
            // B = 0, so the adapter adds exactly zero: y is the base output, bit for bit.
            let base_tape = Tape::<f32>::new();
            let base = base_tape.no_grad(|| {
                linear.forward_base(&Ctx::eval(&base_tape), &base_tape.constant(x.clone()))
            })?;
            let same = bits_equal(&y.value().to_owned(), &base.value().to_owned());
            println!("B = 0 at the start ⇒ y equals the base output x·W₀ᵀ bit for bit: {same}");
            if !same {
                return Err("with B = 0 the LoRA output differs from the base output".into());
            }
        }

        let saved_before = tape.saved_bytes();
        let grads = tape.backward(&loss)?;
        if step == 0 {
            println!(
                "bytes the tape kept for backward: {saved_before} before backward, {} after",
                tape.saved_bytes()
            );
        }
        let ga = to2(grads.get_by_name(A_NAME).ok_or("no gradient for A")?)?;
        let gb = to2(grads.get_by_name(B_NAME).ok_or("no gradient for B")?)?;
        let mut names: Vec<&str> = grads.names().collect();
        names.sort();
        println!(
            "gradients the tape produced: {names:?}; for {W0_NAME}: {}",
            match grads.get_by_name(W0_NAME) {
                None => "none (frozen: never computed)",
                Some(_) => "PRESENT",
            }
        );
        if grads.get_by_name(W0_NAME).is_some() {
            return Err("the frozen W₀ received a gradient".into());
        }
        if step == 0 {
            println!("\nThe tape after backward (step 0):\n{tape}");
            println!("{}", tape.backward_walk());
        }

        // Closed forms, by hand with ndarray in f64.
        let (am, bm) = (to2(&a)?, to2(&b)?);
        let xa = xm.dot(&am.t()); // [N, r]
        let y_hand = xm.dot(&w0m.t()) + xa.dot(&bm.t()) * s;
        let n = y_hand.len() as f64;
        let g = (&y_hand - &tm) * (2.0 / n); // ∂L/∂y
        let gb_closed = g.t().dot(&xa) * s;
        let ga_closed = g.dot(&bm).t().dot(&xm) * s;
        println!("\nG = ∂L/∂y = 2(y − t)/{n}  (N·d_out = {n} elements averaged)");
        show("G", &g.clone().into_dyn());
        let y_diff = max_abs_diff(&to2(y.value())?, &y_hand);
        println!("    max |y(tape) − y(by hand)| = {y_diff:.3e}");
        if y_diff > 1e-5 * max_abs(&y_hand) + 1e-9 {
            return Err(format!("the tape's y differs from y by hand by {y_diff:.3e}").into());
        }
        show("h = x·Aᵀ (the r-wide bottleneck)", &xa.clone().into_dyn());
        show("∂L/∂B from the tape", &gb.clone().into_dyn());
        show("∂L/∂B = s·Gᵀ·(x·Aᵀ) by hand", &gb_closed.clone().into_dyn());
        compare("∂L/∂B", &gb, &gb_closed)?;
        show("∂L/∂A from the tape", &ga.clone().into_dyn());
        show("∂L/∂A = s·(G·B)ᵀ·x by hand", &ga_closed.clone().into_dyn());
        compare("∂L/∂A", &ga, &ga_closed)?;
        if step == 0 {
            println!("    (∂L/∂A is exactly 0 at step 0: it is proportional to B, and B = 0)");
        }

        // Finite differences on the same expression in f64.
        let (x64, w064, t64) = (x.mapv(f64::from), w0.mapv(f64::from), t.mapv(f64::from));
        let report = gradcheck(
            |v: &[Var<'_, f64>]| {
                let tape = v[0].tape();
                lora_loss(
                    &tape.constant(x64.clone()),
                    &tape.constant(w064.clone()),
                    &v[0],
                    &v[1],
                    &tape.constant(t64.clone()),
                    s,
                )
            },
            &[a.mapv(f64::from), b.mapv(f64::from)],
            &GradcheckOptions::default(),
        )?;
        println!(
            "gradcheck (f64, central differences, {} elements of A and B): passed = {}, max abs err = {:.3e}, max rel err = {:.3e}",
            report.checked, report.passed, report.max_abs_err, report.max_rel_err
        );
        if !report.passed {
            return Err(format!("gradcheck failed: {:?}", report.first_failure).into());
        }

        // Plain SGD, written out: θ ← θ − lr·∂L/∂θ.
        println!("\nSGD update, θ ← θ − lr·∂L/∂θ with lr = {LR}:");
        let mut new = Vec::new();
        for (name, short, value, grad) in [(A_NAME, "A", &a, &ga), (B_NAME, "B", &b, &gb)] {
            let mut updated = value.clone();
            for ((i, j), gv) in grad.indexed_iter() {
                let old = value[[i, j]];
                let gv = *gv as f32;
                let nv = old - LR * gv;
                updated[[i, j]] = nv;
                println!("    {short}[{i},{j}]: {old:>9.5} − {LR} × {gv:>9.5} = {nv:>9.5}");
            }
            new.push((name, updated));
        }
        for (name, value) in new {
            set_param(&mut linear, name, value)?;
        }
        println!();
    }

    // --- after training -------------------------------------------------------------------
    println!(
        "================================ after {STEPS} steps ================================"
    );
    let final_loss = loss_of(&output(&linear, &x)?, &t) as f32;
    losses.push(final_loss);
    let listed: Vec<String> = losses
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "{l:.6} ({})",
                if i < STEPS {
                    format!("step {i}")
                } else {
                    "after".into()
                }
            )
        })
        .collect();
    println!("loss per step: {}", listed.join(" → "));
    if final_loss >= losses[0] {
        return Err(format!("the loss did not go down: {} → {final_loss}", losses[0]).into());
    }

    let w_after = linear.weight.value.to_owned();
    let untouched = bits_equal(&w_after, &w0);
    println!("W₀ bit-identical to its initial value after training: {untouched}");
    if !untouched {
        return Err("the frozen W₀ changed during training".into());
    }

    let a = param_value(&linear, A_NAME)?;
    let b = param_value(&linear, B_NAME)?;
    show("A (trained)", &a);
    show("B (trained)", &b);
    let delta_hand = to2(&b)?.dot(&to2(&a)?) * s;
    let lora_ref = linear
        .adapter
        .as_ref()
        .and_then(|ad| ad.as_any().downcast_ref::<LoraLinear>())
        .ok_or("the adapter is not a LoraLinear")?;
    let delta = delta_w(lora_ref, "default").ok_or("no adapter named default")?;
    show("ΔW = s·B·A  [out, in]", &delta.clone().into_dyn());
    let d = max_abs_diff(&delta, &delta_hand);
    if d > 1e-12 {
        return Err(format!("delta_w differs from s·B·A by hand by {d:.3e}").into());
    }
    let sv = singular_values(&delta);
    let rank = numerical_rank(&sv);
    let svs: Vec<String> = sv.iter().map(|v| format!("{v:.3e}")).collect();
    println!(
        "singular values of ΔW: [{}] → numerical rank {rank} ≤ r = {R}",
        svs.join(", ")
    );
    if rank > R {
        return Err(format!("rank(ΔW) = {rank} exceeds r = {R}").into());
    }

    // --- merge: W = W₀ + s·B·A, drop the adapter --------------------------------------------
    let y_lora = output(&linear, &x)?;
    let merged = (&w0m + &delta).mapv(|v| v as f32).into_dyn();
    linear.weight.value = merged.clone().into_shared();
    linear.adapter = None;
    show(
        "merged W = W₀ + s·B·A (one plain Linear, no adapter)",
        &merged,
    );
    let y_merged = output(&linear, &x)?;
    show("y from the merged layer", &y_merged);
    let (ym, yl) = (to2(&y_merged)?, to2(&y_lora)?);
    let diff = max_abs_diff(&ym, &yl);
    let bound = 1e-6 * max_abs(&yl);
    println!("max |y(merged) − y(LoRA)| = {diff:.3e}   (allowed {bound:.3e})");
    if diff > bound {
        return Err(format!("merged output differs from the LoRA output by {diff:.3e}").into());
    }
    println!("\nall checks passed");
    Ok(())
}

fn main() {
    if let Err(e) = lesson() {
        eprintln!("lora_by_hand: check failed: {e}");
        std::process::exit(1);
    }
}
