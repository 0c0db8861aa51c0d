//! The decode steps' CPU kernels (dense products and attention): the exact result to
//! rounding, each row's numbers independent of its batch, and only where they apply.

use quark::model::rowwise::{attend, decoding, dense, supported};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

/// The largest error of a kernel's output `got` against the exact (f64) result
/// beyond the rounding of its dtype: none for f32 (the tests bound what is left), for
/// bf16 the output's one rounding (half a bf16 step, 2^-9 relative; 2^-8 to be safe).
fn error_above_rounding(got: &Tensor, exact: &Tensor) -> f64 {
    let err = (got.to_kind(Kind::Double) - exact).abs();
    let rounding = if got.kind() == Kind::BFloat16 {
        exact.abs() * 2f64.powi(-8)
    } else {
        exact.zeros_like()
    };
    (err - rounding).max().double_value(&[])
}

fn kernel(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    decoding(|| dense(x, w, b))
        .unwrap()
        .expect("the kernel applies to f32 and bf16 CPU tensors inside decoding")
}

/// The dtypes the kernel runs in here, saying which it skips (the product is then
/// libtorch's): f32 needs AVX2 + FMA, bf16 AVX512-BF16.
fn kinds_here() -> Vec<Kind> {
    [Kind::Float, Kind::BFloat16]
        .into_iter()
        .filter(|&kind| {
            let yes = supported(kind);
            if !yes {
                eprintln!(
                    "skipped {kind:?}: this CPU lacks the instruction set the decode kernel needs"
                );
            }
            yes
        })
        .collect()
}

#[test]
fn matches_the_exact_product() {
    tch::manual_seed(0);
    for kind in kinds_here() {
        // Odd output counts (an unpaired last output), lengths off the lane widths (8
        // f32, 32 bf16), 1 to 9 rows (every tile height and a remainder), with and
        // without a bias, 2-D and 3-D.
        for (out, k) in [(1, 1), (37, 45), (64, 576), (129, 8), (577, 1536), (40, 70)] {
            let w = randn(&[out, k]).to_kind(kind);
            let b = randn(&[out]).to_kind(kind);
            for rows in [1, 2, 3, 4, 5, 9] {
                let x = randn(&[rows, 1, k]).to_kind(kind);
                for bias in [None, Some(&b)] {
                    let got = kernel(&x, &w, bias);
                    assert_eq!((got.size(), got.kind()), (vec![rows, 1, out], kind));
                    // The same inputs' product in f64: the kernel sums in f32, and in
                    // bf16 rounds the output once (half a bf16 step, 2^-9 relative).
                    let f64_ = |t: &Tensor| t.to_kind(Kind::Double);
                    let exact = f64_(&x).linear(&f64_(&w), bias.map(f64_).as_ref());
                    let scale = exact.abs().max().double_value(&[]).max(1.0);
                    let excess = error_above_rounding(&got, &exact);
                    assert!(
                        excess <= 1e-5 * scale * (k as f64).sqrt(),
                        "{kind:?} {out}x{k}, {rows} rows, bias {}: error {excess} above rounding (scale {scale})",
                        bias.is_some()
                    );
                }
            }
        }
    }
}

#[test]
fn each_row_is_independent_of_its_batch() {
    tch::manual_seed(1);
    for kind in kinds_here() {
        let (out, k) = (301, 203);
        let w = randn(&[out, k]).to_kind(kind);
        let b = randn(&[out]).to_kind(kind);
        let x = randn(&[11, k]).to_kind(kind);
        let alone: Vec<Tensor> = (0..11)
            .map(|r| kernel(&x.narrow(0, r, 1), &w, Some(&b)))
            .collect();
        for n in 1..=11 {
            let y = kernel(&x.narrow(0, 0, n), &w, Some(&b));
            for (r, want) in alone.iter().enumerate().take(n as usize) {
                assert!(
                    y.narrow(0, r as i64, 1).equal(want),
                    "{kind:?}: row {r} of a batch of {n} differs from the row alone"
                );
            }
        }
    }
}

#[test]
fn applies_only_to_one_dtype_cpu_products_inside_decoding() {
    let w = randn(&[8, 16]);
    let x = randn(&[2, 16]);
    assert!(dense(&x, &w, None).unwrap().is_none(), "outside decoding");
    let half = |t: &Tensor| t.to_kind(Kind::BFloat16);
    let mixed = decoding(|| dense(&half(&x), &w, None)).unwrap();
    assert!(mixed.is_none(), "bf16 rows, an f32 weight");
    let double = |t: &Tensor| t.to_kind(Kind::Double);
    let f64_ = decoding(|| dense(&double(&x), &double(&w), None)).unwrap();
    assert!(f64_.is_none(), "f64");
    let strided = decoding(|| dense(&x, &w.tr().contiguous().tr(), None)).unwrap();
    assert!(strided.is_none(), "a transposed weight");
    // Shapes that do not fit are libtorch's to refuse.
    let wrong = decoding(|| dense(&randn(&[2, 15]), &w, None)).unwrap();
    assert!(wrong.is_none(), "an input of the wrong width");
    let bias = decoding(|| dense(&x, &w, Some(&randn(&[7])))).unwrap();
    assert!(bias.is_none(), "a bias of the wrong length");
    let scalar = decoding(|| dense(&Tensor::from(1f32), &w, None)).unwrap();
    assert!(scalar.is_none(), "a 0-d input");
    // A graph being built keeps libtorch's product (the kernel has no backward).
    let graph = decoding(|| dense(&x.set_requires_grad(true), &w, None)).unwrap();
    assert!(graph.is_none(), "an input that requires grad");
    // The scope ends with the closure, also when it fails.
    let failed: anyhow::Result<()> = decoding(|| anyhow::bail!("inside"));
    assert!(failed.is_err());
    assert!(dense(&x, &w, None).unwrap().is_none(), "after the scope");
}

/// Row r's attention in f64: its one query over its keys and values from `starts[r]`.
fn exact_attention(q: &Tensor, k: &Tensor, v: &Tensor, starts: &[i64], scale: f64) -> Tensor {
    let f64_ = |t: &Tensor| t.to_kind(Kind::Double);
    let (b, h, _, hd) = q.size4().unwrap();
    let (kvh, total) = (k.size()[1], k.size()[2]);
    let rows: Vec<Tensor> = (0..b)
        .map(|r| {
            let start = starts[r as usize];
            let keys = f64_(&k.get(r).narrow(1, start, total - start));
            let values = f64_(&v.get(r).narrow(1, start, total - start));
            // Query head i reads key head i / (h / kvh).
            let keys = keys.repeat_interleave_self_int(h / kvh, 0, None);
            let values = values.repeat_interleave_self_int(h / kvh, 0, None);
            let scores = f64_(&q.get(r)).matmul(&keys.transpose(-1, -2)) * scale;
            scores
                .softmax(-1, Kind::Double)
                .matmul(&values)
                .view([1, h * hd])
        })
        .collect();
    Tensor::stack(&rows, 0)
}

fn attention_kernel(q: &Tensor, k: &Tensor, v: &Tensor, starts: &[i64]) -> Tensor {
    decoding(|| attend(q, k, v, starts, 0.125))
        .unwrap()
        .expect("the attention kernel applies to one query a row inside decoding")
}

/// The dtypes the attention kernel runs in here: both, where AVX2 + FMA are.
fn attention_kinds_here() -> Vec<Kind> {
    if supported(Kind::Float) {
        vec![Kind::Float, Kind::BFloat16]
    } else {
        eprintln!("skipped: this CPU lacks AVX2 + FMA, which the attention kernel needs");
        Vec::new()
    }
}

#[test]
fn attention_matches_the_exact_softmax() {
    tch::manual_seed(2);
    for kind in attention_kinds_here() {
        // Grouped-query (9 heads over 3) and plain heads; widths on and off the eight
        // lanes; rows starting anywhere, the last at the newest key (itself alone).
        for (h, kvh, hd) in [(9, 3, 64), (4, 4, 13), (2, 1, 8)] {
            let (b, total) = (5, 23);
            let q = randn(&[b, h, 1, hd]).to_kind(kind);
            let k = randn(&[b, kvh, total, hd]).to_kind(kind);
            let v = randn(&[b, kvh, total, hd]).to_kind(kind);
            let starts = [0, 3, 11, 21, 22];
            let got = attention_kernel(&q, &k, &v, &starts);
            assert_eq!((got.size(), got.kind()), (vec![b, 1, h * hd], kind));
            let exact = exact_attention(&q, &k, &v, &starts, 0.125);
            // f32 sums; bf16 rounds the output once.
            let excess = error_above_rounding(&got, &exact);
            assert!(
                excess <= 1e-5,
                "{kind:?} h {h} kvh {kvh} hd {hd}: error {excess} above rounding"
            );
            // Starts outside the keys are clamped to them, as the libtorch path does.
            let clamped = attention_kernel(&q, &k, &v, &[-2, 3, 11, 21, 40]);
            assert!(clamped.equal(&got), "{kind:?}: starts clamped to 0..T-1");
        }
    }
}

#[test]
fn attention_rows_are_independent_of_their_batch() {
    tch::manual_seed(3);
    for kind in attention_kinds_here() {
        let (b, h, kvh, total, hd) = (7, 6, 2, 19, 16);
        let q = randn(&[b, h, 1, hd]).to_kind(kind);
        let k = randn(&[b, kvh, total, hd]).to_kind(kind);
        let v = randn(&[b, kvh, total, hd]).to_kind(kind);
        let starts = [4, 0, 9, 18, 2, 2, 7];
        let whole = attention_kernel(&q, &k, &v, &starts);
        for r in 0..b {
            let one = |t: &Tensor| t.narrow(0, r, 1);
            let alone = attention_kernel(&one(&q), &one(&k), &one(&v), &starts[r as usize..][..1]);
            assert!(
                one(&whole).equal(&alone),
                "{kind:?}: row {r} of the batch differs from the row alone"
            );
        }
    }
}

#[test]
fn attention_applies_only_to_one_query_a_row_inside_decoding() {
    let (q, k, v) = (
        randn(&[2, 4, 1, 8]),
        randn(&[2, 2, 5, 8]),
        randn(&[2, 2, 5, 8]),
    );
    let starts = [0, 1];
    let run = |q: &Tensor, k: &Tensor, starts: &[i64]| {
        decoding(|| attend(q, k, &v, starts, 1.0)).unwrap()
    };
    assert!(
        attend(&q, &k, &v, &starts, 1.0).unwrap().is_none(),
        "outside decoding"
    );
    assert!(
        run(&randn(&[2, 4, 3, 8]), &k, &starts).is_none(),
        "three queries a row"
    );
    assert!(
        run(&q.to_kind(Kind::BFloat16), &k, &starts).is_none(),
        "mixed dtypes"
    );
    assert!(
        run(&randn(&[2, 3, 1, 8]), &k, &starts).is_none(),
        "3 heads over 2"
    );
    assert!(run(&q, &k, &starts[..1]).is_none(), "a start missing");
    assert!(
        run(&randn(&[2, 4, 1, 7]), &k, &starts).is_none(),
        "head widths differ"
    );
    let values = decoding(|| attend(&q, &k, &randn(&[2, 2, 4, 8]), &starts, 1.0)).unwrap();
    assert!(values.is_none(), "fewer values than keys");
    let (q0, k0) = (randn(&[0, 4, 1, 8]), randn(&[0, 2, 5, 8]));
    let empty = decoding(|| attend(&q0, &k0, &k0, &[], 1.0)).unwrap();
    assert!(empty.is_none(), "an empty batch");
    let graph = q.set_requires_grad(true);
    assert!(
        run(&graph, &k, &starts).is_none(),
        "a query that requires grad"
    );
}
