//! The dense products of a decoding step on a CPU in f32: one new token per row, a
//! few rows, a large weight. libtorch's matrix product (MKL) repacks the whole weight
//! for every such call (`sgemm_scopy`: 40% of f32 sampling's time on a 2-core AVX2
//! EPYC, more than the products themselves), so a step moves SmolLM2's 540 MB of
//! weights through memory several times. This kernel streams each weight row once a
//! step and dots it with every row of the batch in registers (AVX2 + FMA), the
//! outputs split across libtorch's own OpenMP threads.
//!
//! Every output is one row's dot product with one weight row, summed in one fixed
//! order whatever else the batch holds, so a row's numbers never depend on its batch
//! (the sampler's batch invariance holds by construction). It runs only inside
//! [`decoding`], which the sampler's decode steps enter: the prompt's forward pass and
//! training keep libtorch's products, which are faster for many rows.

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

/// Whether the kernel runs here: x86-64 with AVX2 and FMA, in a process whose
/// libtorch brought its OpenMP runtime (the threads the kernel runs on).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && omp::runtime().is_some()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x W^T + b` by the decode kernel, for `x` `[.., in]` and `w` `[out, in]` (f32,
/// CPU); None where it does not apply (outside [`decoding`], another dtype or device,
/// a strided weight, where [`supported`] is false): the caller then runs libtorch's
/// product.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    let float_cpu = |t: &Tensor| t.kind() == Kind::Float && t.device() == Device::Cpu;
    if !DECODING.with(Cell::get)
        || !float_cpu(x)
        || !float_cpu(w)
        || !b.is_none_or(float_cpu)
        || !w.is_contiguous()
        || !supported()
    {
        return Ok(None);
    }
    let (out, k) = w.size2()?;
    let mut shape = x.size();
    let rows = shape[..shape.len() - 1].iter().product::<i64>() as usize;
    let x = x.f_contiguous()?;
    let b = b.map(Tensor::f_contiguous).transpose()?;
    let y = Tensor::f_empty([rows as i64, out], (Kind::Float, Device::Cpu))?;
    let (out, k) = (out as usize, k as usize);
    // SAFETY: contiguous f32 tensors of these sizes, alive for the whole call; the
    // threads write disjoint columns of `y`.
    let product = unsafe {
        Product {
            x: std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * k),
            rows,
            k,
            w: std::slice::from_raw_parts(w.data_ptr() as *const f32, out * k),
            b: b.as_ref()
                .map(|b| std::slice::from_raw_parts(b.data_ptr() as *const f32, out)),
            y: y.data_ptr() as *mut f32,
            out,
        }
    };
    // Pairs of outputs, one contiguous block of them a thread.
    let pairs = out.div_ceil(2);
    omp::parallel(&|thread, threads| {
        let per = pairs.div_ceil(threads);
        let outputs = (thread * per * 2).min(out)..((thread + 1) * per * 2).min(out);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `supported()` checked AVX2 and FMA.
        unsafe {
            avx2::columns(&product, outputs)
        };
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!("the kernel runs on x86-64 only ({outputs:?})");
    });
    *shape.last_mut().expect("x has a last dimension") = out as i64;
    Ok(Some(y.f_view(shape.as_slice())?))
}

/// One product `y = x W^T + b`: `x` `[rows, k]`, `w` `[out, k]`, `y` `[rows, out]`.
struct Product<'a> {
    x: &'a [f32],
    rows: usize,
    k: usize,
    w: &'a [f32],
    b: Option<&'a [f32]>,
    /// The output's base pointer, shared by the threads (each writes its own columns).
    y: *mut f32,
    out: usize,
}

// SAFETY: the threads only read the slices and write disjoint columns through `y`.
unsafe impl Sync for Product<'_> {}

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
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::Product;

    /// Columns `outputs` of `y` `[rows, out]`: y[r, o] = b[o] + Σ_j x[r, j] w[o, j].
    /// Two weight rows at a time (each read from memory once), dotted with up to four
    /// batch rows at a time (read from cache).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn columns(p: &Product<'_>, outputs: Range<usize>) {
        let Product {
            x,
            rows,
            k,
            w,
            b,
            y,
            out,
        } = *p;
        // SAFETY: the caller checked AVX2 and FMA; indices stay inside the slices.
        unsafe {
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
                let mut r = 0;
                while r < rows {
                    let take = (rows - r).min(4);
                    let mut sums = [[0f32; 4]; 2];
                    match take {
                        4 => tile::<4>(x, k, r, w0, w1, &mut sums),
                        3 => tile::<3>(x, k, r, w0, w1, &mut sums),
                        2 => tile::<2>(x, k, r, w0, w1, &mut sums),
                        _ => tile::<1>(x, k, r, w0, w1, &mut sums),
                    }
                    for (i, s) in sums.iter().enumerate().take(1 + usize::from(pair)) {
                        let bias = b.map_or(0.0, |b| b[o + i]);
                        for (j, v) in s.iter().enumerate().take(take) {
                            *y.add((r + j) * out + o + i) = v + bias;
                        }
                    }
                    r += take;
                }
                o += 2;
            }
        }
    }

    /// The dot products of weight rows `w0`, `w1` with batch rows `r0..r0 + R`: eight
    /// lanes of fused multiply-adds over the length, one fixed horizontal sum, then
    /// the few leftover elements in order.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize>(
        x: &[f32],
        k: usize,
        r0: usize,
        w0: &[f32],
        w1: &[f32],
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

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }
}
