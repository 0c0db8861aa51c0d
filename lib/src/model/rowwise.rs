//! The CPU kernels of a decoding step (one new token per row, a few rows): its dense
//! products and its attention.
//!
//! Dense products: libtorch's matrix product repacks the whole weight for every such
//! call (MKL's `sgemm_scopy` in f32: 40% of f32 sampling's time on a 2-core AVX2
//! EPYC, more than the products themselves), so a step moves SmolLM2's weights
//! through memory several times. This kernel streams each weight row once a step and
//! dots it with every row of the batch in registers, the outputs split across
//! libtorch's own OpenMP threads: in f32 with AVX2 + FMA, in bf16 with AVX512-BF16's
//! pair dot products (f32 sums, the output rounded to bf16 once, as libtorch's is).
//!
//! Attention: each row's one query over its own cached keys, past its left padding.
//! libtorch's batch-invariant path runs it a row at a time as several small
//! operations a layer (thousands a step); this kernel runs every (row, head) pair in
//! one pass on the same threads, in f32 as that path does.
//!
//! Every output is computed from its own row alone, summed in one fixed order
//! whatever else the batch holds, so a row's numbers never depend on its batch (the
//! sampler's batch invariance holds by construction). The kernels run only inside
//! [`decoding`], which the sampler's decode steps enter: the prompt's forward pass
//! and training keep libtorch's products, which are faster for many rows.

use std::cell::Cell;

use anyhow::Result;
use tch::{Device, Kind, Tensor};

thread_local! {
    static DECODING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the decode kernel on (on this thread), as `tch::no_grad` runs a
/// closure without a graph.
pub fn decoding<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            DECODING.with(|d| d.set(self.0));
        }
    }
    let _reset = Reset(DECODING.with(|d| d.replace(true)));
    f()
}

/// Whether the kernel runs here for `kind`: f32 on x86-64 with AVX2 and FMA, bf16
/// with AVX512-BF16, in a process whose libtorch brought its OpenMP runtime (the
/// threads the kernel runs on).
pub fn supported(kind: Kind) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let isa = match kind {
            Kind::Float => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            Kind::BFloat16 => {
                std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512bf16")
            }
            _ => false,
        };
        isa && omp::runtime().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        false
    }
}

/// `x W^T + b`, as torch's `linear`: by the decode kernel where [`dense`] applies,
/// else by libtorch.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match dense(x, w, b)? {
        Some(y) => Ok(y),
        None => Ok(x.f_linear(w, b)?),
    }
}

/// `x W^T + b` by the decode kernel, for `x` `[.., in]` and `w` `[out, in]` (f32 or
/// bf16, CPU, one dtype); None where it does not apply (outside [`decoding`], mixed
/// dtypes, another device, a strided weight, shapes that do not fit, an input that
/// carries a gradient graph, where [`supported`] is false): the caller then runs
/// libtorch's product, which also reports any error.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    // Outside a decode step (training, the prompt's pass) nothing else is looked at.
    if !DECODING.with(Cell::get) {
        return Ok(None);
    }
    let kind = w.kind();
    let like_w = |t: &Tensor| t.kind() == kind && t.device() == Device::Cpu;
    let mut shape = x.size();
    let (out, k) = match (w.size().as_slice(), shape.last()) {
        (&[out, k], Some(&last)) if last == k && b.is_none_or(|b| b.size() == [out]) => (out, k),
        _ => return Ok(None),
    };
    if !like_w(x)
        || !like_w(w)
        || !b.is_none_or(like_w)
        || !w.is_contiguous()
        || x.requires_grad()
        || !supported(kind)
    {
        return Ok(None);
    }
    let rows = shape[..shape.len() - 1].iter().product::<i64>() as usize;
    let x = x.f_contiguous()?;
    let b = b.map(Tensor::f_contiguous).transpose()?;
    let y = Tensor::f_empty([rows as i64, out], (kind, Device::Cpu))?;
    let (out, k) = (out as usize, k as usize);
    #[cfg(target_arch = "x86_64")]
    match kind {
        Kind::Float => run::<x86::Avx2>(&x, w, b.as_ref(), &y, rows, k, out),
        _ => run::<x86::Avx512Bf16>(&x, w, b.as_ref(), &y, rows, k, out),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("supported() is false off x86-64 ({rows}, {k}, {out})");
    *shape.last_mut().expect("x has a last dimension") = out as i64;
    Ok(Some(y.f_view(shape.as_slice())?))
}

/// Runs the product on the OpenMP team: pairs of outputs, one contiguous block of
/// them a thread.
fn run<D: Dot>(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    y: &Tensor,
    rows: usize,
    k: usize,
    out: usize,
) {
    // SAFETY: contiguous tensors of these many elements of D::T (the caller matched
    // the dtype and made them contiguous), alive for the whole call.
    let product = unsafe {
        Product {
            x: elements(x, rows * k),
            rows,
            k,
            w: elements(w, out * k),
            b: b.map(|b| elements(b, out)),
            y: Out::of(y),
            out,
        }
    };
    let pairs = out.div_ceil(2);
    omp::parallel(&|thread, threads| {
        let per = pairs.div_ceil(threads);
        let outputs = (thread * per * 2).min(out)..((thread + 1) * per * 2).min(out);
        // SAFETY: `supported()` checked D's instruction set; the threads write
        // disjoint columns of `y`.
        unsafe { columns::<D>(&product, outputs) };
    });
}

/// Runs `body(thread, threads)` on every thread of libtorch's OpenMP team, where the
/// process has one, else `body(0, 1)` here: for CPU kernels that run between
/// libtorch's operations, on the threads that spin waiting for them (the decode
/// kernels here, and training's one-pass loss, lib/src/fit/loss_cpu.rs).
pub(crate) fn on_team(body: &(dyn Fn(usize, usize) + Sync)) {
    if omp::runtime().is_some() {
        omp::parallel(body);
    } else {
        body(0, 1);
    }
}

/// One product `y = x W^T + b`: `x` `[rows, k]`, `w` `[out, k]`, `y` `[rows, out]`.
struct Product<'a, T> {
    x: &'a [T],
    rows: usize,
    k: usize,
    w: &'a [T],
    b: Option<&'a [T]>,
    /// The output, shared by the threads (each writes its own columns).
    y: Out<T>,
    out: usize,
}

/// The elements of tensor `t` as a slice of `n` T (empty for `n` = 0, where the
/// tensor may have no storage).
///
/// # Safety
/// `t` is contiguous, on the CPU, holds `n` elements of type T, and outlives the slice.
unsafe fn elements<T>(t: &Tensor, n: usize) -> &[T] {
    if n == 0 {
        return &[];
    }
    // SAFETY: as the caller promises.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, n) }
}

/// A kernel's output tensor, written by every thread of the team: each thread writes
/// only its own elements.
pub(crate) struct Out<T>(*mut T);

// SAFETY: the threads write disjoint elements (each kernel splits its outputs).
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    /// # Safety
    /// `y` is a contiguous CPU tensor of element type T that outlives every write.
    unsafe fn of(y: &Tensor) -> Self {
        Out(y.data_ptr() as *mut T)
    }

    /// The elements of `y`, written through [`Out::write`] while `y` is borrowed.
    pub(crate) fn of_slice(y: &mut [T]) -> Self {
        Out(y.as_mut_ptr())
    }

    /// # Safety
    /// `i` is inside the tensor, and no other thread writes it.
    pub(crate) unsafe fn write(&self, i: usize, v: T) {
        // SAFETY: as the caller promises.
        unsafe { *self.0.add(i) = v };
    }
}

/// An element type the kernels read and write: f32, or bf16 as its bits (the
/// training's CPU kernels, the one-pass Adam and loss, read and write them too).
pub(crate) trait Element: Copy + Sync {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> f32 {
        v
    }
}

impl Element for u16 {
    fn to_f32(self) -> f32 {
        half::bf16::from_bits(self).to_f32()
    }
    /// To nearest, ties to even, as libtorch's cast and half's; a NaN stays a quiet
    /// NaN of its sign, as half's (libtorch's is always 0x7fc0). Without branches,
    /// so that loops of it compile to vector code.
    fn from_f32(v: f32) -> u16 {
        let x = v.to_bits();
        let rounded = (x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16) as u16;
        let nan = ((x >> 16) | 0x40) as u16;
        if v.is_nan() {
            nan
        } else {
            rounded
        }
    }
}

/// One instruction set's inner loop and element type.
trait Dot {
    type T: Element;
    /// `sums[i][j]` = Σ_t w_i[t] x[r0 + j, t] for weight rows `w` and the `R` (1 to
    /// 4) batch rows from `r0`, in one fixed order.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn tile<const R: usize>(
        x: &[Self::T],
        k: usize,
        r0: usize,
        w: [&[Self::T]; 2],
        sums: &mut [[f32; 4]; 2],
    );
}

/// Columns `outputs` of `y`: y[r, o] = b[o] + Σ_j x[r, j] w[o, j]. Two weight rows
/// at a time (each read from memory once), dotted with up to four batch rows at a
/// time (read from cache).
///
/// # Safety
/// The CPU has D's instruction set; no other thread writes these columns.
unsafe fn columns<D: Dot>(p: &Product<'_, D::T>, outputs: std::ops::Range<usize>) {
    let Product {
        x,
        rows,
        k,
        w,
        b,
        ref y,
        out,
    } = *p;
    let mut o = outputs.start;
    while o < outputs.end {
        let pair = o + 1 < outputs.end;
        let w0 = &w[o * k..(o + 1) * k];
        // An odd last output pairs with itself; the copy's sums are dropped.
        let w1 = if pair {
            &w[(o + 1) * k..(o + 2) * k]
        } else {
            w0
        };
        // The pair after the next starts streaming into L2 now, while this pair's
        // products run: with the hardware's prefetcher alone the kernel waits on
        // memory (the head's product at 16 rows took 1.4 to 1.5 times as long on a
        // 2-core EPYC, f32 and bf16 alike).
        prefetch_l2(&w[((o + 4) * k).min(outputs.end * k)..((o + 6) * k).min(outputs.end * k)]);
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(4);
            let mut sums = [[0f32; 4]; 2];
            let pair_rows = [w0, w1];
            // SAFETY: the caller's CPU has the instruction set.
            unsafe {
                match take {
                    4 => D::tile::<4>(x, k, r, pair_rows, &mut sums),
                    3 => D::tile::<3>(x, k, r, pair_rows, &mut sums),
                    2 => D::tile::<2>(x, k, r, pair_rows, &mut sums),
                    _ => D::tile::<1>(x, k, r, pair_rows, &mut sums),
                }
            }
            for (i, s) in sums.iter().enumerate().take(1 + usize::from(pair)) {
                let bias = b.map_or(0.0, |b| b[o + i].to_f32());
                for (j, v) in s.iter().enumerate().take(take) {
                    // SAFETY: row r + j < rows, column o + i < out, this thread's.
                    unsafe { y.write((r + j) * out + o + i, D::T::from_f32(v + bias)) };
                }
            }
            r += take;
        }
        o += 2;
    }
}

/// Asks the CPU to bring `data` into its L2 cache (a hint: nothing waits for it).
fn prefetch_l2<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(64 / std::mem::size_of::<T>()) {
        // SAFETY: a prefetch hint on an address inside `data`; it never faults.
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
            _mm_prefetch::<_MM_HINT_T1>(line.as_ptr() as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Attention of one new query a row, `q` `[b, h, 1, hd]`, over the row's cached keys
/// and values `k`, `v` `[b, kvh, T, hd]` from `starts[r]` on (clamped to 0..T-1; the
/// row's left padding skipped; kvh divides h: grouped-query attention), the scores
/// scaled by `scale`: `[b, 1, h * hd]` in q's dtype. The same function as the
/// batch-invariant path of `attention::attention`, in f32 as it is, equal to it up
/// to f32 rounding (its own summation order; the softmax's normaliser divides the
/// weighted sum of values), the output rounded once. None where it does not apply
/// (outside [`decoding`], more than one query, a dtype other than f32 and bf16, mixed
/// dtypes or devices, a gradient graph, shapes that do not fit or hold nothing, no
/// AVX2 + FMA or no OpenMP runtime): the caller then runs that path.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &[i64],
    scale: f64,
) -> Result<Option<Tensor>> {
    if !DECODING.with(Cell::get) {
        return Ok(None);
    }
    let kind = q.kind();
    let like_q = |t: &Tensor| t.kind() == kind && t.device() == Device::Cpu && !t.requires_grad();
    let sizes = match (q.size().as_slice(), k.size().as_slice()) {
        (&[b, h, 1, hd], &[kb, kvh, total, khd])
            if kb == b && khd == hd && kvh > 0 && h % kvh == 0 && b * h * hd * total > 0 =>
        {
            [b, h, kvh, total, hd].map(|d| d as usize)
        }
        _ => return Ok(None),
    };
    let [b, h, kvh, total, hd] = sizes;
    if v.size() != k.size()
        || starts.len() != b
        || !(like_q(q) && like_q(k) && like_q(v))
        || !matches!(kind, Kind::Float | Kind::BFloat16)
        || !supported(Kind::Float)
    {
        return Ok(None);
    }
    let (q, k, v) = (q.f_contiguous()?, k.f_contiguous()?, v.f_contiguous()?);
    let y = Tensor::f_empty([b as i64, 1, (h * hd) as i64], (kind, Device::Cpu))?;
    let shape = HeadShape {
        b,
        h,
        kvh,
        total,
        hd,
    };
    let scale = scale as f32;
    match kind {
        Kind::Float => attend_on::<f32>(&q, &k, &v, starts, scale, &y, shape),
        _ => attend_on::<u16>(&q, &k, &v, starts, scale, &y, shape),
    }
    Ok(Some(y))
}

/// The sizes of one decode step's attention: rows, query heads, key heads (each
/// read by h / kvh query heads), keys (cached positions), head width.
#[derive(Clone, Copy)]
struct HeadShape {
    b: usize,
    h: usize,
    kvh: usize,
    total: usize,
    hd: usize,
}

/// One step's attention, shared by the threads (each writes its own heads' outputs).
struct Heads<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    starts: &'a [i64],
    scale: f32,
    /// The output, shared by the threads (each writes its own heads).
    y: Out<T>,
    shape: HeadShape,
}

/// Runs [`attend`]'s (row, head) pairs on the OpenMP team, one contiguous block of
/// them a thread.
fn attend_on<E: Element>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    starts: &[i64],
    scale: f32,
    y: &Tensor,
    shape: HeadShape,
) {
    let HeadShape {
        b,
        h,
        kvh,
        total,
        hd,
        ..
    } = shape;
    // SAFETY: contiguous tensors of these many elements of E (the caller matched the
    // dtype and made them contiguous), alive for the whole call.
    let heads = unsafe {
        Heads {
            q: elements::<E>(q, b * h * hd),
            k: elements(k, b * kvh * total * hd),
            v: elements(v, b * kvh * total * hd),
            starts,
            scale,
            y: Out::of(y),
            shape,
        }
    };
    let tasks = b * h;
    omp::parallel(&|thread, threads| {
        let per = tasks.div_ceil(threads);
        let mut scratch = vec![0f32; total + 2 * hd];
        for task in (thread * per).min(tasks)..((thread + 1) * per).min(tasks) {
            // SAFETY: `supported(Kind::Float)` checked AVX2 and FMA; this thread alone
            // writes the outputs of its (row, head) pairs.
            unsafe { one_head(&heads, task, &mut scratch) };
        }
    });
}

/// Row `task / h`, head `task % h`: softmax(q K^T * scale) V over the row's keys from
/// its start, in f32; `scratch` holds at least keys + 2 * hd values.
///
/// # Safety
/// The CPU has AVX2 and FMA (the loops are compiled for them); no other thread writes
/// this pair's outputs.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
unsafe fn one_head<E: Element>(p: &Heads<'_, E>, task: usize, scratch: &mut [f32]) {
    let HeadShape {
        h, kvh, total, hd, ..
    } = p.shape;
    let (r, head) = (task / h, task % h);
    let start = p.starts[r].clamp(0, total as i64 - 1) as usize;
    let at = (r * kvh + head / (h / kvh)) * total * hd;
    let keys = &p.k[at + start * hd..at + total * hd];
    let values = &p.v[at + start * hd..at + total * hd];
    let (scores, rest) = scratch.split_at_mut(total - start);
    let (query, out) = rest.split_at_mut(hd);
    let out = &mut out[..hd];
    let q = &p.q[(r * h + head) * hd..(r * h + head + 1) * hd];
    for (d, &e) in query.iter_mut().zip(q) {
        *d = e.to_f32() * p.scale;
    }
    for (s, key) in scores.iter_mut().zip(keys.chunks_exact(hd)) {
        *s = dot(query, key);
    }
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total_weight = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        total_weight += *s;
    }
    out.fill(0.0);
    for (&weight, value) in scores.iter().zip(values.chunks_exact(hd)) {
        for (o, &e) in out.iter_mut().zip(value) {
            *o += weight * e.to_f32();
        }
    }
    for (i, &o) in out.iter().enumerate() {
        // SAFETY: row r's head `head` lies inside y, and is this thread's alone.
        unsafe {
            p.y.write((r * h + head) * hd + i, E::from_f32(o / total_weight))
        };
    }
}

/// Σ a[i] b[i] in eight interleaved partial sums, added in one fixed order.
#[inline]
fn dot<E: Element>(a: &[f32], b: &[E]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let (a_tail, b_tail) = (a8.remainder(), b8.remainder());
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * y[l].to_f32();
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y.to_f32();
    }
    sum
}

/// libtorch's own OpenMP team, so that the kernel's threads are the ones libtorch's
/// operations run on: a second pool (rayon) would compete for the cores with the
/// OpenMP workers, which spin for a while after every libtorch operation (on 2 cores
/// that made sampling slower than without the kernel).
mod omp {
    use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
    use std::sync::OnceLock;

    type Body<'a> = dyn Fn(usize, usize) + Sync + 'a;
    type Parallel = unsafe extern "C" fn(extern "C" fn(*mut c_void), *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    pub(super) struct Runtime {
        parallel: Parallel,
        thread_num: Query,
        num_threads: Query,
    }

    /// libgomp's entry points, looked up in the process: libtorch loads its OpenMP
    /// runtime (the PyPI wheel's bundled libgomp). None where the process has none.
    pub(super) fn runtime() -> Option<&'static Runtime> {
        static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
        RUNTIME.get_or_init(find_runtime).as_ref()
    }

    #[cfg(target_os = "linux")]
    fn find_runtime() -> Option<Runtime> {
        unsafe extern "C" {
            fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
        }
        let find = |name: &CStr| {
            // SAFETY: RTLD_DEFAULT (null on glibc) searches every loaded object.
            let f = unsafe { dlsym(std::ptr::null_mut(), name.as_ptr()) };
            (!f.is_null()).then_some(f)
        };
        // SAFETY: these are libgomp's documented entry points, with these signatures.
        unsafe {
            Some(Runtime {
                parallel: std::mem::transmute::<*mut c_void, Parallel>(find(c"GOMP_parallel")?),
                thread_num: std::mem::transmute::<*mut c_void, Query>(find(c"omp_get_thread_num")?),
                num_threads: std::mem::transmute::<*mut c_void, Query>(find(
                    c"omp_get_num_threads",
                )?),
            })
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn find_runtime() -> Option<Runtime> {
        None
    }

    /// Runs `body(thread, threads)` on every thread of the OpenMP team (as `#pragma
    /// omp parallel`), returning when all are done. Only called where [`runtime`]
    /// found one (`supported()`).
    pub(super) fn parallel(body: &Body<'_>) {
        let rt = runtime().expect("supported() found the OpenMP runtime");
        struct Job<'a> {
            body: &'a Body<'a>,
            rt: &'static Runtime,
        }
        extern "C" fn run(data: *mut c_void) {
            // SAFETY: `data` is the `Job` below, alive until GOMP_parallel returns.
            let job = unsafe { &*(data as *const Job) };
            // SAFETY: called inside the parallel region.
            let (thread, threads) = unsafe { ((job.rt.thread_num)(), (job.rt.num_threads)()) };
            (job.body)(thread as usize, threads.max(1) as usize);
        }
        let job = Job { body, rt };
        // SAFETY: 0 threads is the runtime's default team size (libtorch sets it), no
        // flags; GOMP_parallel returns after every thread has run `run`.
        unsafe { (rt.parallel)(run, &job as *const Job as *mut c_void, 0, 0) };
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Dot, Element};

    /// f32 with AVX2 + FMA: eight lanes.
    pub(super) struct Avx2;

    /// bf16 with AVX512-BF16: sixteen lanes, each a pair of bf16 products a step.
    pub(super) struct Avx512Bf16;

    impl Dot for Avx2 {
        type T = f32;
        /// Eight lanes of fused multiply-adds over the length, one fixed horizontal sum,
        /// then the few leftover elements in order.
        #[target_feature(enable = "avx2,fma")]
        unsafe fn tile<const R: usize>(
            x: &[f32],
            k: usize,
            r0: usize,
            [w0, w1]: [&[f32]; 2],
            sums: &mut [[f32; 4]; 2],
        ) {
            // SAFETY: the caller checked AVX2 and FMA; indices stay inside the slices.
            unsafe {
                let mut a0 = [_mm256_setzero_ps(); R];
                let mut a1 = [_mm256_setzero_ps(); R];
                let full = k / 8 * 8;
                let xp = x.as_ptr().add(r0 * k);
                let mut i = 0;
                while i < full {
                    let v0 = _mm256_loadu_ps(w0.as_ptr().add(i));
                    let v1 = _mm256_loadu_ps(w1.as_ptr().add(i));
                    for j in 0..R {
                        let xv = _mm256_loadu_ps(xp.add(j * k + i));
                        a0[j] = _mm256_fmadd_ps(v0, xv, a0[j]);
                        a1[j] = _mm256_fmadd_ps(v1, xv, a1[j]);
                    }
                    i += 8;
                }
                for j in 0..R {
                    let row = &x[(r0 + j) * k..(r0 + j + 1) * k];
                    let (mut s0, mut s1) = (hsum(a0[j]), hsum(a1[j]));
                    for t in full..k {
                        s0 = w0[t].mul_add(row[t], s0);
                        s1 = w1[t].mul_add(row[t], s1);
                    }
                    sums[0][j] = s0;
                    sums[1][j] = s1;
                }
            }
        }
    }

    impl Dot for Avx512Bf16 {
        type T = u16;
        /// Sixteen lanes of bf16 pair products (32 elements a step) summed in f32, one
        /// fixed horizontal sum, then the few leftover elements in order.
        #[target_feature(enable = "avx512f,avx512bf16")]
        unsafe fn tile<const R: usize>(
            x: &[u16],
            k: usize,
            r0: usize,
            [w0, w1]: [&[u16]; 2],
            sums: &mut [[f32; 4]; 2],
        ) {
            // SAFETY: the caller checked AVX512F and AVX512-BF16; indices stay inside the
            // slices; 32 bf16 are one 512-bit register.
            unsafe {
                let load = |p: *const u16| -> __m512bh {
                    std::mem::transmute(_mm512_loadu_si512(p as *const _))
                };
                let mut a0 = [_mm512_setzero_ps(); R];
                let mut a1 = [_mm512_setzero_ps(); R];
                let full = k / 32 * 32;
                let xp = x.as_ptr().add(r0 * k);
                let mut i = 0;
                while i < full {
                    let v0 = load(w0.as_ptr().add(i));
                    let v1 = load(w1.as_ptr().add(i));
                    for j in 0..R {
                        let xv = load(xp.add(j * k + i));
                        a0[j] = _mm512_dpbf16_ps(a0[j], v0, xv);
                        a1[j] = _mm512_dpbf16_ps(a1[j], v1, xv);
                    }
                    i += 32;
                }
                let f = <u16 as Element>::to_f32;
                for j in 0..R {
                    let row = &x[(r0 + j) * k..(r0 + j + 1) * k];
                    let (mut s0, mut s1) =
                        (_mm512_reduce_add_ps(a0[j]), _mm512_reduce_add_ps(a1[j]));
                    for t in full..k {
                        s0 = f(w0[t]).mul_add(f(row[t]), s0);
                        s1 = f(w1[t]).mul_add(f(row[t]), s1);
                    }
                    sums[0][j] = s0;
                    sums[1][j] = s1;
                }
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}

#[cfg(test)]
mod tests {
    use super::Element;

    #[test]
    fn bf16_rounding_is_halfs() {
        // Every 97th bit pattern: all exponents, both signs, NaNs and infinities.
        for x in (0..=u32::MAX)
            .step_by(97)
            .chain([0x7f80_0000, 0xff80_0000, 0x7f7f_ffff])
        {
            let v = f32::from_bits(x);
            assert_eq!(
                u16::from_f32(v),
                half::bf16::from_f32(v).to_bits(),
                "{x:#x}"
            );
        }
    }
}
