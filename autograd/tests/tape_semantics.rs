//! no_grad, detach, anomaly mode, accumulation, and freeing of saved tensors.

use ndarray::{arr1, ArrayD, IxDyn};
use tapelora_autograd::{AutogradError, Tape, Tensor};

#[test]
fn no_grad_records_and_saves_nothing() {
    let tape = Tape::<f32>::new();
    let w: Tensor<f32> = ArrayD::from_elem(IxDyn(&[3, 3]), 0.5).into_shared();
    let y = tape.no_grad(|| {
        let w = tape.param("w", w.clone());
        let x = tape.constant(ArrayD::from_elem(IxDyn(&[2, 3]), 1.0));
        x.matmul(&w).unwrap().gelu().unwrap()
    });
    assert_eq!(tape.len(), 0);
    assert_eq!(tape.saved_bytes(), 0);
    assert!(!y.requires_grad());
    assert!(
        tape.is_grad_enabled(),
        "no_grad restores recording afterwards"
    );
    // A value made under no_grad enters a later graph as a constant.
    let w2 = tape.param("w2", arr1(&[2.0f32, 3.0, 4.0]).into_dyn());
    let z = y.mul(&w2).unwrap().sum_all().unwrap();
    let grads = tape.backward(&z).unwrap();
    assert_eq!(grads.get_by_name("w2").unwrap().shape(), &[3]);
}

#[test]
fn detach_stops_the_gradient() {
    let tape = Tape::<f64>::new();
    let x = tape.param("x", arr1(&[2.0]).into_dyn());
    // y = x·detach(x): dy/dx = detach(x) = 2, not 2x = 4.
    let y = x.mul(&x.detach()).unwrap().sum_all().unwrap();
    let grads = tape.backward(&y).unwrap();
    assert_eq!(grads.get(&x).unwrap()[[0]], 2.0);
}

#[test]
fn anomaly_mode_names_the_first_non_finite_op() {
    let tape = Tape::<f32>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param("x", arr1(&[1.0f32, -1.0]).into_dyn());
    let y = x.exp().unwrap(); // index 1
    let err = y
        .sub(&y)
        .unwrap()
        .add_scalar(-1.0)
        .unwrap()
        .log()
        .unwrap_err(); // log(-1)
    assert!(
        matches!(
            err,
            AutogradError::NonFinite {
                op: "log",
                index: 4,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains("`log`") && err.to_string().contains("#4"),
        "{err}"
    );

    // Backward: sqrt at 0 is finite forward (0) but its gradient 1/(2·0) is infinite.
    let tape = Tape::<f32>::new();
    tape.set_anomaly_detection(true);
    let x = tape.param("x", arr1(&[0.0f32, 4.0]).into_dyn());
    let loss = x.sqrt().unwrap().sum_all().unwrap();
    let err = tape.backward(&loss).unwrap_err();
    assert!(
        matches!(
            err,
            AutogradError::NonFinite {
                op: "sqrt",
                index: 1,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        tape.saved_bytes(),
        0,
        "a failed backward still frees what was saved"
    );

    // Without anomaly mode the same graph just produces inf.
    let tape = Tape::<f32>::new();
    let x = tape.param("x", arr1(&[0.0f32, 4.0]).into_dyn());
    let grads = tape
        .backward(&x.sqrt().unwrap().sum_all().unwrap())
        .unwrap();
    assert!(grads.get(&x).unwrap()[[0]].is_infinite());
}

#[test]
fn backward_frees_everything_the_tape_saved() {
    let param: Tensor<f32> = ArrayD::from_elem(IxDyn(&[16, 16]), 0.1).into_shared();
    let tape = Tape::<f32>::new();
    {
        let w = tape.param("w", param.clone());
        let x = tape.constant(ArrayD::from_elem(IxDyn(&[4, 16]), 1.0));
        let h = x.matmul(&w).unwrap().gelu().unwrap().matmul(&w).unwrap();
        let loss = h.mul(&h).unwrap().mean_all().unwrap();
        assert!(tape.saved_bytes() > 0);
        drop((w, x, h));
        // The records still hold the weight (matmul saved it) until backward runs.
        assert!(!param.is_unique());
        tape.backward(&loss).unwrap();
    }
    assert_eq!(tape.saved_bytes(), 0);
    assert!(
        param.is_unique(),
        "after backward nothing but the model holds the weight"
    );
    assert!(
        !tape.is_empty(),
        "the records themselves stay, for printing"
    );
}

#[test]
fn loss_must_be_scalar_and_trainable() {
    let tape = Tape::<f32>::new();
    let x = tape.param("x", arr1(&[1.0f32, 2.0]).into_dyn());
    assert!(matches!(
        tape.backward(&x),
        Err(AutogradError::LossNotScalar { .. })
    ));
    let c = tape.constant(arr1(&[1.0f32]).into_dyn());
    assert!(matches!(
        tape.backward(&c),
        Err(AutogradError::LossNeedsNoGrad)
    ));
    let other = Tape::<f32>::new();
    let y = other.param("y", arr1(&[1.0f32, 2.0]).into_dyn());
    assert!(matches!(
        x.add(&y),
        Err(AutogradError::TapeMismatch { op: "add" })
    ));
}

#[test]
fn records_after_the_loss_and_off_the_loss_path_get_no_gradient() {
    let tape = Tape::<f64>::new();
    let a = tape.param("a", arr1(&[1.0, 2.0]).into_dyn());
    let b = tape.param("b", arr1(&[3.0, 4.0]).into_dyn());
    let unused = b.exp().unwrap(); // recorded, but the loss does not use it
    let loss = a.mul(&a).unwrap().sum_all().unwrap();
    let after = a.tanh().unwrap(); // recorded after the loss
    let grads = tape.backward(&loss).unwrap();
    assert!(grads.get(&b).is_none());
    assert_eq!(grads.get(&a).unwrap(), &arr1(&[2.0, 4.0]).into_dyn());
    let nodes = tape.nodes();
    use tapelora_autograd::GradStatus::NoGradFlowed;
    assert_eq!(nodes[unused.id().unwrap()].input_grads, vec![NoGradFlowed]);
    assert_eq!(nodes[after.id().unwrap()].input_grads, vec![NoGradFlowed]);
}

#[test]
fn a_parameter_registered_twice_is_one_leaf_with_accumulated_gradient() {
    let tape = Tape::<f64>::new();
    let value: Tensor<f64> = arr1(&[3.0]).into_dyn().into_shared();
    let first = tape.param("tied", value.clone());
    let second = tape.param("tied", value);
    assert_eq!(first.id(), second.id());
    let loss = first.mul(&second).unwrap().sum_all().unwrap(); // x² → 2x
    let grads = tape.backward(&loss).unwrap();
    assert_eq!(grads.get_by_name("tied").unwrap()[[0]], 6.0);
}

#[test]
fn add_named_sums_gradients_of_two_tapes_by_name() {
    // Gradients of the same parameters recorded on two tapes (a sharded step): a weight large
    // enough for the parallel pass, a small one, and one whose gradient comes back strided.
    let values = |seed: f32| {
        [
            ("big", vec![300, 400]),
            ("small", vec![7]),
            ("strided", vec![40, 30]),
        ]
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let v = ArrayD::from_shape_vec(
                IxDyn(&shape),
                (0..n)
                    .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1 + seed)
                    .collect(),
            )
            .unwrap();
            (name, v)
        })
    };
    let grads_of = |seed: f32| {
        let tape = Tape::<f32>::new();
        let [(_, big), (_, small), (_, strided)] = values(seed);
        let big = tape.param("big", big);
        let small = tape.param("small", small);
        let strided = tape.param("strided", strided).transpose(0, 1).unwrap();
        let loss = big
            .mul(&big)
            .unwrap()
            .sum_all()
            .unwrap()
            .add(&small.mul(&small).unwrap().sum_all().unwrap())
            .unwrap()
            .add(&strided.mul(&strided).unwrap().sum_all().unwrap())
            .unwrap();
        tape.backward(&loss).unwrap()
    };
    let (mut sum, other) = (grads_of(0.25), grads_of(-0.5));
    assert!(
        sum.get_by_name("strided").unwrap().as_slice().is_none(),
        "strided"
    );
    let want: Vec<ArrayD<f32>> = ["big", "small", "strided"]
        .iter()
        .map(|name| sum.get_by_name(name).unwrap() + other.get_by_name(name).unwrap())
        .collect();
    sum.add_named(&other).unwrap();
    for (name, want) in ["big", "small", "strided"].iter().zip(&want) {
        assert_eq!(sum.get_by_name(name).unwrap(), want, "{name}");
    }
    // A name missing on the receiving side is an error that leaves every gradient as it was.
    let tape = Tape::<f32>::new();
    let (lone, small) = (
        tape.param("lone", arr1(&[1.0f32, 2.0]).into_dyn()),
        tape.param("small", ArrayD::zeros(IxDyn(&[7]))),
    );
    let loss = lone
        .sum_all()
        .unwrap()
        .add(&small.sum_all().unwrap())
        .unwrap();
    let extra = tape.backward(&loss).unwrap();
    let before = sum.get_by_name("small").unwrap().clone();
    let err = sum.add_named(&extra).unwrap_err().to_string();
    assert!(err.contains("lone"), "{err}");
    assert_eq!(sum.get_by_name("small").unwrap(), &before);
}
