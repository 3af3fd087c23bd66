//! Property tests on LoRA's structure (random widths, ranks, α, targets):
//! rank(ΔW) ≤ r; col(ΔW) ⊆ col(B), row(ΔW) ⊆ row(A); B = 0 gives the base output bit for
//! bit; merge = unmerged forward and unmerge restores W; A→B→A switching and disabling are
//! exact; tape gradients of A and B equal their closed forms; frozen weights stay bit-identical
//! and rank(ΔW) ≤ r at every step of a real training run.

use ndarray::{Array2, ArrayD, Ix2, IxDyn};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tapelora_autograd::Tape;
use tapelora_gpt::{Gpt, GptConfig};
use tapelora_lora::analysis::{delta_w, numerical_rank, singular_values};
use tapelora_lora::{LoraConfig, LoraModel};
use tapelora_nn::{AdamW, AdamWConfig, Ctx, Module, Optimizer};

fn model(n_embd: usize, seed: u64) -> Gpt {
    let cfg = GptConfig {
        n_layer: 2,
        n_head: 2,
        n_embd,
        n_positions: 8,
        vocab_size: 11,
        n_inner: 3 * n_embd,
        layer_norm_epsilon: 1e-5,
        bias: true,
        dropout: 0.0,
    };
    Gpt::new(cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap()
}

fn ids(seed: u64) -> ArrayD<usize> {
    ArrayD::from_shape_fn(IxDyn(&[2, 6]), |i| {
        ((i[0] * 7 + i[1] * 3) as u64 + seed) as usize % 11
    })
}

fn logits(m: &Gpt, seed: u64) -> ArrayD<f32> {
    let tape = Tape::new();
    tape.no_grad(|| {
        m.forward(&Ctx::eval(&tape), &ids(seed))
            .unwrap()
            .value()
            .to_owned()
    })
}

fn max_rel(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max);
    diff / b.iter().map(|v| v.abs()).fold(1e-30, f32::max)
}

const TARGET_SETS: [&[&str]; 4] = [
    &["c_attn"],
    &["c_attn.q", "c_attn.v"],
    &["c_proj", "c_fc"],
    &["c_attn.k", "mlp.c_proj"],
];

/// ‖(I − P)·M‖_F / ‖M‖_F where P projects onto the column space of `basis`.
fn outside_column_space(basis: &Array2<f64>, m: &Array2<f64>) -> f64 {
    let b = nalgebra::DMatrix::from_fn(basis.nrows(), basis.ncols(), |i, j| basis[[i, j]]);
    let mm = nalgebra::DMatrix::from_fn(m.nrows(), m.ncols(), |i, j| m[[i, j]]);
    let x = b
        .clone()
        .svd(true, true)
        .solve(&mm, 1e-12)
        .expect("solvable");
    let residual = &mm - &b * x;
    residual.norm() / mm.norm().max(1e-300)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn delta_w_has_rank_at_most_r_and_lives_in_b_and_a(heads_width in 2usize..6, r in 1usize..4, alpha in 0.5f64..20.0, targets in 0usize..4, seed in 0u64..1000) {
        let n_embd = 2 * heads_width;
        let mut lm = LoraModel::new(model(n_embd, seed));
        let cfg = LoraConfig { random_b: true, ..LoraConfig::new(r, alpha, TARGET_SETS[targets]) };
        lm.add_adapter("a", &cfg, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        for layer in lm.lora_layers() {
            let adapter = &layer.adapters["a"];
            let delta = delta_w(layer, "a").unwrap();
            let r_total: usize = adapter.parts.iter().map(|p| p.r).sum();
            prop_assert!(numerical_rank(&singular_values(&delta)) <= r_total);
            for part in &adapter.parts {
                let rows = part.slice.start..part.slice.start + part.slice.len;
                let d = delta.slice(ndarray::s![rows, ..]).to_owned();
                let b = part.b.value.view().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
                let a = part.a.value.view().into_dimensionality::<Ix2>().unwrap().mapv(f64::from);
                prop_assert!(numerical_rank(&singular_values(&d)) <= part.r);
                prop_assert!(outside_column_space(&b, &d) < 1e-9, "col(ΔW) ⊄ col(B)");
                prop_assert!(outside_column_space(&a.t().to_owned(), &d.t().to_owned()) < 1e-9, "row(ΔW) ⊄ row(A)");
            }
        }
    }

    #[test]
    fn zero_b_is_the_base_bit_for_bit(r in 1usize..4, alpha in 0.5f64..20.0, targets in 0usize..4, seed in 0u64..1000) {
        let base = logits(&model(8, seed), seed);
        let mut lm = LoraModel::new(model(8, seed));
        lm.add_adapter("a", &LoraConfig::new(r, alpha, TARGET_SETS[targets]), &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        prop_assert_eq!(logits(&lm.model, seed), base);
    }

    #[test]
    fn merge_switch_disable_are_exact(r in 1usize..4, alpha in 0.5f64..20.0, targets in 0usize..4, seed in 0u64..1000) {
        prop_assume!((alpha / r as f64 - 1.0).abs() > 0.05); // α/r ≠ 1: a wrong scale would show
        let base_model = model(8, seed);
        let base = logits(&base_model, seed);
        let w_before: Vec<_> = base_model.parameters().iter().map(|p| p.value.to_owned()).collect();
        let mut lm = LoraModel::new(base_model);
        let cfg = LoraConfig { random_b: true, ..LoraConfig::new(r, alpha, TARGET_SETS[targets]) };
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        lm.add_adapter("a", &cfg, &mut rng).unwrap();
        lm.add_adapter("b", &LoraConfig { lora_alpha: alpha * 2.0, ..cfg.clone() }, &mut rng).unwrap();
        lm.set_adapter("a").unwrap();
        let with_a = logits(&lm.model, seed);
        lm.set_adapter("b").unwrap();
        let with_b = logits(&lm.model, seed);
        lm.set_adapter("a").unwrap();
        prop_assert_eq!(&logits(&lm.model, seed), &with_a, "A → B → A is exact");
        prop_assert!(with_a != with_b);
        lm.set_adapters_disabled(true);
        prop_assert_eq!(&logits(&lm.model, seed), &base, "disabled = the base exactly");
        lm.set_adapters_disabled(false);
        lm.merge_adapter("a").unwrap();
        prop_assert!(max_rel(&logits(&lm.model, seed), &with_a) < 1e-5, "merged = unmerged");
        lm.unmerge_adapter("a").unwrap();
        for (p, before) in lm.model.parameters().iter().filter(|p| !p.name.contains("lora_")).zip(&w_before) {
            let diff = p.value.iter().zip(before).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            prop_assert!(diff < 1e-5, "unmerge restores {}", p.name);
        }
        lm.delete_adapter("b").unwrap();
        prop_assert_eq!(lm.adapter_names(), vec!["a".to_string()]);
        let merged = lm.merge_and_unload().unwrap();
        prop_assert!(max_rel(&logits(&merged, seed), &with_a) < 1e-5);
    }

    #[test]
    fn tape_gradients_equal_the_closed_forms(d_in in 2usize..7, d_out in 2usize..7, r in 1usize..3, alpha in 0.5f64..10.0, seed in 0u64..1000) {
        // y = x·W0 + s·(x·Aᵀ)·Bᵀ,  L = Σ y ⊙ G  ⇒  ∂L/∂B = s·Gᵀ·(x·Aᵀ),  ∂L/∂A = s·(G·B)ᵀ·x.
        use tapelora_lora::{LoraAdapter, LoraLinear, LoraPart, OutSlice};
        use tapelora_nn::{init, Linear, Parameter, WeightLayout};
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut lin = Linear::new("l", d_in, d_out, false, WeightLayout::InOut);
        init::normal_(&mut lin.weight, 0.5, &mut rng);
        lin.weight.trainable = false;
        let mut a = Parameter::new("l.lora_A.x.weight", ArrayD::zeros(IxDyn(&[r, d_in])));
        let mut b = Parameter::new("l.lora_B.x.weight", ArrayD::zeros(IxDyn(&[d_out, r])));
        init::normal_(&mut a, 0.5, &mut rng);
        init::normal_(&mut b, 0.5, &mut rng);
        let part = LoraPart { slice: OutSlice { label: None, start: 0, len: d_out }, a: a.clone(), b: b.clone(), r, alpha, use_rslora: false };
        let s = part.scaling();
        let mut lora = LoraLinear { module: "l".into(), in_features: d_in, out_features: d_out, ..Default::default() };
        lora.adapters.insert("x".into(), LoraAdapter { parts: vec![part], dropout: 0.0 });
        lora.active = vec![("x".into(), 1.0)];
        lin.adapter = Some(Box::new(lora));
        let x = Array2::from_shape_fn((3, d_in), |(i, j)| ((i * 5 + j * 3 + seed as usize) % 7) as f32 / 7.0 - 0.4);
        let g = Array2::from_shape_fn((3, d_out), |(i, j)| ((i * 2 + j * 5 + seed as usize) % 5) as f32 / 5.0 - 0.3);
        let tape = Tape::new();
        let y = lin.forward(&Ctx::eval(&tape), &tape.constant(x.clone().into_dyn())).unwrap();
        let loss = y.mul(&tape.constant(g.clone().into_dyn())).unwrap().sum_all().unwrap();
        let grads = tape.backward(&loss).unwrap();
        prop_assert!(grads.get_by_name("l.weight").is_none(), "no gradient for the frozen W0");
        let (a2, b2) = (a.value.view().into_dimensionality::<Ix2>().unwrap().to_owned(), b.value.view().into_dimensionality::<Ix2>().unwrap().to_owned());
        let want_b = g.t().dot(&x.dot(&a2.t())) * s as f32;
        let want_a = g.dot(&b2).t().dot(&x) * s as f32;
        let close = |got: &ArrayD<f32>, want: &Array2<f32>| got.iter().zip(want.iter()).all(|(g, w)| (g - w).abs() <= 1e-5 * (1.0 + w.abs()));
        prop_assert!(close(grads.get_by_name("l.lora_B.x.weight").unwrap(), &want_b));
        prop_assert!(close(grads.get_by_name("l.lora_A.x.weight").unwrap(), &want_a));
    }
}

/// The same LoRA expression checked against finite differences in f64.
#[test]
fn lora_expression_passes_gradcheck() {
    let rnd = |shape: &[usize], k: usize| {
        ArrayD::from_shape_vec(
            IxDyn(shape),
            (0..shape.iter().product::<usize>())
                .map(|j| ((j * 7 + k * 3) % 11) as f64 / 11.0 - 0.5)
                .collect(),
        )
        .unwrap()
    };
    let (x, w0) = (rnd(&[3, 5], 1), rnd(&[5, 4], 2));
    let report = tapelora_autograd::gradcheck(
        move |v| {
            let tape = v[0].tape();
            let base = tape
                .constant(x.clone())
                .matmul(&tape.constant(w0.clone()))?;
            let delta = tape
                .constant(x.clone())
                .matmul(&v[0].transpose(0, 1)?)?
                .matmul(&v[1].transpose(0, 1)?)?
                .scale(1.7)?;
            base.add(&delta)
        },
        &[rnd(&[2, 5], 3), rnd(&[4, 2], 4)],
        &Default::default(),
    )
    .unwrap();
    assert!(report.passed, "{report:?}");
}

#[test]
fn frozen_base_is_bit_identical_and_rank_stays_below_r_during_training() {
    let mut lm = LoraModel::new(model(8, 3));
    let frozen_before: Vec<(String, ArrayD<f32>)> = lm
        .model
        .parameters()
        .iter()
        .map(|p| (p.name.clone(), p.value.to_owned()))
        .collect();
    let r = 2;
    lm.add_adapter(
        "a",
        &LoraConfig::new(r, 4.0, &["c_attn.q", "c_attn.v", "c_fc"]),
        &mut ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();
    let mut opt = AdamW::new(
        lm.model.parameters(),
        AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
    );
    assert_eq!(
        opt.state_bytes(),
        lm.model.num_trainable_params() * 8 + 8 * 2 * 6
    );
    let mut losses = Vec::new();
    for step in 0..25 {
        let grads = {
            let tape = Tape::new();
            let targets: Vec<i64> = ids(step + 1).iter().map(|&t| t as i64).collect();
            let loss = lm
                .model
                .forward_loss(&Ctx::train(&tape, step), &ids(step), &targets)
                .unwrap();
            losses.push(loss.item().unwrap());
            tape.backward(&loss).unwrap()
        };
        assert!(
            grads.names().all(|n| n.contains(".lora_")),
            "gradients only for adapters"
        );
        opt.step(&mut lm.model.parameters_mut(), &grads, 1e-2)
            .unwrap();
        for layer in lm.lora_layers() {
            let r_total: usize = layer.adapters["a"].parts.iter().map(|p| p.r).sum();
            let rank = numerical_rank(&singular_values(&delta_w(layer, "a").unwrap()));
            assert!(
                rank <= r_total,
                "step {step}: rank(ΔW) = {rank} > {r_total} at {}",
                layer.module
            );
        }
    }
    assert!(
        losses.last() < losses.first(),
        "the adapter learns: {losses:?}"
    );
    for (name, before) in frozen_before {
        let now = lm
            .model
            .parameters()
            .into_iter()
            .find(|p| p.name == name)
            .unwrap();
        assert!(!now.trainable);
        assert_eq!(now.value.view(), before.view(), "{name} changed");
    }
}

#[test]
fn weighted_combinations_cat_svd_linear() {
    use tapelora_lora::Combination;
    let mut lm = LoraModel::new(model(16, 9));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let cfg = LoraConfig {
        random_b: true,
        ..LoraConfig::new(2, 3.0, &["c_attn.q", "c_attn.v", "c_fc"])
    };
    lm.add_adapter("a", &cfg, &mut rng).unwrap();
    lm.add_adapter(
        "b",
        &LoraConfig {
            r: 3,
            lora_alpha: 5.0,
            ..cfg.clone()
        },
        &mut rng,
    )
    .unwrap();
    let weights = vec![("a".to_string(), 0.7), ("b".to_string(), -0.4)];
    lm.add_weighted_adapter("cat", &weights, Combination::Cat)
        .unwrap();
    lm.add_weighted_adapter("svd", &weights, Combination::Svd { rank: 4 })
        .unwrap();
    lm.add_weighted_adapter("svd1", &weights, Combination::Svd { rank: 1 })
        .unwrap();
    assert!(
        lm.add_weighted_adapter("lin", &weights, Combination::Linear)
            .is_err(),
        "linear needs equal ranks"
    );
    for layer in lm.lora_layers() {
        let want = delta_w(layer, "a").unwrap() * 0.7 - delta_w(layer, "b").unwrap() * 0.4;
        let scale = want.iter().map(|v| v.abs()).fold(0.0, f64::max);
        let err = |name: &str| {
            (delta_w(layer, name).unwrap() - &want)
                .iter()
                .map(|v| v.abs())
                .fold(0.0, f64::max)
                / scale
        };
        assert!(
            err("cat") < 1e-5,
            "cat is exact at {}: {}",
            layer.module,
            err("cat")
        );
        // The weighted sum has rank ≤ 2+3 per slice; svd(4) is closer to it than svd(1).
        assert!(err("svd") < err("svd1"), "{}", layer.module);
        let rank = numerical_rank(&singular_values(&delta_w(layer, "svd1").unwrap()));
        assert_eq!(rank, 1);
    }
    // Weighted activation of several adapters equals the sum of their deltas.
    lm.set_weighted_adapters(&weights).unwrap();
    let combined = logits(&lm.model, 1);
    lm.set_adapter("cat").unwrap();
    assert!(max_rel(&logits(&lm.model, 1), &combined) < 1e-5);
    let mut lm2 = LoraModel::new(model(16, 9));
    lm2.add_adapter("a", &cfg, &mut ChaCha8Rng::seed_from_u64(2))
        .unwrap();
    lm2.add_adapter("b", &cfg, &mut ChaCha8Rng::seed_from_u64(3))
        .unwrap();
    lm2.add_weighted_adapter(
        "lin",
        &[("a".into(), 1.0), ("b".into(), 1.0)],
        Combination::Linear,
    )
    .unwrap();
    let lin = &lm2.lora_layers()[0].adapters["lin"].parts[0];
    assert_eq!(
        lin.r, 4,
        "the q and v slices (rank 2 each) are summed slice by slice, then stacked"
    );
}

#[test]
fn lora_on_the_tied_embedding_trains_merges_and_round_trips() {
    let base = model(8, 21);
    let base_logits = logits(&base, 2);
    let mut lm = LoraModel::new(base);
    lm.add_adapter(
        "e",
        &LoraConfig::new(2, 4.0, &["wte", "c_attn.v"]),
        &mut ChaCha8Rng::seed_from_u64(4),
    )
    .unwrap();
    assert_eq!(
        logits(&lm.model, 2),
        base_logits,
        "A = 0 at start: the base exactly"
    );
    assert_eq!(lm.lora_layers()[0].module, "wte");
    // Train a few steps so A moves away from zero.
    let mut opt = AdamW::new(lm.model.parameters(), AdamWConfig::default());
    for step in 0..5u64 {
        let grads = {
            let tape = Tape::new();
            let targets: Vec<i64> = ids(step + 1).iter().map(|&t| t as i64).collect();
            let loss = lm
                .model
                .forward_loss(&Ctx::eval(&tape), &ids(step), &targets)
                .unwrap();
            tape.backward(&loss).unwrap()
        };
        assert!(grads.get_by_name("wte.lora_A.e.weight").is_some());
        assert!(
            grads.get_by_name("wte.weight").is_none(),
            "the tied table stays frozen"
        );
        opt.step(&mut lm.model.parameters_mut(), &grads, 1e-2)
            .unwrap();
    }
    let adapted = logits(&lm.model, 2);
    assert!(adapted != base_logits);
    let dir = std::env::temp_dir().join(format!("tapelora-wte-lora-{}", std::process::id()));
    tapelora_lora::peft::save_adapter(&lm, "e", &dir, "tiny").unwrap();
    let file = tapelora_nn::TensorFile::open(&dir.join("adapter_model.safetensors")).unwrap();
    assert!(file
        .names()
        .contains(&"base_model.model.transformer.wte.lora_embedding_A".to_string()));
    let mut again = LoraModel::new(model(8, 21));
    tapelora_lora::peft::load_adapter(&mut again, "e", &dir).unwrap();
    assert_eq!(
        logits(&again.model, 2),
        adapted,
        "reloaded adapter: same logits"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // The lm_head is tied to the adapted table, so merging changes nothing.
    lm.merge_adapter("e").unwrap();
    assert!(max_rel(&logits(&lm.model, 2), &adapted) < 1e-5);
    lm.unmerge_adapter("e").unwrap();
    let merged = lm.merge_and_unload().unwrap();
    assert!(max_rel(&logits(&merged, 2), &adapted) < 1e-5);
}
