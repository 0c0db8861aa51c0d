//! The decode steps' CPU kernel: libtorch's product to rounding, each row's numbers
//! independent of its batch, and only where it applies.

use quark::model::rowwise::{decoding, dense, supported};
use tch::{Device, Kind, Tensor};

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, Device::Cpu))
}

fn kernel(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    decoding(|| dense(x, w, b))
        .unwrap()
        .expect("the kernel applies to f32 CPU tensors inside decoding")
}

/// Skips (saying so) where the kernel does not run: the product is then libtorch's.
fn runs_here() -> bool {
    let yes = supported();
    if !yes {
        eprintln!("skipped: this CPU has no AVX2 + FMA, the decode kernel does not run");
    }
    yes
}

#[test]
fn matches_libtorch_linear() {
    if !runs_here() {
        return;
    }
    tch::manual_seed(0);
    // Odd output counts (an unpaired last output), lengths off the 8-lane width, 1 to 9
    // rows (every tile height and a remainder), with and without a bias, 2-D and 3-D.
    for (out, k) in [(1, 1), (37, 45), (64, 576), (129, 8), (577, 1536)] {
        let w = randn(&[out, k]);
        let b = randn(&[out]);
        for rows in [1, 2, 3, 4, 5, 9] {
            let x = randn(&[rows, 1, k]);
            for bias in [None, Some(&b)] {
                let got = kernel(&x, &w, bias);
                let want = x.linear(&w, bias);
                assert_eq!(got.size(), want.size());
                let err = (&got - &want).abs().max().double_value(&[]);
                let scale = want.abs().max().double_value(&[]).max(1.0);
                assert!(
                    err <= 1e-5 * scale * (k as f64).sqrt(),
                    "{out}x{k}, {rows} rows, bias {}: max error {err} (scale {scale})",
                    bias.is_some()
                );
            }
        }
    }
}

#[test]
fn each_row_is_independent_of_its_batch() {
    if !runs_here() {
        return;
    }
    tch::manual_seed(1);
    let (out, k) = (301, 203);
    let w = randn(&[out, k]);
    let b = randn(&[out]);
    let x = randn(&[11, k]);
    let alone: Vec<Tensor> = (0..11)
        .map(|r| kernel(&x.narrow(0, r, 1), &w, Some(&b)))
        .collect();
    for n in 1..=11 {
        let y = kernel(&x.narrow(0, 0, n), &w, Some(&b));
        for (r, want) in alone.iter().enumerate().take(n as usize) {
            assert!(
                y.narrow(0, r as i64, 1).equal(want),
                "row {r} of a batch of {n} differs from the row alone"
            );
        }
    }
}

#[test]
fn applies_only_to_f32_cpu_products_inside_decoding() {
    let w = randn(&[8, 16]);
    let x = randn(&[2, 16]);
    assert!(dense(&x, &w, None).unwrap().is_none(), "outside decoding");
    let half = |t: &Tensor| t.to_kind(Kind::BFloat16);
    let inside = decoding(|| dense(&half(&x), &half(&w), None)).unwrap();
    assert!(inside.is_none(), "bf16");
    let strided = decoding(|| dense(&x, &w.tr().contiguous().tr(), None)).unwrap();
    assert!(strided.is_none(), "a transposed weight");
    // The scope ends with the closure, also when it fails.
    let failed: anyhow::Result<()> = decoding(|| anyhow::bail!("inside"));
    assert!(failed.is_err());
    assert!(dense(&x, &w, None).unwrap().is_none(), "after the scope");
}
