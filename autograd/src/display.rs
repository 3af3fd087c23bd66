//! Showing the tape: as a text table (`Display`) and as a Graphviz DOT graph.
//!
//! ```text
//!   #  op          attrs                inputs  shape      grad  saved                 input grads
//!   0  param       w                    -       [4, 3]     yes   -                     -
//!   1  const                            -       [2, 4]     no    -                     -
//!   2  matmul      [2×4]·[4×3]          1,0     [2, 3]     yes   a[2, 4] b[4, 3]       1:skipped 0:computed
//! ```

use std::fmt::{self, Write as _};

use crate::tape::{GradStatus, Node, Tape};
use crate::Float;

fn status_word(s: GradStatus) -> &'static str {
    match s {
        GradStatus::Pending => "pending",
        GradStatus::Computed => "computed",
        GradStatus::Skipped => "skipped",
        GradStatus::NoGradFlowed => "no-flow",
    }
}

fn join<I: IntoIterator<Item = String>>(items: I, sep: &str) -> String {
    let v: Vec<String> = items.into_iter().collect();
    if v.is_empty() {
        "-".into()
    } else {
        v.join(sep)
    }
}

impl<T: Float> Node<T> {
    fn inputs_text(&self) -> String {
        join(self.inputs.iter().map(|i| i.to_string()), ",")
    }
    fn saved_text(&self) -> String {
        if self.backward.is_none() && !self.saved.is_empty() {
            return "(freed by backward)".into();
        }
        join(
            self.saved
                .iter()
                .map(|s| format!("{}{:?}", s.name, s.shape)),
            " ",
        )
    }
    fn grads_text(&self) -> String {
        join(
            self.inputs
                .iter()
                .zip(&self.input_grads)
                .map(|(i, s)| format!("{i}:{}", status_word(*s))),
            " ",
        )
    }
}

impl<T: Float> fmt::Display for Tape<T> {
    /// One row per record, in forward order.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nodes = self.nodes();
        writeln!(
            f,
            "{:>4}  {:<13} {:<26} {:<8} {:<16} {:<5} {:<30} input grads",
            "#", "op", "attrs", "inputs", "shape", "grad", "saved"
        )?;
        for n in nodes.iter() {
            let mut line = format!(
                "{:>4}  {:<13} {:<26} {:<8} {:<16} {:<5} {:<30} {}",
                n.index,
                n.op,
                n.attrs,
                n.inputs_text(),
                format!("{:?}", n.shape),
                if n.requires_grad { "yes" } else { "no" },
                n.saved_text(),
                n.grads_text()
            );
            if let Some(v) = n.value_norm {
                let _ = write!(line, "  |value|={v:.4e}");
            }
            if let Some(g) = n.grad_norm {
                let _ = write!(line, "  |grad|={g:.4e}");
            }
            writeln!(f, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// What [`Tape::to_dot`] includes.
#[derive(Debug, Clone, Copy, Default)]
pub struct DotOptions {
    /// Add ‖value‖ and ‖grad‖ to node labels (needs [`Tape::set_track_norms`]).
    pub norms: bool,
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

impl<T: Float> Tape<T> {
    /// The tape as a Graphviz DOT digraph. Trainable parameters are blue, frozen leaves grey;
    /// records that carry no gradient are dashed; an edge is solid where the gradient for that
    /// input was computed, dashed grey where it was skipped, dotted where none flowed.
    pub fn to_dot(&self, opts: &DotOptions) -> String {
        let mut out = String::from(
            "digraph tape {\n  rankdir=TB;\n  node [fontname=\"Helvetica\", fontsize=10];\n",
        );
        for n in self.nodes().iter() {
            let mut label = format!("#{} {}", n.index, n.op);
            if !n.attrs.is_empty() {
                label += &format!("\\n{}", escape(&n.attrs));
            }
            label += &format!("\\n{:?}", n.shape);
            if opts.norms {
                if let Some(v) = n.value_norm {
                    label += &format!("\\n|v|={v:.3e}");
                }
                if let Some(g) = n.grad_norm {
                    label += &format!("\\n|g|={g:.3e}");
                }
            }
            let style = match (n.is_leaf(), n.op, n.requires_grad) {
                (true, "param", _) => "shape=ellipse, style=filled, fillcolor=\"#cfe2ff\"",
                (true, "frozen", _) => "shape=ellipse, style=filled, fillcolor=\"#dddddd\"",
                (true, _, _) => "shape=ellipse",
                (false, _, true) => "shape=box",
                (false, _, false) => {
                    "shape=box, style=dashed, color=\"#888888\", fontcolor=\"#666666\""
                }
            };
            let _ = writeln!(out, "  n{} [label=\"{}\", {}];", n.index, label, style);
            for (&input, status) in n.inputs.iter().zip(&n.input_grads) {
                let edge = match status {
                    GradStatus::Computed => "color=black",
                    GradStatus::Pending => "color=black",
                    GradStatus::Skipped => {
                        "style=dashed, color=\"#aaaaaa\", label=\"no grad\", fontsize=8"
                    }
                    GradStatus::NoGradFlowed => "style=dotted, color=\"#aaaaaa\"",
                };
                let _ = writeln!(out, "  n{} -> n{} [{}];", input, n.index, edge);
            }
        }
        out.push_str("}\n");
        out
    }
}

impl<T: Float> Tape<T> {
    /// "Follow the gradient": the records in the order backward visited them (reverse), each
    /// with the norm of the gradient that arrived (needs [`Tape::set_track_norms`]) and which
    /// of its inputs it passed a gradient to.
    pub fn backward_walk(&self) -> String {
        let nodes = self.nodes();
        let mut out = String::from(
            "backward, from the loss down (‖g‖ = norm of ∂loss/∂output arriving at the record):\n",
        );
        for n in nodes.iter().rev() {
            let Some(g) = n.grad_norm else { continue };
            let what = if n.is_leaf() {
                format!("{} {}", n.op, n.attrs)
            } else {
                n.op.to_string()
            };
            let _ = write!(out, "{:>4}  {:<28} ‖g‖ = {:<11.4e}", n.index, what, g);
            if !n.is_leaf() {
                let passes: Vec<String> = n
                    .inputs
                    .iter()
                    .zip(&n.input_grads)
                    .map(|(i, st)| format!("#{i} {}", status_word(*st)))
                    .collect();
                let _ = write!(out, " → {}", passes.join(", "));
            } else if n.requires_grad {
                out.push_str(" (gradient handed to the optimizer)");
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::DotOptions;
    use crate::Tape;
    use ndarray::ArrayD;

    #[test]
    fn table_and_dot_show_what_was_computed_and_skipped() {
        let tape = Tape::<f32>::new();
        tape.set_track_norms(true);
        let w = tape.frozen("w0", ArrayD::ones(ndarray::IxDyn(&[4, 3])));
        let a = tape.param("lora_a", ArrayD::ones(ndarray::IxDyn(&[4, 3])));
        let x = tape.constant(ArrayD::ones(ndarray::IxDyn(&[2, 4])));
        let y = x.matmul(&w).unwrap().add(&x.matmul(&a).unwrap()).unwrap();
        let loss = y.sum_all().unwrap();
        tape.backward(&loss).unwrap();
        let table = tape.to_string();
        assert!(
            table.contains("frozen") && table.contains("lora_a"),
            "{table}"
        );
        // matmul x·W0: nothing computed (neither input needs a gradient).
        let first_matmul = table.lines().find(|l| l.contains("matmul")).unwrap();
        assert!(
            first_matmul.contains("2:skipped 0:skipped"),
            "{first_matmul}"
        );
        // matmul x·A: the data input is skipped, A's gradient computed.
        let second_matmul = table
            .lines()
            .filter(|l| l.contains("matmul"))
            .nth(1)
            .unwrap();
        assert!(
            second_matmul.contains("2:skipped 1:computed"),
            "{second_matmul}"
        );
        assert!(table.contains("|grad|="));
        let walk = tape.backward_walk();
        assert!(
            walk.contains("param lora_a") && walk.contains("(gradient handed to the optimizer)"),
            "{walk}"
        );
        assert!(
            !walk.contains("frozen w0"),
            "no gradient reaches the frozen weight: {walk}"
        );
        let dot = tape.to_dot(&DotOptions { norms: true });
        assert!(dot.starts_with("digraph tape {") && dot.trim_end().ends_with('}'));
        assert!(dot.contains("label=\"no grad\"") && dot.contains("fillcolor=\"#cfe2ff\""));
    }
}
