//! 1000 training steps must not grow memory: a counting global allocator tracks live bytes.
//! (Its own test binary, so the allocator and the count belong to this test alone.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use ndarray::{ArrayD, IxDyn};
use tapelora_autograd::{Tape, Tensor};

struct Counting;
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn sgd_step(params: &mut [(String, Tensor<f32>)], lr: f32) -> f32 {
    let tape = Tape::<f32>::new();
    let x = tape.constant(ArrayD::from_shape_fn(IxDyn(&[8, 3, 16]), |i| {
        ((i[0] + 3 * i[1] + i[2]) % 7) as f32 * 0.1
    }));
    let vars: Vec<_> = params
        .iter()
        .map(|(n, p)| tape.param(n.clone(), p.clone()))
        .collect();
    let (w1, g, b, w2) = (&vars[0], &vars[1], &vars[2], &vars[3]);
    let h = x
        .layer_norm(g, b, 1e-5)
        .unwrap()
        .matmul(w1)
        .unwrap()
        .gelu()
        .unwrap();
    let q = h.narrow(2, 0, 16).unwrap();
    let att = tapelora_autograd::attention(&q, &q, &q, 2, true).unwrap();
    let logits = att.matmul(w2).unwrap();
    let targets: Vec<i64> = (0..24).map(|i| i % 5).collect();
    let loss = logits.cross_entropy(&targets, None).unwrap();
    let value = loss.item().unwrap();
    let mut grads = tape.backward(&loss).unwrap();
    drop(vars);
    for (name, p) in params.iter_mut() {
        let grad = grads.take_by_name(name).unwrap();
        p.zip_mut_with(&grad, |p, g| *p -= lr * g); // in place: the tape holds no copy
    }
    value
}

#[test]
fn a_thousand_training_steps_do_not_grow_memory() {
    let mut params: Vec<(String, Tensor<f32>)> = vec![
        (
            "w1".into(),
            ArrayD::from_shape_fn(IxDyn(&[16, 32]), |i| {
                ((i[0] * 5 + i[1]) % 11) as f32 * 0.02 - 0.1
            })
            .into_shared(),
        ),
        (
            "ln.g".into(),
            ArrayD::from_elem(IxDyn(&[16]), 1.0).into_shared(),
        ),
        (
            "ln.b".into(),
            ArrayD::from_elem(IxDyn(&[16]), 0.0).into_shared(),
        ),
        (
            "w2".into(),
            ArrayD::from_shape_fn(IxDyn(&[16, 5]), |i| ((i[0] + 2 * i[1]) % 5) as f32 * 0.05)
                .into_shared(),
        ),
    ];
    let first_loss = sgd_step(&mut params, 0.1);
    for _ in 0..10 {
        sgd_step(&mut params, 0.1);
    }
    let baseline = LIVE_BYTES.load(Ordering::Relaxed);
    let mut last_loss = 0.0;
    for _ in 0..1000 {
        last_loss = sgd_step(&mut params, 0.1);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    assert!(
        last_loss < first_loss,
        "training makes progress: {first_loss} → {last_loss}"
    );
    // Allow a little slack for lazily initialised runtime state (thread-locals, rayon).
    assert!(
        after - baseline < 64 * 1024,
        "live bytes grew by {} over 1000 steps",
        after - baseline
    );
}
