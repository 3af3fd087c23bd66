//! `tapelora bench`: speed measurements, always side by side in one run (ratios, not absolute
//! times, are what a shared, noisy machine can report honestly).

use std::time::Instant;

use ndarray::{Array2, ArrayD};
use tapelora_autograd::Tape;

/// `reps` timings of `f`, in seconds, after one warm-up call, quickest first.
fn sorted_seconds(reps: usize, mut f: impl FnMut()) -> Vec<f64> {
    f();
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times
}

/// Median of `reps` timings of `f`, in seconds, after one warm-up call.
fn median_seconds(reps: usize, f: impl FnMut()) -> f64 {
    let times = sorted_seconds(reps, f);
    times[times.len() / 2]
}

/// The fastest of `reps` timings of each function, taken in turn (a, b, c, …, a, b, c, …): a
/// shared machine only ever slows a run down, and alternating spreads its slow spells over all
/// the functions instead of one.
fn alternated_best_seconds(reps: usize, fs: &mut [&mut dyn FnMut()]) -> Vec<f64> {
    fs.iter_mut().for_each(|f| f());
    let mut best = vec![f64::INFINITY; fs.len()];
    for _ in 0..reps {
        for (f, best) in fs.iter_mut().zip(&mut best) {
            let start = Instant::now();
            f();
            *best = best.min(start.elapsed().as_secs_f64());
        }
    }
    best
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

/// GPT-2 124M's linears at B4×T256 as M×K×N: c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj
/// forward (`x·W`, 1024 tokens).
pub const GPT2_LINEAR_SHAPES: [&str; 4] = [
    "1024x768x2304",
    "1024x768x768",
    "1024x768x3072",
    "1024x3072x768",
];

/// Most floats `--mode gemm` allocates for one shape's A, B and C (4 GiB).
const GEMM_MAX_FLOATS: usize = 1 << 30;

/// `M×K×N` strings (`x` or `×` between three positive integers) as (m, k, n).
pub fn parse_shapes(shapes: &[String]) -> Result<Vec<(usize, usize, usize)>, String> {
    shapes
        .iter()
        .map(|shape| {
            let dims: Vec<usize> = shape
                .split(['x', '×'])
                .map(|d| d.trim().parse::<usize>().unwrap_or(0))
                .collect();
            let not_a_shape = || {
                format!(
                    "bench: --shapes: `{shape}` is not M×K×N (three positive integers joined by x)"
                )
            };
            let &[m, k, n] = &dims[..] else {
                return Err(not_a_shape());
            };
            if m == 0 || k == 0 || n == 0 {
                return Err(not_a_shape());
            }
            // A, B and C in f32 must fit in memory (a typo of a few digits would not).
            let floats = [m.checked_mul(k), k.checked_mul(n), m.checked_mul(n)]
                .into_iter()
                .try_fold(0usize, |sum, f| f.and_then(|f| sum.checked_add(f)));
            match floats {
                Some(floats) if floats <= GEMM_MAX_FLOATS => Ok((m, k, n)),
                _ => Err(format!(
                    "bench: --shapes: `{shape}` needs more than {} GiB for its three matrices",
                    (GEMM_MAX_FLOATS * 4) >> 30
                )),
            }
        })
        .collect()
}

/// Our GEMM alone (`C ← A·B`, row-major A and B, on rayon's pool) on each shape: the median
/// and the best of `reps` calls after a warm-up, in GFLOP/s. `benchmarks/run.sh` puts these
/// beside PyTorch's `torch.mm` on the same shapes, alternating the two.
pub fn gemm(shapes: &[(usize, usize, usize)], reps: usize, json: bool) -> Result<(), String> {
    let threads = rayon::current_num_threads();
    if !json {
        println!("gemm: C = A·B, row-major operands, {threads} threads ({reps} calls after a warm-up; GFLOP/s)");
        println!("{:>20} {:>10} {:>10}", "M×K×N", "median", "best");
    }
    let mut rows = Vec::new();
    for &(m, k, n) in shapes {
        let (a, b) = (filled(m, k), filled(k, n));
        let mut c = Array2::<f32>::zeros((m, n));
        let times = sorted_seconds(reps, || {
            tapelora_autograd::gemm::gemm(1.0, a.view(), b.view(), 0.0, c.view_mut())
        });
        let flops = 2.0 * (m * k * n) as f64;
        let (median, best) = (flops / times[reps / 2] / 1e9, flops / times[0] / 1e9);
        if json {
            rows.push(format!(
                "{{\"m\": {m}, \"k\": {k}, \"n\": {n}, \"median_gflops\": {median:.2}, \"best_gflops\": {best:.2}}}"
            ));
        } else {
            println!("{:>20} {median:>10.1} {best:>10.1}", format!("{m}×{k}×{n}"));
        }
    }
    if json {
        println!(
            "{{\"threads\": {threads}, \"shapes\": [{}]}}",
            rows.join(", ")
        );
    }
    Ok(())
}

/// Throughput of the tape's matmul against raw `matrixmultiply::sgemm` on the same sizes.
pub fn matmul(sizes: &[usize], reps: usize, json: bool) -> Result<(), String> {
    let threads = rayon::current_num_threads();
    let one_thread = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .map_err(|e| format!("bench: cannot build a 1-thread pool: {e}"))?;
    if !json {
        println!("matmul: the tape's Var::matmul vs raw matrixmultiply::sgemm (best of {reps}, alternated; GFLOP/s)");
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
        let times = alternated_best_seconds(
            reps,
            &mut [
                &mut || one_thread.install(|| raw_sgemm(&a, &b, &mut c)),
                &mut || one_thread.install(|| tape_matmul(false)),
                &mut || one_thread.install(|| tape_matmul(true)),
                &mut || tape_matmul(false),
            ],
        );
        let (raw, tape1, tape1t, tape_all) = (times[0], times[1], times[2], times[3]);
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

/// The machine's CPU time so far, in clock ticks: all of it and the part the hypervisor
/// gave to other guests while this one wanted to run (`steal`, the eighth field of
/// `/proc/stat`'s `cpu` line). `None` where the file is not Linux's.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    Some((fields.iter().sum(), *fields.get(7)?))
}

/// The share of the machine's CPU time stolen by other guests between two [`cpu_ticks`]
/// readings (NaN when either is missing or no tick passed): on a shared virtual machine a
/// slow run can be the memory or the hypervisor, and this helps tell which.
fn steal_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> f64 {
    match (before, after) {
        (Some((total0, steal0)), Some((total1, steal1))) if total1 > total0 => {
            steal1.saturating_sub(steal0) as f64 / (total1 - total0) as f64
        }
        _ => f64::NAN,
    }
}

/// Peak resident memory of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Bytes per second at which all threads read `buffers` once (blocks of 1 MiB handed out by
/// rayon, each summed as 16 streams side by side: the quickest way we found to read memory
/// here), in each of three passes.
fn streaming_rates(buffers: &[&[f32]]) -> [f64; 3] {
    use rayon::prelude::*;
    let bytes = 4.0 * buffers.iter().map(|b| b.len()).sum::<usize>() as f64;
    std::array::from_fn(|_| {
        let start = Instant::now();
        let sum: f32 = buffers
            .par_iter()
            .flat_map(|b| b.par_chunks(1 << 18))
            .map(tapelora_autograd::simd::sum_as_streams)
            .sum();
        std::hint::black_box(sum);
        bytes / start.elapsed().as_secs_f64()
    })
}

/// `x` with `decimals` digits for a JSON line, or `null` when it is not a finite number (JSON
/// has no NaN).
fn json_number(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "null".into()
    }
}

/// Timed training steps per block between two samples of the machine's peak.
const STEPS_PER_PROBE: usize = 5;

/// Steps at least this long get a sample of the machine's peak before each one, with no
/// untimed step after it: GPT-2's 3-second steps came in one block, so its MFU rested on two
/// samples of ≈ 50 ms each, and one table printed 114 % when both fell in a slow spell. A
/// probe's few MiB in the caches cost nothing against a step of this length.
const PROBE_EVERY_STEP_FROM_SECS: f64 = 0.5;

/// The machine's peak as this process sees it, sampled between blocks of timed steps so that
/// the peak and the steps share the shared machine's slow and fast spells (a peak taken once,
/// before or after, made the MFU of a run swing past 100 %).
struct PeakSamples {
    /// The tape's GEMM on 1024³, all threads: the best this code does on a clean product.
    sgemm: Vec<f64>,
    /// Register-only FMA chains on every thread at once: the hardware's ceiling.
    fma: Vec<f64>,
    /// The sgemm probe's operands and output, made once.
    probe: [Array2<f32>; 3],
}

impl PeakSamples {
    const PROBE_N: usize = 1024;

    fn new() -> Self {
        let n = Self::PROBE_N;
        PeakSamples {
            sgemm: Vec::new(),
            fma: Vec::new(),
            probe: [filled(n, n), filled(n, n), Array2::zeros((n, n))],
        }
    }

    fn sample(&mut self) {
        let [a, b, c] = &mut self.probe;
        let secs = median_seconds(3, || {
            tapelora_autograd::gemm::gemm(1.0, a.view(), b.view(), 0.0, c.view_mut())
        });
        self.sgemm.push(2.0 * (Self::PROBE_N as f64).powi(3) / secs);
        let per_thread: Vec<Option<f64>> =
            rayon::broadcast(|_| tapelora_autograd::sgemm_avx512::fma_peak_flops(0.02));
        if let Some(total) = per_thread.into_iter().sum::<Option<f64>>() {
            self.fma.push(total);
        }
    }

    fn median(samples: &[f64]) -> Option<f64> {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }
}

/// Per-op wall time per step, largest first, with the optimizer and what the tape did not see.
fn print_profile(
    p: &tapelora_autograd::OpProfile,
    optimizer_secs: f64,
    steps: usize,
    step_secs: f64,
) {
    let per = |s: f64| 1e3 * s / steps as f64;
    let mut rows: Vec<_> = p.ops.iter().collect();
    rows.sort_by(|a, b| {
        (b.1.forward_secs + b.1.backward_secs).total_cmp(&(a.1.forward_secs + a.1.backward_secs))
    });
    println!(
        "per step (ms): {:<22} {:>6} {:>10} {:>10} {:>10}",
        "op", "calls", "forward", "backward", "share"
    );
    let mut seen = optimizer_secs;
    for (op, t) in rows {
        seen += t.forward_secs + t.backward_secs;
        println!(
            "               {op:<22} {:>6} {:>10.1} {:>10.1} {:>9.1}%",
            t.calls / steps,
            per(t.forward_secs),
            per(t.backward_secs),
            100.0 * (t.forward_secs + t.backward_secs) / steps as f64 / step_secs
        );
    }
    println!(
        "               {:<22} {:>6} {:>10.1} {:>10} {:>9.1}%",
        "optimizer (AdamW)",
        "",
        per(optimizer_secs),
        "",
        100.0 * optimizer_secs / steps as f64 / step_secs
    );
    println!(
        "               {:<22} {:>6} {:>10.1}",
        "not on the tape",
        "",
        1e3 * step_secs - per(seen)
    );
}

/// Model-level benchmarks (`--mode full|lora|generate|infer|lora-vs-full`).
pub struct ModelBench {
    pub config: String,
    pub rank: usize,
    pub batch: Option<usize>,
    pub block: Option<usize>,
    pub steps: Option<usize>,
    pub json: bool,
    pub profile: bool,
    /// With `profile`: the step as training records it (groups side by side), the first
    /// group's ops timed.
    pub profile_groups: bool,
    pub embd: Option<usize>,
    pub layers: Option<usize>,
}

impl ModelBench {
    fn model(&self) -> Result<(tapelora_gpt::Gpt, usize, usize, usize), String> {
        use rand::SeedableRng;
        let (cfg, batch, block, steps) = match self.config.as_str() {
            "nanogpt-cpu" => (
                tapelora_gpt::GptConfig::preset("nanogpt-cpu", Some(65)),
                12,
                64,
                20,
            ),
            "gpt2" => (tapelora_gpt::GptConfig::preset("gpt2", None), 4, 256, 3),
            other => {
                return Err(format!(
                    "--config: unknown `{other}` (known: nanogpt-cpu, gpt2)"
                ))
            }
        };
        let mut cfg = cfg.map_err(|e| e.to_string())?;
        if let Some(embd) = self.embd {
            if embd < 64 || embd % 64 != 0 {
                return Err(format!(
                    "--embd: must be a positive multiple of 64, got {embd}"
                ));
            }
            (cfg.n_embd, cfg.n_head, cfg.n_inner) = (embd, embd / 64, 4 * embd);
        }
        if let Some(layers) = self.layers {
            if layers == 0 {
                return Err("--layers: must be at least 1".into());
            }
            cfg.n_layer = layers;
        }
        let (batch, block, steps) = (
            self.batch.unwrap_or(batch),
            self.block.unwrap_or(block),
            self.steps.unwrap_or(steps),
        );
        if batch == 0 || block == 0 || steps == 0 || block > cfg.n_positions {
            return Err(format!(
                "--batch, --block and --steps must be at least 1, and --block at most {}",
                cfg.n_positions
            ));
        }
        let model = tapelora_gpt::Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(0))
            .map_err(|e| e.to_string())?;
        Ok((model, batch, block, steps))
    }

    /// The benchmarked adapter: rank r on c_attn.q and c_attn.v, α = 2r.
    fn adapter_config(&self) -> tapelora_lora::LoraConfig {
        tapelora_lora::LoraConfig::new(self.rank, 2.0 * self.rank as f64, &["c_attn.q", "c_attn.v"])
    }

    fn with_adapter(
        model: tapelora_gpt::Gpt,
        cfg: &tapelora_lora::LoraConfig,
    ) -> Result<tapelora_lora::LoraModel, String> {
        use rand::SeedableRng;
        let mut lm = tapelora_lora::LoraModel::new(model);
        lm.add_adapter(
            "default",
            cfg,
            &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
        )
        .map_err(|e| e.to_string())?;
        Ok(lm)
    }

    fn ids(vocab: usize, batch: usize, block: usize) -> (ndarray::ArrayD<usize>, Vec<i64>) {
        let ids = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[batch, block]), |i| {
            (i[0] * 131 + i[1] * 31) % vocab
        });
        let targets = ids.iter().map(|&t| ((t * 7 + 1) % vocab) as i64).collect();
        (ids, targets)
    }

    /// The benchmarked model ready to train: LoRA on q, v (the rest frozen) or every weight
    /// trainable, with its AdamW and the fixed batch.
    fn trainer(&self, lora: bool) -> Result<Trainer, String> {
        use tapelora_nn::{AdamW, AdamWConfig, Module};
        let (model, batch, block, steps) = self.model()?;
        let lm = if lora {
            Self::with_adapter(model, &self.adapter_config())?
        } else {
            let mut lm = tapelora_lora::LoraModel::new(model);
            lm.model.unfreeze();
            lm
        };
        let (ids, targets) = Self::ids(lm.model.config.vocab_size, batch, block);
        let opt = AdamW::new(lm.model.parameters(), AdamWConfig::default());
        let shards = tapelora_gpt::step::shards_for(&lm.model, batch, block);
        Ok(Trainer {
            lm,
            opt,
            ids,
            targets,
            batch,
            block,
            steps,
            shards,
        })
    }

    /// Forward + backward + AdamW steps; prints ms/step, tokens/s, FLOP/s, MFU and peak RSS.
    pub fn train(&self, lora: bool) -> Result<(), String> {
        use tapelora_nn::Module;
        let mut trainer = self.trainer(lora)?;
        let (batch, block, steps) = (trainer.batch, trainer.block, trainer.steps);
        let mut profile = tapelora_autograd::OpProfile::default();
        let mut optimizer_secs = 0.0;
        let mut step = |trainer: &mut Trainer, timed: bool| -> Result<(), String> {
            let one_tape = self.profile && !self.profile_groups;
            let (tape_profile, secs) = trainer.step(timed && self.profile, one_tape)?;
            if let Some(p) = tape_profile {
                profile.add(&p);
            }
            if timed {
                optimizer_secs += secs;
            }
            Ok(())
        };
        // Timed steps run back to back, as training runs them (and as PyTorch's reference
        // times its steps), in blocks of `STEPS_PER_PROBE` with the machine's peak sampled
        // between blocks. Each block starts with one untimed step: the probe (or, before the
        // first block, building the model) leaves other data in the caches, and a step timed
        // right after a probe was 1.09× slower on nanogpt-cpu's full step (1.02× LoRA). The
        // quickest timed step shows the code's speed when the shared machine left it alone.
        // Steps of `PROBE_EVERY_STEP_FROM_SECS` or more (GPT-2's) get a sample before each.
        let mut best_secs = f64::INFINITY;
        let (mut step_secs, mut step_flops) = (0.0, 0);
        let mut peaks = PeakSamples::new();
        peaks.sample();
        let untimed_start = Instant::now();
        step(&mut trainer, false)?;
        let long_steps = untimed_start.elapsed().as_secs_f64() >= PROBE_EVERY_STEP_FROM_SECS;
        for index in 0..steps {
            if long_steps && index > 0 {
                peaks.sample();
            } else if index > 0 && index % STEPS_PER_PROBE == 0 {
                peaks.sample();
                step(&mut trainer, false)?;
            }
            let flops0 = tapelora_autograd::gemm::gemm_flops();
            let step_start = Instant::now();
            step(&mut trainer, true)?;
            let secs = step_start.elapsed().as_secs_f64();
            step_flops += tapelora_autograd::gemm::gemm_flops() - flops0;
            best_secs = best_secs.min(secs);
            step_secs += secs;
        }
        peaks.sample();
        let secs = step_secs / steps as f64;
        if self.profile {
            print_profile(&profile, optimizer_secs, steps, secs);
        }
        let flops = step_flops as f64 / steps as f64;
        let peak = PeakSamples::median(&peaks.sgemm).unwrap_or(f64::NAN);
        let fma_peak = PeakSamples::median(&peaks.fma);
        let tokens = (batch * block) as f64;
        let (ms, tps, mfu, rss) = (
            secs * 1e3,
            tokens / secs,
            flops / secs / peak,
            peak_rss_mib(),
        );
        let mfu_fma = fma_peak.map_or(f64::NAN, |fma| flops / secs / fma);
        if !self.json {
            let recorded = match trainer.shards {
                _ if self.profile && !self.profile_groups => {
                    "one tape per step while profiling".to_string()
                }
                1 => "one tape per step".to_string(),
                n if self.profile => {
                    format!("{n} groups of sequences side by side, the first group's ops timed")
                }
                n => format!("{n} groups of sequences side by side"),
            };
            println!("{} {} step (batch {batch} × block {block}, {recorded}, {} trainable of {} parameters, {} steps, {}):", self.config, if lora { format!("LoRA r={} (q,v)", self.rank) } else { "full".into() }, trainer.lm.model.num_trainable_params(), trainer.lm.model.num_params(), steps, if long_steps { "the peak sampled before each".to_string() } else { format!("each block of {STEPS_PER_PROBE} after an untimed one") });
            println!("  {ms:.1} ms/step (quickest {:.1}), {tps:.0} tokens/s, matmul {:.2} GFLOP/step at {:.1} GFLOP/s; MFU {:.1}% of the sgemm peak ({:.1} GFLOP/s), {:.1}% of the FMA peak ({:.1} GFLOP/s), both sampled between {}; peak RSS {rss:.0} MiB", best_secs * 1e3, flops / 1e9, flops / secs / 1e9, 100.0 * mfu, peak / 1e9, 100.0 * mfu_fma, fma_peak.unwrap_or(f64::NAN) / 1e9, if long_steps { "steps" } else { "blocks of steps" });
        }
        println!("{{\"ms_per_step\": {ms:.3}, \"best_ms_per_step\": {:.3}, \"tokens_per_sec\": {tps:.1}, \"peak_rss_mib\": {rss:.1}, \"mfu\": {mfu:.4}, \"mfu_fma\": {}}}", best_secs * 1e3, json_number(mfu_fma, 4));
        Ok(())
    }

    /// Full and LoRA training steps alternated in one process, one timed step of each per
    /// round, each after an untimed step of its own kind (as training runs them; timed right
    /// after the other kind, the LoRA step found its frozen panels evicted and read 0.013–0.017
    /// higher): the LoRA step's time as a share of the full step's (median of the per-round
    /// ratios, so the machine's drift cancels) beside the share of GEMM FLOPs it keeps.
    pub fn lora_vs_full(&self) -> Result<(), String> {
        let (mut full, mut lora) = (self.trainer(false)?, self.trainer(true)?);
        let rounds = full.steps.max(3);
        let mut ratios = Vec::with_capacity(rounds);
        let (mut full_flops, mut lora_flops) = (0u64, 0u64);
        for _ in 0..rounds {
            let time = |trainer: &mut Trainer, flops: &mut u64| -> Result<f64, String> {
                let flops0 = tapelora_autograd::gemm::gemm_flops();
                let start = Instant::now();
                trainer.step(false, false)?;
                *flops += tapelora_autograd::gemm::gemm_flops() - flops0;
                Ok(start.elapsed().as_secs_f64())
            };
            // The untimed steps also warm each trainer up before its first timed one.
            full.step(false, false)?;
            let full_secs = time(&mut full, &mut full_flops)?;
            lora.step(false, false)?;
            let lora_secs = time(&mut lora, &mut lora_flops)?;
            ratios.push(lora_secs / full_secs);
        }
        ratios.sort_by(f64::total_cmp);
        let (ratio, share) = (
            ratios[ratios.len() / 2],
            lora_flops as f64 / full_flops as f64,
        );
        if !self.json {
            println!(
                "{} LoRA r={} (q,v) against full steps, {rounds} alternated rounds (batch {} × block {}):",
                self.config, self.rank, full.batch, full.block
            );
            println!(
                "  LoRA step time / full step time: median {ratio:.3} (rounds {:.3}…{:.3}); GEMM FLOPs kept by LoRA: {share:.3}",
                ratios[0],
                ratios[ratios.len() - 1]
            );
        }
        println!("{{\"lora_over_full\": {ratio:.4}, \"gemm_flop_share\": {share:.4}}}");
        Ok(())
    }

    /// Greedy generation with the KV cache.
    pub fn generate(&self) -> Result<(), String> {
        let (model, _, _, _) = self.model()?;
        let prompt: Vec<u32> = (0..16)
            .map(|i| (i * 37 % model.config.vocab_size) as u32)
            .collect();
        let new_tokens = 128.min(model.config.n_positions - 16);
        let cfg = tapelora_gpt::generate::SamplingConfig {
            max_new_tokens: new_tokens,
            temperature: 0.0,
            ..Default::default()
        };
        // Warm-up. Decoding one token reads every weight once (wpe only one row): at batch 1
        // the memory's streaming rate, measured here on the weights themselves just before and
        // after the timed run, bounds the tokens per second.
        tapelora_gpt::generate::generate(&model, &prompt, &cfg).map_err(|e| e.to_string())?;
        let weights: Vec<&[f32]> = {
            use tapelora_nn::Module;
            model
                .parameters()
                .into_iter()
                .filter(|p| p.name != "wpe.weight")
                .filter_map(|p| p.value.as_slice())
                .collect()
        };
        let mut bytes_per_token = 4.0 * weights.iter().map(|w| w.len()).sum::<usize>() as f64;
        // Greedy search reads the tied lm_head's table through its int8 copy (`GreedyHead`):
        // those bytes in place of the float32 table counted above.
        if let Some(head) = tapelora_gpt::generate::greedy_head_for(&model, &cfg) {
            bytes_per_token +=
                head.bytes_per_step() as f64 - 4.0 * model.wte.weight.value.len() as f64;
        }
        let mut stream_rates = streaming_rates(&weights).to_vec();
        let (ticks, paced) = (cpu_ticks(), tapelora_autograd::partner::paced_calls());
        let start = Instant::now();
        let out =
            tapelora_gpt::generate::generate(&model, &prompt, &cfg).map_err(|e| e.to_string())?;
        let tps = out.len() as f64 / start.elapsed().as_secs_f64();
        let steal = steal_share(ticks, cpu_ticks());
        // One-token steps the pacer ran on one thread, trials included (NaN with no pacing:
        // a pool of other than two threads, or `TAPELORA_PARTNER=0`/`TAPELORA_PACER=0`).
        let alone_share = {
            let now = tapelora_autograd::partner::paced_calls();
            let (partner, alone) = (now.0 - paced.0, now.1 - paced.1);
            alone as f64 / (partner + alone) as f64
        };
        let rss = peak_rss_mib();
        stream_rates.extend(streaming_rates(&weights));
        // The best sample bounds what the memory can give, but on a shared machine one pass
        // can stand well above the others; the median is the rate a whole run usually sees.
        let (bandwidth, usual) = (
            stream_rates.iter().copied().fold(0.0, f64::max),
            PeakSamples::median(&stream_rates).unwrap_or(f64::NAN),
        );
        let (ceiling, usual_ceiling) = (bandwidth / bytes_per_token, usual / bytes_per_token);
        if !self.json {
            println!("{} generation: batch 1, 16-token prompt, {} new tokens, greedy, KV cache: {tps:.1} tokens/s", self.config, out.len());
            println!("  each token reads {:.0} MB of weights; reading them runs at {:.1} GB/s here at best ({:.1} GB/s median of six samples before and after) → at most {ceiling:.1} tokens/s ({usual_ceiling:.1} at the median rate); reached {:.0}% ({:.0}%); CPU time stolen by other guests during the run: {:.1}%; {}", bytes_per_token / 1e6, bandwidth / 1e9, usual / 1e9, 100.0 * tps / ceiling, 100.0 * tps / usual_ceiling, 100.0 * steal, if alone_share.is_nan() { "one-token steps not paced".to_string() } else { format!("one-token steps run on one thread alone: {:.0}%", 100.0 * alone_share) });
        }
        println!(
            "{{\"tokens_per_sec\": {tps:.2}, \"peak_rss_mib\": {rss:.1}, \"weights_gb_per_sec\": {:.2}, \"bandwidth_bound_tokens_per_sec\": {ceiling:.2}, \"median_bandwidth_bound_tokens_per_sec\": {usual_ceiling:.2}, \"cpu_steal\": {}, \"alone_share\": {}}}",
            bandwidth / 1e9,
            json_number(steal, 4),
            json_number(alone_share, 3)
        );
        Ok(())
    }

    /// Forward latency of the base model, with an unmerged LoRA adapter, and merged.
    pub fn infer(&self) -> Result<(), String> {
        let (model, batch, block, steps) = self.model()?;
        let (ids, _) = Self::ids(model.config.vocab_size, batch, block);
        // B random too, so the unmerged adapter does real work and merging changes the weights.
        let cfg = tapelora_lora::LoraConfig {
            random_b: true,
            ..self.adapter_config()
        };
        let lm = Self::with_adapter(model.copy_weights(), &cfg)?;
        let merged = Self::with_adapter(model.copy_weights(), &cfg)?
            .merge_and_unload()
            .map_err(|e| e.to_string())?;
        let forward = |m: &tapelora_gpt::Gpt| {
            let tape = Tape::new();
            tape.no_grad(|| {
                m.forward(&tapelora_nn::Ctx::eval(&tape), &ids)
                    .expect("fits");
            })
        };
        // One forward of each model in turn, many rounds. The overheads are the medians of the
        // per-round ratios: the three runs of a round see the same machine, so a ratio cancels
        // the drift of a shared machine, and a median ignores the rounds one noisy run spoilt
        // (the quickest run of each, also printed, can come from different moments).
        let rounds = (3 * steps).max(9);
        let time = |m: &tapelora_gpt::Gpt| {
            let start = Instant::now();
            forward(m);
            start.elapsed().as_secs_f64()
        };
        for m in [&model, &lm.model, &merged] {
            forward(m); // warm-up
        }
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            times.push([time(&model), time(&lm.model), time(&merged)]);
        }
        let quickest = |i: usize| times.iter().map(|t| t[i]).fold(f64::INFINITY, f64::min);
        let (b, u, g) = (quickest(0), quickest(1), quickest(2));
        let median_ratio = |i: usize| {
            let mut ratios: Vec<f64> = times.iter().map(|t| t[i] / t[0]).collect();
            ratios.sort_by(f64::total_cmp);
            ratios[ratios.len() / 2]
        };
        let (unmerged, merged_ratio) = (median_ratio(1), median_ratio(2));
        if !self.json {
            println!(
                "{} forward, batch {batch} × block {block} ({rounds} rounds of base, unmerged, merged in turn):",
                self.config
            );
            println!(
                "  quickest: base {:.2} ms, LoRA r={} unmerged {:.2} ms, merged {:.2} ms",
                b * 1e3,
                self.rank,
                u * 1e3,
                g * 1e3,
            );
            println!(
                "  median per-round overhead against base: unmerged {:+.1}%, merged {:+.1}%",
                100.0 * (unmerged - 1.0),
                100.0 * (merged_ratio - 1.0)
            );
        }
        println!(
            "{{\"base_ms\": {:.3}, \"unmerged_ms\": {:.3}, \"merged_ms\": {:.3}, \"unmerged_overhead\": {:.4}, \"merged_overhead\": {:.4}}}",
            b * 1e3,
            u * 1e3,
            g * 1e3,
            unmerged - 1.0,
            merged_ratio - 1.0
        );
        Ok(())
    }
}

/// A model, its optimizer and the fixed batch a training benchmark steps on.
struct Trainer {
    lm: tapelora_lora::LoraModel,
    opt: tapelora_nn::AdamW,
    ids: ndarray::ArrayD<usize>,
    targets: Vec<i64>,
    batch: usize,
    block: usize,
    steps: usize,
    /// Groups of sequences each step records side by side ([`tapelora_gpt::step`]; one tape
    /// when profiling, so that op times are wall times).
    shards: usize,
}

impl Trainer {
    /// One forward + backward + AdamW step; returns the tape's op profile (when `profile`)
    /// and the optimizer's seconds. `one_tape`: record the whole batch on one tape even where
    /// `tapelora train` would record groups of sequences (for `--profile`, warm-up included).
    fn step(
        &mut self,
        profile: bool,
        one_tape: bool,
    ) -> Result<(Option<tapelora_autograd::OpProfile>, f64), String> {
        use tapelora_nn::{Module, Optimizer};
        let model = &mut self.lm.model;
        // As `tapelora train` steps (a small model's batch in groups side by side), or on one
        // tape, whose per-op times are then wall times.
        let mut tape_profile = None;
        let options = tapelora_gpt::step::TapeOptions {
            profile,
            ..Default::default()
        };
        let (_, grads) = tapelora_gpt::step::loss_and_gradients_observed(
            model,
            &self.ids,
            &self.targets,
            0,
            if one_tape { 1 } else { self.shards },
            options,
            &mut |tape| tape_profile = tape.profile(),
        )
        .map_err(|e| e.to_string())?;
        let start = Instant::now();
        self.opt
            .step(&mut model.parameters_mut(), &grads, 1e-4)
            .map_err(|e| e.to_string())?;
        Ok((tape_profile, start.elapsed().as_secs_f64()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_share_is_the_stolen_part_of_the_ticks_between_readings() {
        assert_eq!(steal_share(Some((1000, 10)), Some((1200, 60))), 0.25);
        assert!(steal_share(None, Some((1200, 60))).is_nan());
        assert!(steal_share(Some((1000, 10)), Some((1000, 10))).is_nan());
        if let Some((total, steal)) = cpu_ticks() {
            assert!(steal <= total);
        }
    }
}
