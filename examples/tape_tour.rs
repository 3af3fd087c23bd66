//! A tour of the tape: record a tiny LoRA-style layer, print the Wengert list before and after
//! backward, and export it as Graphviz DOT (`dot -Tsvg tape.dot > tape.svg` to draw it).
//!
//!     cargo run --release --example tape_tour

use ndarray::array;
use tapelora::autograd::{DotOptions, Tape};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tape = Tape::<f32>::new();
    tape.set_track_norms(true);

    // y = x·W0 + s·(x·Aᵀ)·Bᵀ : W0 frozen, A and B trainable (rank 1), s = α/r = 2.
    let x = tape.constant(array![[1.0f32, 2.0, 3.0], [0.5, -1.0, 2.0]].into_dyn());
    let w0 = tape.frozen(
        "W0",
        array![[0.2f32, -0.1], [0.4, 0.3], [-0.5, 0.1]].into_dyn(),
    );
    let a = tape.param("lora_A", array![[0.1f32, -0.2, 0.3]].into_dyn());
    let b = tape.param("lora_B", array![[0.05f32], [-0.05]].into_dyn());
    let target = tape.constant(array![[1.0f32, 0.0], [0.0, 1.0]].into_dyn());

    let base = x.matmul(&w0)?;
    let delta = x
        .matmul(&a.transpose(0, 1)?)?
        .matmul(&b.transpose(0, 1)?)?
        .scale(2.0)?;
    let y = base.add(&delta)?;
    let err = y.sub(&target)?;
    let loss = err.mul(&err)?.mean_all()?;

    println!(
        "The tape after the forward pass ({} records):\n\n{tape}",
        tape.len()
    );
    let grads = tape.backward(&loss)?;
    println!("After backward — every 'skipped' gradient was never computed:\n\n{tape}");
    println!("loss = {:.6}", loss.item().unwrap_or(f32::NAN));
    println!("∂loss/∂lora_A = {}", grads.get(&a).ok_or("no grad for A")?);
    println!("∂loss/∂lora_B = {}", grads.get(&b).ok_or("no grad for B")?);
    println!(
        "∂loss/∂W0     = {:?} (frozen: none computed)",
        grads.get(&w0).map(|g| g.shape().to_vec())
    );

    let dot = tape.to_dot(&DotOptions { norms: true });
    std::fs::write("tape.dot", &dot)?;
    println!(
        "\nwrote tape.dot ({} bytes); draw it with: dot -Tsvg tape.dot > tape.svg",
        dot.len()
    );
    Ok(())
}
