//! The decode steps' CPU kernel: the exact product to rounding, each row's numbers
//! independent of its batch, and only where it applies.

use quark::model::rowwise::{decoding, dense, supported};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
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
                    let err = (f64_(&got) - &exact).abs();
                    let scale = exact.abs().max().double_value(&[]).max(1.0);
                    let rounding = if kind == Kind::BFloat16 {
                        exact.abs() * 2f64.powi(-8)
                    } else {
                        exact.zeros_like()
                    };
                    let excess = (err - rounding).max().double_value(&[]);
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
