//! `tapelora bench`: speed measurements, always side by side in one run (ratios, not absolute
//! times, are what a shared, noisy machine can report honestly).

use std::time::Instant;

use ndarray::{Array2, ArrayD};
use tapelora_autograd::Tape;

/// Median of `reps` timings of `f`, in seconds, after one warm-up call.
fn median_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn filled(rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        ((i * 31 + j * 17) % 97) as f32 / 97.0 - 0.5
    })
}

fn raw_sgemm(a: &Array2<f32>, b: &Array2<f32>, c: &mut Array2<f32>) {
    let (m, k) = a.dim();
    let n = b.ncols();
    // SAFETY: standard-layout arrays of the stated shapes; c does not alias a or b.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// Throughput of the tape's matmul against raw `matrixmultiply::sgemm` on the same sizes.
pub fn matmul(sizes: &[usize], reps: usize, json: bool) -> Result<(), String> {
    let threads = rayon::current_num_threads();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| format!("bench: cannot build a 1-thread pool: {e}"))?;
    if !json {
        println!("matmul: the tape's Var::matmul vs raw matrixmultiply::sgemm (median of {reps}; GFLOP/s)");
        println!(
            "{:>6} {:>12} {:>12} {:>8} {:>14} {:>8} {:>14}",
            "n",
            "raw 1 thr",
            "tape 1 thr",
            "ratio",
            "tape xWᵀ 1 thr",
            "ratio",
            format!("tape {threads} thr")
        );
    }
    let mut rows = Vec::new();
    for &n in sizes {
        let (a, b) = (filled(n, n), filled(n, n));
        let bt = b.t().as_standard_layout().into_owned();
        let flops = 2.0 * (n as f64).powi(3);
        let mut c = Array2::<f32>::zeros((n, n));
        let raw = one_thread.install(|| median_seconds(reps, || raw_sgemm(&a, &b, &mut c)));
        let (ad, bd, btd): (ArrayD<f32>, ArrayD<f32>, ArrayD<f32>) =
            (a.clone().into_dyn(), b.clone().into_dyn(), bt.into_dyn());
        let tape_matmul = |transposed: bool| {
            let tape = Tape::<f32>::new();
            let x = tape.constant(ad.clone());
            let w = if transposed {
                tape.constant(btd.clone()).transpose(0, 1).expect("2-D")
            } else {
                tape.constant(bd.clone())
            };
            let y = x.matmul(&w).expect("square");
            assert_eq!(y.shape(), &[n, n]);
        };
        let tape1 = one_thread.install(|| median_seconds(reps, || tape_matmul(false)));
        let tape1t = one_thread.install(|| median_seconds(reps, || tape_matmul(true)));
        let tape_all = median_seconds(reps, || tape_matmul(false));
        let g = |s: f64| flops / s / 1e9;
        if json {
            rows.push(format!(
                "{{\"n\": {n}, \"raw_gflops\": {:.2}, \"tape_gflops\": {:.2}, \"ratio\": {:.3}, \"tape_transposed_ratio\": {:.3}, \"tape_{threads}_threads_gflops\": {:.2}}}",
                g(raw), g(tape1), raw / tape1, raw / tape1t, g(tape_all)
            ));
        } else {
            println!(
                "{n:>6} {:>12.2} {:>12.2} {:>8.3} {:>14.2} {:>8.3} {:>14.2}",
                g(raw),
                g(tape1),
                raw / tape1,
                g(tape1t),
                raw / tape1t,
                g(tape_all)
            );
        }
    }
    if json {
        println!("[{}]", rows.join(", "));
    } else {
        println!("\nratio = raw time / tape time on one thread (≥ 0.90 is the target); the tape's time includes allocating the output.");
    }
    Ok(())
}
