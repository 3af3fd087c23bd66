//! The tape: a Wengert list of every op recorded during a forward pass, and the reverse walk
//! over it that produces gradients.
//!
//! * A [`Var`] is a value plus the index of the tape record that produced it. Values live in
//!   [`Tensor`]s (`ArcArray`s): cloning one, or taking a transposed or sliced view of it, shares
//!   the buffer instead of copying it.
//! * Each op appends one [`Node`]: its name, its input indices, its output shape, a description
//!   of what it saved, and — only if some input requires grad — its backward closure. The
//!   closure owns the saved tensors, so running it (or dropping it) frees them.
//! * [`Tape::backward`] walks the list once in reverse. For every record it asks the closure only
//!   for the input gradients that are needed (an input needs a gradient iff a trainable leaf lies
//!   behind it), so a frozen weight's gradient matmul is never run, and it notes in the record
//!   which input gradients were computed and which were skipped. An input used by several
//!   records gets the sum of their gradients: the first moved in, the others added — or, for
//!   a record with a folding rule (`FoldingBackwardFn`: layer norm), added by the rule itself
//!   as it computes its part.

use std::cell::{Cell, Ref, RefCell};
use std::collections::HashMap;

use ndarray::{ArcArray, ArrayD, IxDyn};

use crate::error::{AutogradError, Result};
use crate::Float;

/// A value on the tape: an n-dimensional array whose buffer is shared (copy-on-write) between
/// the model, the tape records that saved it, and any views taken of it.
pub type Tensor<T = f32> = ArcArray<T, IxDyn>;

/// Index of a record on the tape.
pub type NodeId = usize;

/// A backward rule: given the gradient of the loss w.r.t. the op's output and, per input,
/// whether that input needs a gradient, return the gradient for each input (`None` where none is
/// needed). Each input gradient has exactly the input's shape.
pub(crate) type BackwardFn<T> = Box<dyn FnOnce(ArrayD<T>, &[bool]) -> Vec<Option<ArrayD<T>>>>;

/// A backward rule that is also handed the gradient input 0 has gathered so far (from the
/// records after this one; `None` if nothing reached it yet) and returns input 0's whole
/// gradient, that partial sum plus its own part — so an op can add its part as it computes it
/// instead of writing a new tensor that the tape then adds (layer norm on the residual stream,
/// whose other use is the residual add after it).
pub(crate) type FoldingBackwardFn<T> =
    Box<dyn FnOnce(ArrayD<T>, &[bool], Option<ArrayD<T>>) -> Vec<Option<ArrayD<T>>>>;

/// A record's backward rule, of either kind.
pub(crate) enum BackwardRule<T> {
    Plain(BackwardFn<T>),
    Folding(FoldingBackwardFn<T>),
}

/// What happened to the gradient of one input of a record during `backward`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradStatus {
    /// `backward` has not run yet.
    Pending,
    /// The input gradient was computed and passed on.
    Computed,
    /// Not computed: the input reaches no trainable leaf (a frozen weight, data, a constant).
    Skipped,
    /// Not computed: no gradient reached this record (it does not feed the loss).
    NoGradFlowed,
}

/// One tensor that a record keeps alive for its backward rule (described, not held here).
#[derive(Debug, Clone, PartialEq)]
pub struct SavedInfo {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

impl SavedInfo {
    pub fn of<T: Float, D: ndarray::Dimension>(
        name: &'static str,
        a: &ndarray::ArrayBase<impl ndarray::RawData<Elem = T>, D>,
    ) -> Self {
        SavedInfo {
            name,
            shape: a.shape().to_vec(),
            bytes: a.len() * std::mem::size_of::<T>(),
        }
    }
}

/// One record of the Wengert list.
pub struct Node<T: Float> {
    /// Position on the tape.
    pub index: NodeId,
    /// Op name (`"matmul"`, `"layer_norm"`, …); leaves are `"param"`, `"frozen"` or `"const"`.
    pub op: &'static str,
    /// Op attributes for display (`"axis=1"`), or a leaf's name.
    pub attrs: String,
    /// Records whose outputs are this op's inputs.
    pub inputs: Vec<NodeId>,
    pub shape: Vec<usize>,
    /// True iff a trainable leaf lies behind this record (for a leaf: it is trainable).
    pub requires_grad: bool,
    /// What the backward rule keeps alive (empty when no gradient can flow through).
    pub saved: Vec<SavedInfo>,
    /// Per input: computed, skipped, …; filled in by `backward`.
    pub input_grads: Vec<GradStatus>,
    /// ‖output‖₂ and ‖∂loss/∂output‖₂, when [`Tape::set_track_norms`] is on.
    pub value_norm: Option<f64>,
    pub grad_norm: Option<f64>,
    pub(crate) backward: Option<BackwardRule<T>>,
    /// Set by ops whose backward returns, for input 0, one gradient row per entry here
    /// (embedding): row `i` is added into row `scatter_rows[i]` of that input's gradient.
    pub(crate) scatter_rows: Option<Vec<usize>>,
}

impl<T: Float> Node<T> {
    /// No gradient reached this record: drop its backward rule (and what it saved).
    fn mark_unreached(&mut self) {
        self.backward = None;
        if self.requires_grad {
            self.input_grads.fill(GradStatus::NoGradFlowed);
        }
    }

    pub fn is_leaf(&self) -> bool {
        self.inputs.is_empty()
    }
    /// Bytes currently held alive for this record's backward rule (0 once backward ran).
    pub fn saved_bytes(&self) -> usize {
        if self.backward.is_some() {
            self.saved.iter().map(|s| s.bytes).sum()
        } else {
            0
        }
    }
}

/// A recording of one forward pass. Create one per step; it is cheap.
pub struct Tape<T: Float = f32> {
    nodes: RefCell<Vec<Node<T>>>,
    /// Named leaves already on the tape: a parameter used twice (GPT-2's tied wte/lm_head) is
    /// one leaf with two uses, so its gradients accumulate in backward.
    leaves_by_name: RefCell<HashMap<String, NodeId>>,
    grad_enabled: Cell<bool>,
    anomaly: Cell<bool>,
    track_norms: Cell<bool>,
    /// Per-op wall time, when [`Tape::set_profiling`] is on.
    profile: RefCell<Option<OpProfile>>,
}

/// Wall time per op name: forward (the time since the previous record, i.e. computing this
/// op's output) and backward (its rule plus accumulating what it returned).
#[derive(Clone, Debug, Default)]
pub struct OpProfile {
    pub ops: std::collections::BTreeMap<&'static str, OpTime>,
    last: Option<std::time::Instant>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct OpTime {
    pub calls: usize,
    pub forward_secs: f64,
    pub backward_secs: f64,
}

impl OpProfile {
    fn forward_mark(&mut self, op: &'static str) {
        let now = std::time::Instant::now();
        if let Some(last) = self.last {
            let t = self.ops.entry(op).or_default();
            t.calls += 1;
            t.forward_secs += (now - last).as_secs_f64();
        }
        self.last = Some(now);
    }

    /// Adds another profile's times to this one (to sum several steps).
    pub fn add(&mut self, other: &OpProfile) {
        for (op, t) in &other.ops {
            let mine = self.ops.entry(op).or_default();
            mine.calls += t.calls;
            mine.forward_secs += t.forward_secs;
            mine.backward_secs += t.backward_secs;
        }
    }
}

impl<T: Float> Default for Tape<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A value computed on a tape. Cheap to clone (the buffer is shared).
#[derive(Clone)]
pub struct Var<'t, T: Float = f32> {
    tape: &'t Tape<T>,
    id: Option<NodeId>,
    requires_grad: bool,
    value: Tensor<T>,
}

impl<T: Float> Tape<T> {
    pub fn new() -> Self {
        Tape {
            nodes: RefCell::new(Vec::new()),
            leaves_by_name: RefCell::new(HashMap::new()),
            grad_enabled: Cell::new(true),
            anomaly: Cell::new(false),
            track_norms: Cell::new(false),
            profile: RefCell::new(None),
        }
    }

    /// Time every op from now on (forward and backward), for [`Tape::profile`].
    pub fn set_profiling(&self, on: bool) {
        *self.profile.borrow_mut() = on.then(|| OpProfile {
            last: Some(std::time::Instant::now()),
            ..OpProfile::default()
        });
    }

    /// Wall time per op so far (None unless profiling is on).
    pub fn profile(&self) -> Option<OpProfile> {
        self.profile.borrow().clone()
    }

    fn profile_mark(&self, op: &'static str) {
        if let Some(p) = self.profile.borrow_mut().as_mut() {
            p.forward_mark(op);
        }
    }

    /// A trainable leaf (a parameter). Its gradient is returned by [`Tape::backward`] and can be
    /// looked up by `name`. Registering the same name again returns the same leaf, so a
    /// parameter used in several places gets one, accumulated, gradient.
    pub fn param(&self, name: impl Into<String>, value: impl Into<Tensor<T>>) -> Var<'_, T> {
        self.leaf("param", name.into(), value.into(), true)
    }

    /// A named leaf that does not require grad (a frozen weight): no gradient is ever computed
    /// for it, nor for anything that depends only on frozen leaves. On a tape that records for
    /// backward, an f32 matrix is also registered with [`crate::frozen_packs`], so that the
    /// GEMM packs its panels once instead of in every product of every step.
    pub fn frozen(&self, name: impl Into<String>, value: impl Into<Tensor<T>>) -> Var<'_, T> {
        let value = value.into();
        if self.grad_enabled.get() {
            if let Some(weight) = (&value as &dyn std::any::Any).downcast_ref::<Tensor<f32>>() {
                crate::frozen_packs::register(weight);
            }
        }
        self.leaf("frozen", name.into(), value, false)
    }

    /// An unnamed leaf that does not require grad (input data).
    pub fn constant(&self, value: impl Into<Tensor<T>>) -> Var<'_, T> {
        self.leaf("const", String::new(), value.into(), false)
    }

    fn leaf(
        &self,
        op: &'static str,
        name: String,
        value: Tensor<T>,
        trainable: bool,
    ) -> Var<'_, T> {
        self.profile_mark(op);
        if !self.grad_enabled.get() {
            return Var {
                tape: self,
                id: None,
                requires_grad: false,
                value,
            };
        }
        let mut nodes = self.nodes.borrow_mut();
        if !name.is_empty() {
            if let Some(&index) = self.leaves_by_name.borrow().get(&name) {
                let node = &nodes[index];
                if node.op == op && node.shape == value.shape() {
                    return Var {
                        tape: self,
                        id: Some(index),
                        requires_grad: trainable,
                        value,
                    };
                }
            }
        }
        let index = nodes.len();
        if !name.is_empty() {
            self.leaves_by_name.borrow_mut().insert(name.clone(), index);
        }
        nodes.push(Node {
            index,
            op,
            attrs: name,
            inputs: Vec::new(),
            shape: value.shape().to_vec(),
            requires_grad: trainable,
            saved: Vec::new(),
            input_grads: Vec::new(),
            value_norm: self.track_norms.get().then(|| l2_norm(&value)),
            grad_norm: None,
            backward: None,
            scatter_rows: None,
        });
        Var {
            tape: self,
            id: Some(index),
            requires_grad: trainable,
            value,
        }
    }

    /// Runs `f` with recording switched off: ops compute values but append nothing and save
    /// nothing (inference, evaluation, generation).
    pub fn no_grad<R>(&self, f: impl FnOnce() -> R) -> R {
        struct Restore<'a>(&'a Cell<bool>, bool);
        impl Drop for Restore<'_> {
            fn drop(&mut self) {
                self.0.set(self.1);
            }
        }
        let _restore = Restore(&self.grad_enabled, self.grad_enabled.replace(false));
        f()
    }

    pub fn is_grad_enabled(&self) -> bool {
        self.grad_enabled.get()
    }

    /// Anomaly mode: the first op whose output or input gradient holds a NaN or infinity is
    /// reported by name and tape index as [`AutogradError::NonFinite`].
    pub fn set_anomaly_detection(&self, on: bool) {
        self.anomaly.set(on);
    }

    /// Record ‖value‖ and ‖grad‖ of every node (for printing and graphs; costs a pass over
    /// each tensor).
    pub fn set_track_norms(&self, on: bool) {
        self.track_norms.set(on);
    }

    /// The records, in forward order (for printing and inspection).
    pub fn nodes(&self) -> Ref<'_, Vec<Node<T>>> {
        self.nodes.borrow()
    }

    pub fn len(&self) -> usize {
        self.nodes.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes that records currently keep alive for backward.
    pub fn saved_bytes(&self) -> usize {
        self.nodes.borrow().iter().map(Node::saved_bytes).sum()
    }

    /// Walks the tape once in reverse from `loss` (a one-element tensor) and returns the
    /// gradient of `loss` w.r.t. every trainable leaf it depends on.
    ///
    /// Each backward closure is consumed, so everything the tape saved is freed; intermediate
    /// gradients are dropped as soon as they have been passed on. Calling `backward` a second
    /// time on the same tape finds no closures and fails with [`AutogradError::LossNeedsNoGrad`]
    /// only if the loss itself has been consumed; build a new tape per step.
    pub fn backward(&self, loss: &Var<'_, T>) -> Result<Gradients<T>> {
        if loss.value.len() != 1 {
            return Err(AutogradError::LossNotScalar {
                shape: loss.shape().to_vec(),
            });
        }
        let root = match (loss.id, loss.requires_grad) {
            (Some(id), true) => id,
            _ => return Err(AutogradError::LossNeedsNoGrad),
        };
        let mut nodes = self.nodes.borrow_mut();
        let mut profile = self.profile.borrow_mut();
        let result = run_backward(
            &mut nodes,
            root,
            self.anomaly.get(),
            self.track_norms.get(),
            profile.as_mut(),
        );
        if result.is_err() {
            // Free whatever a failed walk did not reach.
            for node in nodes.iter_mut() {
                node.backward = None;
            }
        }
        result
    }
}

fn run_backward<T: Float>(
    nodes: &mut [Node<T>],
    root: NodeId,
    anomaly: bool,
    track_norms: bool,
    mut profile: Option<&mut OpProfile>,
) -> Result<Gradients<T>> {
    // Records made after the loss cannot contribute to it.
    for node in &mut nodes[root + 1..] {
        node.mark_unreached();
    }
    let mut grads: Vec<Option<ArrayD<T>>> = (0..=root).map(|_| None).collect();
    grads[root] = Some(ArrayD::from_elem(IxDyn(&nodes[root].shape), T::one()));
    let mut out = Gradients::default();

    for i in (0..=root).rev() {
        let needs: Vec<bool> = nodes[i]
            .inputs
            .iter()
            .map(|&j| nodes[j].requires_grad)
            .collect();
        let node = &mut nodes[i];
        let Some(grad) = grads[i].take() else {
            node.mark_unreached();
            continue;
        };
        if track_norms {
            node.grad_norm = Some(l2_norm(&grad));
        }
        if node.is_leaf() {
            if node.requires_grad {
                out.insert(i, node.attrs.clone(), grad);
            }
            continue;
        }
        let Some(backward) = node.backward.take() else {
            node.input_grads.fill(GradStatus::Skipped);
            continue;
        };
        let started = profile.is_some().then(std::time::Instant::now);
        let input_grads = match backward {
            BackwardRule::Plain(rule) => rule(grad, &needs),
            BackwardRule::Folding(rule) => {
                // What input 0 has so far goes in and comes back with this record's part.
                let partial = grads[node.inputs[0]].take();
                let had_partial = partial.is_some();
                let input_grads = rule(grad, &needs, partial);
                debug_assert!(
                    !had_partial || input_grads[0].is_some(),
                    "{}: a folding rule returns the partial gradient it was given",
                    node.op
                );
                input_grads
            }
        };
        debug_assert_eq!(input_grads.len(), node.inputs.len(), "{}: arity", node.op);
        let (op, inputs) = (node.op, node.inputs.clone());
        let scatter_rows = node.scatter_rows.take();
        for (slot, (j, g)) in inputs.into_iter().zip(input_grads).enumerate() {
            let status = match g {
                Some(g) => {
                    if anomaly && !g.iter().all(|v| v.is_finite()) {
                        return Err(AutogradError::NonFinite {
                            op,
                            index: i,
                            place: format!("the gradient for its input {slot} (backward)"),
                        });
                    }
                    match (&scatter_rows, slot) {
                        (Some(rows), 0) => scatter_add(&mut grads[j], &nodes[j].shape, rows, g),
                        _ => {
                            assert_eq!(
                                g.shape(),
                                &nodes[j].shape[..],
                                "{op}: backward returned a gradient of the wrong shape for input {slot}"
                            );
                            accumulate(&mut grads[j], g);
                        }
                    }
                    GradStatus::Computed
                }
                None => GradStatus::Skipped,
            };
            nodes[i].input_grads[slot] = status;
        }
        if let (Some(p), Some(started)) = (profile.as_deref_mut(), started) {
            p.ops.entry(op).or_default().backward_secs += started.elapsed().as_secs_f64();
        }
    }
    Ok(out)
}

/// Adds row `i` of `g` (`[rows.len(), dim]`) into row `rows[i]` of the slot's gradient of
/// `shape` (`[n, dim]`), starting from zeros if nothing has reached it yet.
fn scatter_add<T: Float>(
    slot: &mut Option<ArrayD<T>>,
    shape: &[usize],
    rows: &[usize],
    g: ArrayD<T>,
) {
    let dim = shape[1..].iter().product::<usize>();
    assert_eq!(
        g.len(),
        rows.len() * dim,
        "a scattered gradient has one row per id"
    );
    let acc = slot.get_or_insert_with(|| ArrayD::zeros(IxDyn(shape)));
    let g = g.as_standard_layout();
    let g = g.as_slice().expect("standard layout");
    let g_rows = rows.iter().zip(g.chunks_exact(dim.max(1)));
    if let Some(acc) = acc.as_slice_mut() {
        for (&row, values) in g_rows {
            for (a, &v) in acc[row * dim..(row + 1) * dim].iter_mut().zip(values) {
                *a += v;
            }
        }
    } else {
        // A gradient another op left strided (a transposed table, say).
        for (&row, values) in g_rows {
            for (a, &v) in acc
                .index_axis_mut(ndarray::Axis(0), row)
                .iter_mut()
                .zip(values)
            {
                *a += v;
            }
        }
    }
}

/// Adds `g` into the slot; the first contribution is moved in, not added to zeros.
pub(crate) fn accumulate<T: Float>(slot: &mut Option<ArrayD<T>>, g: ArrayD<T>) {
    match slot {
        None => *slot = Some(g),
        Some(acc) => crate::ops::add_assign_into(acc, &g),
    }
}

pub(crate) fn l2_norm<T: Float, S: ndarray::Data<Elem = T>>(
    a: &ndarray::ArrayBase<S, IxDyn>,
) -> f64 {
    a.iter().map(|v| v.as_f64().powi(2)).sum::<f64>().sqrt()
}

/// Gradients of the loss w.r.t. the trainable leaves, by leaf or by parameter name.
pub struct Gradients<T: Float = f32> {
    by_id: HashMap<NodeId, ArrayD<T>>,
    id_by_name: HashMap<String, NodeId>,
}

impl<T: Float> Default for Gradients<T> {
    fn default() -> Self {
        Gradients {
            by_id: HashMap::new(),
            id_by_name: HashMap::new(),
        }
    }
}

impl<T: Float> std::fmt::Debug for Gradients<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<_> = self.id_by_name.iter().collect();
        names.sort();
        f.debug_map()
            .entries(names.iter().map(|(n, id)| (n, self.by_id[id].shape())))
            .finish()
    }
}

impl<T: Float> Gradients<T> {
    fn insert(&mut self, id: NodeId, name: String, grad: ArrayD<T>) {
        if !name.is_empty() {
            self.id_by_name.insert(name, id);
        }
        self.by_id.insert(id, grad);
    }

    /// The gradient for a leaf, if the loss depends on it.
    pub fn get(&self, leaf: &Var<'_, T>) -> Option<&ArrayD<T>> {
        leaf.id.and_then(|id| self.by_id.get(&id))
    }

    /// The gradient for the parameter registered under `name`.
    pub fn get_by_name(&self, name: &str) -> Option<&ArrayD<T>> {
        self.id_by_name.get(name).and_then(|id| self.by_id.get(id))
    }

    /// Mutable access to the gradient for `name` (clipping, scaling).
    pub fn get_mut_by_name(&mut self, name: &str) -> Option<&mut ArrayD<T>> {
        let id = self.id_by_name.get(name)?;
        self.by_id.get_mut(id)
    }

    /// Moves the gradient for `name` out (no copy).
    pub fn take_by_name(&mut self, name: &str) -> Option<ArrayD<T>> {
        let id = self.id_by_name.remove(name)?;
        self.by_id.remove(&id)
    }

    /// Moves the gradient for a leaf out (no copy).
    pub fn take(&mut self, leaf: &Var<'_, T>) -> Option<ArrayD<T>> {
        leaf.id.and_then(|id| self.by_id.remove(&id))
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Names of the parameters that received a gradient.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.id_by_name.keys().map(String::as_str)
    }

    /// Adds `other`'s gradients into these, parameter by parameter (matched by name): one
    /// batch's gradients recorded on several tapes, as a sharded training step records them.
    /// Every name in `other` must have a gradient of the same shape here.
    pub fn add_named(&mut self, other: &Gradients<T>) -> Result<()> {
        // Checked first, so that an error leaves these gradients as they were.
        for (name, id) in &other.id_by_name {
            let grad = &other.by_id[id];
            let Some(acc) = self.get_by_name(name) else {
                return crate::error::arg_err(
                    "add_named",
                    format!("no gradient named {name:?} to add to"),
                );
            };
            if acc.shape() != grad.shape() {
                let why = format!("gradients of {name:?} differ in shape");
                return crate::error::shape_err("add_named", acc.shape(), grad.shape(), why);
            }
        }
        for (name, id) in &other.id_by_name {
            let acc = self.get_mut_by_name(name).expect("checked above");
            crate::ops::add_assign_into(acc, &other.by_id[id]);
        }
        Ok(())
    }
}

impl<T: Float> std::fmt::Debug for Var<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Var")
            .field("id", &self.id)
            .field("shape", &self.shape())
            .field("requires_grad", &self.requires_grad)
            .finish()
    }
}

impl<'t, T: Float> Var<'t, T> {
    pub fn value(&self) -> &Tensor<T> {
        &self.value
    }
    /// The value as an owned array, leaving an empty one behind: no copy when this Var held
    /// the only reference (an op consuming its input can then write in place).
    pub(crate) fn take_value(&mut self) -> ArrayD<T> {
        if self.id.is_none() && self.tape.is_grad_enabled() {
            // Not on the tape yet: recording it as a constant needs its shape, so keep it.
            // (Under `no_grad` nothing is recorded, so inference takes the value too.)
            return self.value.to_owned();
        }
        std::mem::replace(&mut self.value, ArrayD::zeros(IxDyn(&[0])).into_shared()).into_owned()
    }
    pub fn shape(&self) -> &[usize] {
        self.value.shape()
    }
    pub fn ndim(&self) -> usize {
        self.value.ndim()
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.value.len()
    }
    pub fn is_empty(&self) -> bool {
        self.value.is_empty()
    }
    /// The tape record that produced this value (`None` when recorded under `no_grad`).
    pub fn id(&self) -> Option<NodeId> {
        self.id
    }
    pub fn requires_grad(&self) -> bool {
        self.requires_grad
    }
    pub fn tape(&self) -> &'t Tape<T> {
        self.tape
    }
    /// The single element of a one-element tensor.
    pub fn item(&self) -> Option<T> {
        (self.value.len() == 1).then(|| *self.value.iter().next().expect("one element"))
    }

    /// The same value, cut off from the graph: no gradient flows back through it.
    pub fn detach(&self) -> Var<'t, T> {
        OpRecord::new("detach", &[self]).finish_without_grad(self.value.clone())
    }
}

/// Builder used by every op to append its record: inputs, attributes, what it saves, its
/// output value and its backward rule.
pub(crate) struct OpRecord<'a, 't, T: Float> {
    op: &'static str,
    attrs: String,
    inputs: &'a [&'a Var<'t, T>],
    saved: Vec<SavedInfo>,
    scatter_rows: Option<Vec<usize>>,
}

impl<'a, 't, T: Float> OpRecord<'a, 't, T> {
    pub(crate) fn new(op: &'static str, inputs: &'a [&'a Var<'t, T>]) -> Self {
        OpRecord {
            op,
            attrs: String::new(),
            inputs,
            saved: Vec::new(),
            scatter_rows: None,
        }
    }

    pub(crate) fn attrs(mut self, attrs: impl Into<String>) -> Self {
        self.attrs = attrs.into();
        self
    }

    /// Describes a tensor the backward rule keeps (the closure holds the tensor itself).
    pub(crate) fn saves<D: ndarray::Dimension>(
        mut self,
        name: &'static str,
        a: &ndarray::ArrayBase<impl ndarray::RawData<Elem = T>, D>,
    ) -> Self {
        self.saved.push(SavedInfo::of(name, a));
        self
    }

    /// [`OpRecord::saves`] for what the backward rule keeps only in some cases (`None`: not
    /// kept, so not listed).
    pub(crate) fn saves_kept<D: ndarray::Dimension>(
        self,
        name: &'static str,
        a: Option<&ndarray::ArrayBase<impl ndarray::RawData<Elem = T>, D>>,
    ) -> Self {
        match a {
            Some(a) => self.saves(name, a),
            None => self,
        }
    }

    /// The backward rule returns, for input 0, the gradient of the rows `rows` picked (one row
    /// per entry, `[rows.len(), dim]`): the tape adds each into its row of input 0's gradient
    /// in place, so a large table whose few rows were used (GPT-2's tied wte: 154 MB) gets no
    /// dense zero gradient to be added to the one it already has.
    pub(crate) fn scatters_rows(mut self, rows: Vec<usize>) -> Self {
        self.scatter_rows = Some(rows);
        self
    }

    pub(crate) fn tape(&self) -> &'t Tape<T> {
        self.inputs[0].tape
    }

    pub(crate) fn any_requires_grad(&self) -> bool {
        self.inputs.iter().any(|v| v.requires_grad)
    }

    /// Whether this record will keep a backward rule (recording is on and some input needs a
    /// gradient): an op whose forward can cheaply produce what its backward needs asks first.
    pub(crate) fn keeps_backward(&self) -> bool {
        self.tape().grad_enabled.get() && self.any_requires_grad()
    }

    /// Appends the record with its backward rule (kept only if some input requires grad and
    /// recording is on) and returns the output.
    pub(crate) fn finish(
        self,
        value: impl Into<Tensor<T>>,
        backward: impl FnOnce(ArrayD<T>, &[bool]) -> Vec<Option<ArrayD<T>>> + 'static,
    ) -> Result<Var<'t, T>> {
        self.push(value.into(), Some(BackwardRule::Plain(Box::new(backward))))
    }

    /// [`OpRecord::finish`] with a folding rule ([`FoldingBackwardFn`]): `backward` also gets
    /// input 0's gradient so far and returns input 0's whole gradient.
    pub(crate) fn finish_folding(
        self,
        value: impl Into<Tensor<T>>,
        backward: impl FnOnce(ArrayD<T>, &[bool], Option<ArrayD<T>>) -> Vec<Option<ArrayD<T>>> + 'static,
    ) -> Result<Var<'t, T>> {
        self.push(
            value.into(),
            Some(BackwardRule::Folding(Box::new(backward))),
        )
    }

    fn finish_without_grad(self, value: Tensor<T>) -> Var<'t, T> {
        let mut var = self
            .push(value, None)
            .expect("detach makes no new values to check");
        var.requires_grad = false;
        var
    }

    fn push(self, value: Tensor<T>, backward: Option<BackwardRule<T>>) -> Result<Var<'t, T>> {
        let tape = self.tape();
        if self.inputs.iter().any(|v| !std::ptr::eq(v.tape, tape)) {
            return Err(AutogradError::TapeMismatch { op: self.op });
        }
        tape.profile_mark(self.op);
        let mut nodes = tape.nodes.borrow_mut();
        let index = nodes.len();
        if tape.anomaly.get() && !value.iter().all(|v| v.is_finite()) {
            return Err(AutogradError::NonFinite {
                op: self.op,
                index,
                place: "its output (forward)".into(),
            });
        }
        if !tape.grad_enabled.get() {
            return Ok(Var {
                tape,
                id: None,
                requires_grad: false,
                value,
            });
        }
        let requires_grad = backward.is_some() && self.any_requires_grad();
        // An input computed under `no_grad` is not on the tape: it enters as a constant.
        let inputs: Vec<NodeId> = self
            .inputs
            .iter()
            .map(|v| {
                v.id.unwrap_or_else(|| {
                    let index = nodes.len();
                    nodes.push(Node {
                        index,
                        op: "const",
                        attrs: "from no_grad".into(),
                        inputs: Vec::new(),
                        shape: v.shape().to_vec(),
                        requires_grad: false,
                        saved: Vec::new(),
                        input_grads: Vec::new(),
                        value_norm: None,
                        grad_norm: None,
                        backward: None,
                        scatter_rows: None,
                    });
                    index
                })
            })
            .collect();
        let index = nodes.len();
        nodes.push(Node {
            index,
            op: self.op,
            attrs: self.attrs,
            inputs,
            shape: value.shape().to_vec(),
            requires_grad,
            saved: if requires_grad {
                self.saved
            } else {
                Vec::new()
            },
            input_grads: vec![
                if requires_grad {
                    GradStatus::Pending
                } else {
                    GradStatus::Skipped
                };
                self.inputs.len()
            ],
            value_norm: tape.track_norms.get().then(|| l2_norm(&value)),
            grad_norm: None,
            backward: if requires_grad { backward } else { None },
            scatter_rows: if requires_grad {
                self.scatter_rows
            } else {
                None
            },
        });
        Ok(Var {
            tape,
            id: Some(index),
            requires_grad,
            value,
        })
    }
}
