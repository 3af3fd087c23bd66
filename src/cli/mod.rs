//! The `tapelora` command line: argument parsing (clap) and one module per command. Library
//! errors arrive here as typed errors and leave as one-line messages.

pub mod bench;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "tapelora",
    version,
    about = "Tape-based autodiff, GPT-2 and LoRA in pure Rust"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The end-to-end LoRA demo (for now: what exists and how to try it).
    Demo,
    /// Speed measurements, side by side in one run.
    Bench {
        /// What to measure.
        #[arg(long, value_enum, default_value_t = BenchMode::Matmul)]
        mode: BenchMode,
        /// Square matrix sizes for `--mode matmul`.
        #[arg(long, value_delimiter = ',', default_values_t = vec![512, 768, 1024])]
        sizes: Vec<usize>,
        /// Timed repetitions (the median is reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchMode {
    /// The tape's matmul against raw matrixmultiply sgemm.
    Matmul,
}

pub fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Demo => {
            demo_overview();
            Ok(())
        }
        Command::Bench {
            mode,
            sizes,
            reps,
            json,
        } => {
            if reps == 0 {
                return Err("bench: --reps must be at least 1".into());
            }
            if sizes.contains(&0) {
                return Err("bench: --sizes must all be at least 1".into());
            }
            match mode {
                BenchMode::Matmul => bench::matmul(&sizes, reps, json),
            }
        }
    }
}

fn demo_overview() {
    println!(
        "\
tapelora — tape-based autodiff, GPT-2 and LoRA in pure Rust

The end-to-end LoRA demo is not built yet. What exists today:

  autograd   a Wengert-list tape with forward and backward side by side for every op
             (matmul, elementwise, reductions, views, embedding, softmax, cross-entropy,
             layer norm, attention, dropout), gradcheck in f64, a printable tape and
             Graphviz export, anomaly mode, and frozen leaves whose gradients are never computed.

Try:
  cargo run --release --example gradcheck_all     every op's gradient vs finite differences
  cargo run --release --example tape_tour         print a tape and its DOT graph
  cargo run --release -- bench --mode matmul      the tape's matmul vs raw sgemm
  cargo test --workspace --release                the test suite"
    );
}
