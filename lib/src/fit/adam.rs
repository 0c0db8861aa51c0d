//! Adam (Kingma and Ba 2015) written out, as torch.optim.Adam computes it, over
//! f32 master copies of the parameters: its moments and step count are saved with
//! each checkpoint, so that fits that continue one another train as one long fit.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use tch::{COptimizer, Device, Kind, Tensor};

use super::adam_cpu::{self, Coefficients, Grad};
use crate::model::{write_safetensors, Model};

/// Adam with bias correction, as torch.optim.Adam computes it, over f32 master
/// copies of the parameters (the parameters themselves when they are f32).
pub struct Adam {
    names: Vec<String>,
    params: Vec<Tensor>,
    master: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// f32 sums of the gradients moved out of the parameters by [`Adam::absorb`].
    sums: Vec<Option<Tensor>>,
    betas: (f64, f64),
    eps: f64,
    /// Elements of one parameter whose learning rate is scaled (the control
    /// tokens' rows of the embedding).
    scaled: Option<ScaledRows>,
    /// [`Adam::set_one_pass`].
    one_pass: bool,
    /// libtorch's optimizer over the same parameters, used only for its
    /// `zero_grad`, which sets their gradients to none (tch has no other way to).
    /// The next backward pass then keeps the gradients autograd makes as they
    /// come instead of adding them to zeros, which with the zeroing took four
    /// passes over them.
    clear: COptimizer,
}

/// A run of elements `start..start + len` of parameter `param` (flat), whose
/// updates are `scale` times Adam's.
#[derive(Clone, Copy, Debug)]
struct ScaledRows {
    param: usize,
    start: i64,
    len: i64,
    scale: f64,
}

impl Adam {
    /// Sets up Adam over every variable of `model` (sorted by name), with moments
    /// restored from `state` when a previous fit saved them. With `separate_master`
    /// the f32 master weights are kept apart from the model (which is about to compute
    /// in bf16); otherwise Adam updates the f32 parameters themselves.
    pub fn new(
        model: &Model,
        betas: (f64, f64),
        eps: f64,
        state: Option<&Path>,
        separate_master: bool,
    ) -> Result<Self> {
        let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
        let saved: BTreeMap<String, Tensor> = match state {
            Some(p) => Tensor::read_safetensors(p)
                .with_context(|| format!("{}: cannot read optimizer state", p.display()))?
                .into_iter()
                .collect(),
            None => BTreeMap::new(),
        };
        let mut clear = COptimizer::sgd(0.0, 0.0, 0.0, 0.0, false)?;
        for p in vars.values() {
            clear.add_parameters(p, 0)?;
        }
        let mut adam = Adam {
            names: Vec::new(),
            params: Vec::new(),
            master: Vec::new(),
            m: Vec::new(),
            v: Vec::new(),
            sums: Vec::new(),
            betas,
            eps,
            scaled: None,
            one_pass: true,
            clear,
        };
        for (name, p) in vars {
            let master = if separate_master {
                // The f32 storage itself, under a handle of its own: the model's
                // variable gets new (bf16) storage when it changes kind, and this
                // keeps the f32 one, with no copy.
                p.detach().to_kind(Kind::Float)
            } else {
                p.shallow_clone()
            };
            let moment = |which: &str| -> Result<Tensor> {
                match saved.get(&format!("{which}.{name}")) {
                    Some(t) if t.size() == p.size() => {
                        Ok(t.to_kind(Kind::Float).to_device(p.device()))
                    }
                    Some(t) => bail!(
                        "optimizer state for `{name}` has shape {:?}, the parameter {:?}",
                        t.size(),
                        p.size()
                    ),
                    None if saved.is_empty() => Ok(master.zeros_like()),
                    None => bail!("optimizer state has no `{which}.{name}`"),
                }
            };
            adam.m.push(moment("m")?);
            adam.v.push(moment("v")?);
            adam.names.push(name);
            adam.sums.push(None);
            adam.params.push(p);
            adam.master.push(master);
        }
        Ok(adam)
    }

    /// Scales the learning rate of the control tokens' rows of `model`'s input
    /// embedding by `scale`. They start from scratch where the rest of the model is
    /// pretrained: at a fine-tuning rate they move about lr per dimension and step
    /// (Adam), so in a few hundred steps the K tokens stay nearly where they began
    /// and nearly alike, and the policy cannot tell the quantiles apart.
    pub fn scale_control_rows(&mut self, model: &Model, scale: f64) -> Result<()> {
        let ct = model
            .control_tokens()
            .context("the policy has no control tokens")?;
        let emb = model.input_embedding();
        let param = self
            .params
            .iter()
            .position(|p| p.data_ptr() == emb.data_ptr())
            .context("the input embedding is not among the optimizer's parameters")?;
        let d = emb.size()[1];
        self.scaled = Some(ScaledRows {
            param,
            start: ct.first_id * d,
            len: i64::from(ct.k) * d,
            scale,
        });
        Ok(())
    }

    /// Moves the parameters' gradients into f32 sums, which [`Adam::grad_norm`] and
    /// [`Adam::step`] then read: called after each micro-batch, it makes the
    /// gradients of bf16 parameters add up in f32 rather than in bf16.
    pub fn absorb(&mut self) {
        let _guard = tch::no_grad_guard();
        for (p, sum) in self.params.iter_mut().zip(&mut self.sums) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            match sum {
                Some(s) => {
                    let _ = s.g_add_(&g);
                }
                None => *sum = Some(g.to_kind(Kind::Float)),
            }
        }
        self.clear_gradients();
    }

    /// Sets every parameter's gradient to none (see [`Adam::clear`]).
    fn clear_gradients(&self) {
        self.clear
            .zero_grad()
            .expect("zero_grad of a plain SGD optimizer cannot fail");
    }

    /// Parameter `i`'s gradient: its f32 sum if [`Adam::absorb`] made one, else
    /// the parameter's own (None when it has none).
    fn gradient(&self, i: usize) -> Option<Tensor> {
        if let Some(s) = &self.sums[i] {
            return Some(s.shallow_clone());
        }
        let g = self.params[i].grad();
        g.defined().then_some(g)
    }

    /// The global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        let sq: f64 = (0..self.params.len())
            .map(|i| {
                let Some(g) = self.gradient(i) else {
                    return 0.0;
                };
                if let Some(sq) = cpu_elements(&g, adam_cpu::sum_of_squares) {
                    return sq;
                }
                // Summed in f32.
                let n = g.norm_scalaropt_dtype(2.0, Kind::Float).double_value(&[]);
                n * n
            })
            .sum();
        sq.sqrt()
    }

    /// One update with learning rate `lr` at 1-based step `t`, gradients scaled by
    /// `scale` (gradient clipping) first; then the gradients are set to none. A
    /// parameter without a gradient keeps its value and moments, as torch.optim.Adam
    /// leaves one whose gradient is None.
    pub fn step(&mut self, lr: f64, t: u64, scale: f64) {
        let _guard = tch::no_grad_guard();
        let (b1, b2) = self.betas;
        let bc1 = 1.0 - b1.powi(t as i32);
        let bc2 = 1.0 - b2.powi(t as i32);
        let c = Coefficients {
            grad_scale: scale as f32,
            m_weight: (1.0 - b1) as f32,
            beta2: b2 as f32,
            v_weight: (1.0 - b2) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            step_size: (lr / bc1) as f32,
        };
        for i in 0..self.params.len() {
            let Some(grad) = self.gradient(i) else {
                continue;
            };
            if !(self.one_pass && self.update_in_one_pass(i, &grad, c)) {
                self.update_with_tensor_ops(i, &grad, c);
            }
            self.sums[i] = None;
        }
        self.clear_gradients();
    }

    /// Whether [`Adam::step`] updates CPU parameters in one pass over their elements
    /// (the default) or with libtorch operations, as on other devices: both are held
    /// to torch.optim.Adam by a test.
    pub fn set_one_pass(&mut self, on: bool) {
        self.one_pass = on;
    }

    /// The scaled learning rate's elements of parameter `i`, if any.
    fn scaled_range(&self, i: usize) -> Option<(std::ops::Range<i64>, f64)> {
        self.scaled
            .filter(|r| r.param == i)
            .map(|r| (r.start..r.start + r.len, r.scale))
    }

    /// Parameter `i`'s update by [`adam_cpu::update`], where its tensors are
    /// contiguous CPU arrays of the kinds that takes; false (nothing done) elsewhere.
    fn update_in_one_pass(&mut self, i: usize, grad: &Tensor, c: Coefficients) -> bool {
        let (p, master) = (&self.params[i], &self.master[i]);
        let (m, v) = (&self.m[i], &self.v[i]);
        let dense = |t: &Tensor, kind: Kind| {
            t.device() == Device::Cpu && t.is_contiguous() && t.kind() == kind
        };
        let separate = master.data_ptr() != p.data_ptr();
        let n = master.numel();
        if !([m, v, master].into_iter().all(|t| dense(t, Kind::Float))
            && (!separate || dense(p, Kind::BFloat16))
            && p.numel() == n
            && grad.numel() == n)
        {
            return false;
        }
        let scaled = self
            .scaled_range(i)
            .map(|(r, s)| (r.start as usize..r.end as usize, s as f32));
        cpu_elements(grad, |grad| {
            if n == 0 {
                return;
            }
            // SAFETY: each tensor was just checked to be a contiguous CPU array of
            // `n` elements of the slice's type. The moments, the master and the
            // gradient are tensors of their own (the gradient is only read), and the
            // bf16 parameter is written only when its storage is not the master's, so
            // no slice that is written overlaps another in use.
            unsafe {
                let f32s = |t: &Tensor| std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n);
                let param =
                    separate.then(|| std::slice::from_raw_parts_mut(p.data_ptr() as *mut u16, n));
                adam_cpu::update(c, grad, f32s(m), f32s(v), f32s(master), param, scaled);
            }
        })
        .is_some()
    }

    /// Parameter `i`'s update with libtorch operations, in place, as
    /// torch.optim.Adam, a slice of elements at a time so that the f32 temporaries
    /// stay small beside the embedding. The parameter, master and moments are
    /// contiguous: flat views. The gradient is scratch (an f32 one is squared in
    /// place): the caller clears it.
    fn update_with_tensor_ops(&mut self, i: usize, grad: &Tensor, c: Coefficients) {
        let scaled = self.scaled_range(i);
        let p = &mut self.params[i];
        let flat_grad = grad.reshape([-1]);
        for (start, len) in slices(grad.numel() as i64) {
            let part = |t: &Tensor| t.view([-1]).narrow(0, start, len);
            let mut g = flat_grad.narrow(0, start, len).to_kind(Kind::Float);
            if c.grad_scale != 1.0 {
                let _ = g.g_mul_scalar_(f64::from(c.grad_scale));
            }
            let (mut m, mut v) = (part(&self.m[i]), part(&self.v[i]));
            let _ = m.lerp_(&g, f64::from(c.m_weight));
            let _ = g.square_();
            let _ = g.g_mul_scalar_(f64::from(c.v_weight));
            let _ = v.g_mul_scalar_(f64::from(c.beta2));
            let _ = v.g_add_(&g);
            drop(g);
            let mut denom = v.sqrt();
            let _ = denom.g_div_scalar_(f64::from(c.bc2_sqrt));
            let _ = denom.g_add_scalar_(f64::from(c.eps));
            let mut update = &m / &denom;
            let _ = update.g_mul_scalar_(f64::from(c.step_size));
            if let Some((r, scale)) = &scaled {
                let (a, b) = (r.start.max(start), r.end.min(start + len));
                if a < b {
                    let _ = update.narrow(0, a - start, b - a).g_mul_scalar_(*scale);
                }
            }
            let mut master = part(&self.master[i]);
            let _ = master.g_sub_(&update);
            if self.master[i].data_ptr() != p.data_ptr() {
                part(p).copy_(&master);
            }
        }
    }

    /// Writes the moments (as f32 safetensors) to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (i, n) in self.names.iter().enumerate() {
            named.push((format!("m.{n}"), self.m[i].shallow_clone()));
            named.push((format!("v.{n}"), self.v[i].shallow_clone()));
        }
        write_safetensors(path, &named)
    }

    /// Puts the f32 master weights back into the model (before saving it).
    pub fn restore_master(&self, model: &mut Model) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let vars: BTreeMap<String, Tensor> = model.var_store().variables().into_iter().collect();
        for (i, n) in self.names.iter().enumerate() {
            if self.master[i].data_ptr() != vars[n].data_ptr() {
                // The variable takes the master's f32 storage itself: no new copy of
                // the model while the checkpoint is written.
                vars[n].shallow_clone().set_data(&self.master[i]);
            }
        }
        Ok(())
    }
}

/// `f` of the elements of a contiguous f32 or bf16 CPU tensor; None for any other.
fn cpu_elements<T>(t: &Tensor, f: impl FnOnce(Grad) -> T) -> Option<T> {
    if t.device() != Device::Cpu || !t.is_contiguous() {
        return None;
    }
    let n = t.numel();
    if n == 0 {
        return Some(f(Grad::F32(&[])));
    }
    // SAFETY: a contiguous CPU tensor of n elements of the slice's type, read only
    // while `t` is borrowed.
    unsafe {
        match t.kind() {
            Kind::Float => Some(f(Grad::F32(std::slice::from_raw_parts(
                t.data_ptr() as *const f32,
                n,
            )))),
            Kind::BFloat16 => Some(f(Grad::Bf16(std::slice::from_raw_parts(
                t.data_ptr() as *const u16,
                n,
            )))),
            _ => None,
        }
    }
}

/// Adam's temporaries are at most this many elements (16 MB in f32).
const ADAM_SLICE_ELEMENTS: i64 = 1 << 22;

/// `(start, len)` slices of `n` elements, [`ADAM_SLICE_ELEMENTS`] at most each.
fn slices(n: i64) -> Vec<(i64, i64)> {
    (0..n)
        .step_by(ADAM_SLICE_ELEMENTS as usize)
        .map(|s| (s, ADAM_SLICE_ELEMENTS.min(n - s)))
        .collect()
}
