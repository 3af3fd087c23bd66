//! Backward computes no gradient nobody needs. This file holds a single test so that the
//! process-wide GEMM counters are not disturbed by other tests running in parallel.

use ndarray::{ArrayD, IxDyn};
use tapelora_autograd::gemm::{gemm_calls, gemm_flops};
use tapelora_autograd::{GradStatus, Tape};

fn ones(shape: &[usize]) -> ArrayD<f32> {
    ArrayD::from_elem(IxDyn(shape), 0.01)
}

#[test]
fn frozen_weight_gradient_matmuls_never_run() {
    let (batch, d_in, d_out, rank) = (8, 64, 48, 4);

    // y = x·Wᵀ with W trainable: forward 1 GEMM, backward 1 GEMM (dW; x is data).
    let tape = Tape::<f32>::new();
    let x = tape.constant(ones(&[batch, d_in]));
    let w = tape.param("w", ones(&[d_out, d_in]));
    let loss = x
        .matmul(&w.transpose(0, 1).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let before = gemm_calls();
    tape.backward(&loss).unwrap();
    assert_eq!(
        gemm_calls() - before,
        1,
        "dW is computed, dx is not (x is data)"
    );

    // The same with W frozen: the loss needs no gradient at all.
    let tape = Tape::<f32>::new();
    let x = tape.constant(ones(&[batch, d_in]));
    let w = tape.frozen("w", ones(&[d_out, d_in]));
    let y = x.matmul(&w.transpose(0, 1).unwrap()).unwrap();
    assert!(!y.requires_grad());
    assert_eq!(
        tape.saved_bytes(),
        0,
        "a frozen-only sub-graph saves nothing"
    );
    assert!(tape.backward(&y.sum_all().unwrap()).is_err());

    // LoRA: y = x·W0ᵀ + (x·Aᵀ)·Bᵀ with W0 frozen, A and B trainable.
    let tape = Tape::<f32>::new();
    let x = tape.constant(ones(&[batch, d_in]));
    let w0 = tape.frozen("w0", ones(&[d_out, d_in]));
    let a = tape.param("lora_A", ones(&[rank, d_in]));
    let b = tape.param("lora_B", ones(&[d_out, rank]));
    let base = x.matmul(&w0.transpose(0, 1).unwrap()).unwrap();
    let xa = x.matmul(&a.transpose(0, 1).unwrap()).unwrap();
    let delta = xa.matmul(&b.transpose(0, 1).unwrap()).unwrap();
    let loss = base
        .add(&delta)
        .unwrap()
        .mul(&base.add(&delta).unwrap())
        .unwrap()
        .mean_all()
        .unwrap();
    let (calls0, flops0) = (gemm_calls(), gemm_flops());
    let grads = tape.backward(&loss).unwrap();
    // dB = G·(xA) [d_out×rank], d(xA) = G·B [batch×rank], dA = d(xA)ᵀ·x: three thin GEMMs.
    // Neither dW0 (d_out×d_in, 2·batch·d_out·d_in flops) nor dx is ever computed.
    assert_eq!(gemm_calls() - calls0, 3);
    let thin_flops = 2 * (batch * d_out * rank + batch * rank * d_out + rank * batch * d_in) as u64;
    assert_eq!(gemm_flops() - flops0, thin_flops);
    assert!(grads.get(&w0).is_none());
    assert_eq!(grads.get(&a).unwrap().shape(), &[rank, d_in]);
    assert_eq!(grads.get(&b).unwrap().shape(), &[d_out, rank]);

    // The records say the same: the base matmul computed nothing, x's gradient was skipped.
    let nodes = tape.nodes();
    let base_record = &nodes[base.id().unwrap()];
    assert!(!base_record.requires_grad);
    assert_eq!(base_record.input_grads, vec![GradStatus::Skipped; 2]);
    let xa_record = &nodes[xa.id().unwrap()];
    assert_eq!(
        xa_record.input_grads,
        vec![GradStatus::Skipped, GradStatus::Computed]
    );
}
