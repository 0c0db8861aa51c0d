//! The loss's vocabulary-wide part on the CPU in one kernel: for each completion
//! token, the policy's and the reference's log-softmax over the vocabulary, the NLL,
//! KL, entropy and unlikelihood terms, and the gradient of the token's loss with
//! respect to the policy's logits, written out once in the head's dtype.
//!
//! As libtorch operations and autograd the same work is some twenty passes over the
//! `[tokens, vocab]` arrays (log-softmaxes, products, sums, and their backward
//! functions, in f32 beside bf16 copies): 0.1 s of a 3 s bf16 step of SmolLM2 on two
//! cores. Here it is four reads of the two logits arrays and one write of the
//! gradient, on libtorch's own threads.
//!
//! The logits come vocabulary-major, `[vocab, tokens]` (token t's in column t): the
//! product `W xᵀ` that makes them runs faster than `x Wᵀ` at the head's shapes (in
//! f32 a fifth faster on a 2-core EPYC). Each thread takes blocks of neighbouring
//! columns, a cache line of each row, and walks the vocabulary down them, the
//! block's lanes side by side.
//!
//! Per token, with p = softmax(z), log q = log_softmax(z₀), A = Σ p log p,
//! B = Σ p log q, and the unlikelihood's candidates c (the clamp's kept ones C'):
//!
//!   loss = -log p_y + β (A - B) + α A + γ Σ_c -log max(1 - p_c, 1e-5)
//!   ∂loss/∂z_j = p_j (k + (β + α) log p_j - β log q_j) - [j = y] + γ w_j [j ∈ C']
//!
//! where w_c = p_c / (1 - p_c) and k = 1 - (β + α) A + β B - γ Σ_{C'} w_c.

use crate::model::rowwise::{self, Element, Out};

/// Bytes of a block's row: one cache line (where the token count is a multiple of
/// the block's, as the default pool's 160 are), 16 f32 or 32 bf16 columns. A
/// narrower block would read half lines whose other halves another block fetches
/// again (bf16 blocks of 16 columns took twice as long).
const LINE: usize = 64;

/// Rows summed in f32 before their sum goes into an f64 total.
const TILE: usize = 256;

/// The unlikelihood's clamp of 1 - p, as the tensor formula's `clamp_min(1e-5)`.
const FLOOR: f32 = 1e-5;

/// The weights of the terms beside the NLL: β (KL), α (entropy), γ (unlikelihood).
#[derive(Clone, Copy, Debug)]
pub(super) struct Weights {
    pub kl: f32,
    pub entropy: f32,
    pub unlikelihood: f32,
}

/// One completion token's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(super) struct Token {
    pub nll: f64,
    pub kl: f64,
    pub entropy: f64,
    pub unlikelihood: f64,
}

/// A chunk's logits, vocabulary-major: `policy[v * tokens + t]` is token t's logit
/// of id v, and the same for the reference's.
pub(super) struct Logits<'a, E> {
    pub policy: &'a [E],
    pub reference: &'a [E],
    pub vocab: usize,
    pub tokens: usize,
}

/// The terms of every token (`targets[t]`: its id; `candidates[t]`: its
/// unlikelihood candidates, in increasing order and other than the target, or none
/// at all when γ is 0) and, with `grad` = (out, scale), `scale` times the gradient of the
/// tokens' summed loss with respect to the policy's logits, laid out as they are.
pub(super) fn loss<E: Element>(
    logits: &Logits<'_, E>,
    targets: &[usize],
    candidates: &[Vec<usize>],
    w: Weights,
    grad: Option<(&mut [E], f32)>,
) -> Vec<Token> {
    let (vocab, tokens) = (logits.vocab, logits.tokens);
    let n = vocab * tokens;
    assert!(
        logits.policy.len() == n
            && logits.reference.len() == n
            && targets.len() == tokens
            && (candidates.is_empty() || candidates.len() == tokens)
            && targets
                .iter()
                .chain(candidates.iter().flatten())
                .all(|&v| v < vocab),
        "the loss kernel's inputs match its shape"
    );
    // A repeated candidate, or the target among them, would make the gradient's
    // fixes overwrite one another.
    assert!(
        candidates
            .iter()
            .zip(targets)
            .all(|(c, y)| c.windows(2).all(|p| p[0] < p[1]) && !c.contains(y)),
        "the unlikelihood candidates are increasing and exclude the target"
    );
    let grad = grad.map(|(g, scale)| {
        assert_eq!(g.len(), n, "the gradient matches the logits");
        (Out::of_slice(g), scale)
    });
    match std::mem::size_of::<E>() {
        4 => blocks::<E, { LINE / 4 }>(logits, targets, candidates, w, grad.as_ref()),
        _ => blocks::<E, { LINE / 2 }>(logits, targets, candidates, w, grad.as_ref()),
    }
}

/// [`loss`] in blocks of `W` columns, shared out to the threads.
fn blocks<E: Element, const W: usize>(
    logits: &Logits<'_, E>,
    targets: &[usize],
    candidates: &[Vec<usize>],
    w: Weights,
    grad: Option<&(Out<E>, f32)>,
) -> Vec<Token> {
    let tokens = logits.tokens;
    let blocks = tokens.div_ceil(W);
    let out = std::sync::Mutex::new(vec![Token::default(); tokens]);
    rowwise::on_team(&|thread, threads| {
        for b in (thread..blocks).step_by(threads) {
            let block = Block::<E, W> {
                logits,
                c0: b * W,
                width: W.min(tokens - b * W),
                targets,
                candidates,
                w,
                grad,
            };
            let terms = block.run();
            let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
            out[block.c0..block.c0 + block.width].copy_from_slice(&terms[..block.width]);
        }
    });
    out.into_inner().unwrap_or_else(|e| e.into_inner())
}

/// One block of neighbouring token columns.
struct Block<'a, E, const W: usize> {
    logits: &'a Logits<'a, E>,
    c0: usize,
    width: usize,
    targets: &'a [usize],
    candidates: &'a [Vec<usize>],
    w: Weights,
    /// The gradient, written by every thread: each writes only its own block's
    /// columns, and none is read.
    grad: Option<&'a (Out<E>, f32)>,
}

type Lanes<const W: usize> = [f32; W];
type Wide<const W: usize> = [f64; W];
type Terms<const W: usize> = [Token; W];

/// Per lane: the logits' maximum and the log of Σ exp(z - max), policy and reference.
struct Softmax<const W: usize> {
    max: Lanes<W>,
    log_sum: Lanes<W>,
    max0: Lanes<W>,
    log_sum0: Lanes<W>,
}

impl<E: Element, const W: usize> Block<'_, E, W> {
    fn run(&self) -> Terms<W> {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the instruction sets.
            return unsafe { self.run_avx2() };
        }
        self.run_portable()
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn run_avx2(&self) -> Terms<W> {
        self.run_portable()
    }

    /// The block's passes. Inlined into [`Block::run_avx2`] with everything they
    /// call, so that their loops over the lanes compile to AVX2 there (no closures:
    /// a closure's body is compiled apart, without the target's features).
    #[inline(always)]
    fn run_portable(&self) -> Terms<W> {
        let s = self.softmax();
        let [a, b] = self.expectations(&s);
        let mut terms = [Token::default(); W];
        let mut k = [0f32; W];
        let mut kept = vec![Vec::new(); self.width];
        let (beta, alpha, gamma) = (self.w.kl, self.w.entropy, self.w.unlikelihood);
        for (i, t) in (self.c0..self.c0 + self.width).enumerate() {
            let mut wsum = 0f32;
            let mut ul = 0f64;
            for &c in self.candidates.get(t).into_iter().flatten() {
                let p = exp(self.log_p(c, i, &s));
                let u = 1.0 - p;
                // A select, not f32::max: a NaN stays NaN, as in torch's clamp_min.
                ul -= f64::from(if u < FLOOR { FLOOR } else { u }.ln());
                if u >= FLOOR {
                    let wc = p / u;
                    wsum += wc;
                    kept[i].push((c, gamma * wc));
                }
            }
            terms[i] = Token {
                nll: -f64::from(self.log_p(self.targets[t], i, &s)),
                kl: a[i] - b[i],
                entropy: -a[i],
                unlikelihood: ul,
            };
            k[i] = 1.0 - (beta + alpha) * a[i] as f32 + beta * b[i] as f32 - gamma * wsum;
        }
        if let Some((out, scale)) = self.grad {
            self.write_grad(out, *scale, &k, &s, &kept);
        }
        terms
    }

    /// Token lane i's log p at id v.
    #[inline(always)]
    fn log_p(&self, v: usize, i: usize, s: &Softmax<W>) -> f32 {
        let z = self.logits.policy[v * self.logits.tokens + self.c0 + i].to_f32();
        (z - s.max[i]) - s.log_sum[i]
    }

    /// Rows v of the block, policy's and reference's: their `width` logits, zeros
    /// in the other lanes.
    #[inline(always)]
    fn rows(&self, v: usize) -> [Lanes<W>; 2] {
        let start = v * self.logits.tokens + self.c0;
        let mut x = [[0f32; W]; 2];
        for (x, a) in x
            .iter_mut()
            .zip([self.logits.policy, self.logits.reference])
        {
            if self.width == W {
                for (x, e) in x.iter_mut().zip(&a[start..start + W]) {
                    *x = e.to_f32();
                }
            } else {
                for (x, e) in x.iter_mut().zip(&a[start..start + self.width]) {
                    *x = e.to_f32();
                }
            }
        }
        x
    }

    /// log-softmax's maxima and log-sums, as libtorch's: the maximum first, then
    /// Σ exp(z - max).
    #[inline(always)]
    fn softmax(&self) -> Softmax<W> {
        let vocab = self.logits.vocab;
        let mut max = [[f32::NEG_INFINITY; W]; 2];
        for v in 0..vocab {
            let z = self.rows(v);
            for (m, z) in max.iter_mut().zip(&z) {
                for i in 0..W {
                    // A select, not f32::max, whose NaN rule keeps it scalar.
                    m[i] = if z[i] > m[i] { z[i] } else { m[i] };
                }
            }
        }
        let mut sums = [[0f64; W]; 2];
        for start in (0..vocab).step_by(TILE) {
            let mut tile = [[0f32; W]; 2];
            for v in start..(start + TILE).min(vocab) {
                let z = self.rows(v);
                for j in 0..2 {
                    for i in 0..W {
                        tile[j][i] += exp(z[j][i] - max[j][i]);
                    }
                }
            }
            widen(&mut sums, &tile);
        }
        let [log_sum, log_sum0] = sums.map(|s| s.map(|s| (s as f32).ln()));
        Softmax {
            max: max[0],
            log_sum,
            max0: max[1],
            log_sum0,
        }
    }

    /// A = Σ p log p and B = Σ p log q per lane.
    #[inline(always)]
    fn expectations(&self, s: &Softmax<W>) -> [Wide<W>; 2] {
        let vocab = self.logits.vocab;
        let mut sums = [[0f64; W]; 2];
        for start in (0..vocab).step_by(TILE) {
            let mut tile = [[0f32; W]; 2];
            for v in start..(start + TILE).min(vocab) {
                let [z, z0] = self.rows(v);
                for i in 0..W {
                    let logp = (z[i] - s.max[i]) - s.log_sum[i];
                    let logq = (z0[i] - s.max0[i]) - s.log_sum0[i];
                    let p = exp(logp);
                    tile[0][i] += p * logp;
                    tile[1][i] += p * logq;
                }
            }
            widen(&mut sums, &tile);
        }
        sums
    }

    /// The gradient's dense part at lane i, before the scale.
    #[inline(always)]
    fn dense(&self, i: usize, z: f32, z0: f32, k: &Lanes<W>, s: &Softmax<W>) -> f32 {
        let logp = (z - s.max[i]) - s.log_sum[i];
        let logq = (z0 - s.max0[i]) - s.log_sum0[i];
        exp(logp) * (k[i] + (self.w.kl + self.w.entropy) * logp - self.w.kl * logq)
    }

    /// The gradient of the block's columns: the dense formula everywhere, then at
    /// each token's target and kept candidates the same value with their terms
    /// added, so that every element is rounded to E once.
    #[inline(always)]
    fn write_grad(
        &self,
        out: &Out<E>,
        scale: f32,
        k: &Lanes<W>,
        s: &Softmax<W>,
        kept: &[Vec<(usize, f32)>],
    ) {
        let tokens = self.logits.tokens;
        let mut g = [E::from_f32(0.0); W];
        for v in 0..self.logits.vocab {
            let [z, z0] = self.rows(v);
            for i in 0..W {
                g[i] = E::from_f32(scale * self.dense(i, z[i], z0[i], k, s));
            }
            let at = v * tokens + self.c0;
            for (i, &g) in g[..self.width].iter().enumerate() {
                // SAFETY: this block's own columns of row v, inside the array
                // (`loss` checked its length); no other thread writes them.
                unsafe { out.write(at + i, g) };
            }
        }
        let (pol, refr) = (self.logits.policy, self.logits.reference);
        for (i, t) in (self.c0..self.c0 + self.width).enumerate() {
            let fixes = std::iter::once((self.targets[t], -1.0)).chain(kept[i].iter().copied());
            for (v, extra) in fixes {
                let at = v * tokens + t;
                let value = self.dense(i, pol[at].to_f32(), refr[at].to_f32(), k, s) + extra;
                // SAFETY: as above: an element of this block's columns.
                unsafe { out.write(at, E::from_f32(scale * value)) };
            }
        }
    }
}

/// Adds a tile's f32 sums into the f64 totals.
#[inline(always)]
fn widen<const W: usize>(total: &mut [Wide<W>; 2], tile: &[Lanes<W>; 2]) {
    for (t, a) in total.iter_mut().zip(tile) {
        for i in 0..W {
            t[i] += f64::from(a[i]);
        }
    }
}

/// e^x for x ≤ 0 (the kernel's exponents: logits less their maximum, and log
/// probabilities), Cephes' single-precision polynomial: within 2⁻²² of e^x
/// relatively, and 0 below -87.34 where e^x leaves f32's normal range (a NaN stays
/// NaN). Selects and arithmetic only, so that a loop over lanes of it compiles to
/// vector instructions.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LOW: f32 = -87.336_55;
    // ln 2 in two parts: n·C1 is exact for the n that occur.
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = if x < LOW { LOW } else { x };
    let n = (xc * LOG2E + 0.5).floor();
    let r = (xc - n * C1) - n * C2;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n from n's bits: n + 127 + 2^23 holds n + 127 in its mantissa (for n from
    // -126 to 127), read without a float-to-integer conversion, which would not
    // vectorize.
    let biased = (n + (127.0 + 8_388_608.0)).to_bits() & 0x7f_ffff;
    let two_n = f32::from_bits(biased << 23);
    if x < LOW {
        0.0
    } else {
        y * two_n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_epsilons_of_e_to_the_x() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.336 * i as f32 / 200_000.0;
            let want = f64::from(x).exp();
            let ulp = f64::from(f32::EPSILON) * want;
            worst = worst.max((f64::from(exp(x)) - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "{worst} epsilons");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The terms and gradient of one token, from the definitions, in f64.
    fn plain(z: &[f64], z0: &[f64], y: usize, cands: &[usize], w: Weights) -> (Token, Vec<f64>) {
        let log_softmax = |z: &[f64]| {
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            z.iter().map(|v| v - lse).collect::<Vec<_>>()
        };
        let (lp, lq) = (log_softmax(z), log_softmax(z0));
        let p: Vec<f64> = lp.iter().map(|v| v.exp()).collect();
        let a: f64 = p.iter().zip(&lp).map(|(p, l)| p * l).sum();
        let b: f64 = p.iter().zip(&lq).map(|(p, l)| p * l).sum();
        let (beta, alpha, gamma) = (
            f64::from(w.kl),
            f64::from(w.entropy),
            f64::from(w.unlikelihood),
        );
        let floor = f64::from(FLOOR);
        let ul: f64 = cands.iter().map(|&c| -(1.0 - p[c]).max(floor).ln()).sum();
        // The gradient by finite differences of the loss would be too coarse: the
        // chain rule through p, term by term.
        let mut g = vec![0.0; z.len()];
        for j in 0..z.len() {
            let dp = |i: usize| p[i] * (f64::from(u8::from(i == j)) - p[j]);
            let mut d = -(f64::from(u8::from(j == y)) - p[j]);
            for i in 0..z.len() {
                d += (beta + alpha) * dp(i) * (lp[i] + 1.0) - beta * dp(i) * lq[i];
            }
            for &c in cands {
                if 1.0 - p[c] >= floor {
                    d += gamma * dp(c) / (1.0 - p[c]);
                }
            }
            g[j] = d;
        }
        let t = Token {
            nll: -lp[y],
            kl: a - b,
            entropy: -a,
            unlikelihood: ul,
        };
        (t, g)
    }

    /// Logits of `tokens` columns (not a whole number of blocks) over a vocabulary,
    /// through the kernel and through the definitions, f32 and bf16.
    #[test]
    fn every_block_matches_the_definitions() {
        let (vocab, tokens) = (300, 2 * LINE / 2 + 5);
        let value = |seed: usize, scale: f64| ((seed as f64 * 0.618_034).fract() - 0.5) * scale;
        // One token column has a peaked distribution, so that a candidate's 1 - p
        // falls under the clamp.
        let z: Vec<f32> = (0..vocab * tokens)
            .map(|i| {
                let (v, t) = (i / tokens, i % tokens);
                (value(i, 8.0) + if t == 3 && v == 7 { 40.0 } else { 0.0 }) as f32
            })
            .collect();
        let z0: Vec<f32> = (0..vocab * tokens)
            .map(|i| value(i * 7 + 3, 6.0) as f32)
            .collect();
        let targets: Vec<usize> = (0..tokens).map(|t| (t * 37) % vocab).collect();
        let candidates: Vec<Vec<usize>> = (0..tokens)
            .map(|t| {
                let mut c: Vec<usize> = (0..t % 5).map(|j| (t * 11 + j * 53) % vocab).collect();
                if t == 3 {
                    c.push(7);
                }
                c.sort_unstable();
                c.dedup();
                c.retain(|&c| c != targets[t]);
                c
            })
            .collect();
        let w = Weights {
            kl: 0.05,
            entropy: 0.06,
            unlikelihood: 0.5,
        };
        let scale = 0.25;
        // f32, and bf16 (the logits above rounded; the gradient rounded once).
        check::<f32>(&z, &z0, &targets, &candidates, w, scale, 1e-4);
        check::<u16>(&z, &z0, &targets, &candidates, w, scale, 1e-2);
        // Without the unlikelihood term: no candidates at all.
        let plain_w = Weights {
            unlikelihood: 0.0,
            ..w
        };
        check::<f32>(&z, &z0, &targets, &[], plain_w, scale, 1e-4);
    }

    /// The kernel on logits `z`, `z0` `[vocab, tokens]` stored as E, against the
    /// definitions on the stored values: the terms to 1e-4, the gradient to `tol`.
    fn check<E: Element + std::fmt::Debug + PartialEq>(
        z: &[f32],
        z0: &[f32],
        targets: &[usize],
        candidates: &[Vec<usize>],
        w: Weights,
        scale: f32,
        tol: f64,
    ) {
        let tokens = targets.len();
        let vocab = z.len() / tokens;
        let stored = |a: &[f32]| -> Vec<E> { a.iter().map(|&x| E::from_f32(x)).collect() };
        let (zs, z0s) = (stored(z), stored(z0));
        let logits = Logits {
            policy: &zs,
            reference: &z0s,
            vocab,
            tokens,
        };
        let mut g = vec![E::from_f32(0.0); vocab * tokens];
        let terms = loss(&logits, targets, candidates, w, Some((&mut g, scale)));
        // Without a gradient, the same terms.
        assert_eq!(loss(&logits, targets, candidates, w, None), terms);
        let column = |a: &[E], t: usize| -> Vec<f64> {
            (0..vocab)
                .map(|v| f64::from(a[v * tokens + t].to_f32()))
                .collect()
        };
        for t in 0..tokens {
            let (want, gw) = plain(
                &column(&zs, t),
                &column(&z0s, t),
                targets[t],
                candidates.get(t).map_or(&[][..], Vec::as_slice),
                w,
            );
            let got = terms[t];
            for (a, b) in [
                (got.nll, want.nll),
                (got.kl, want.kl),
                (got.entropy, want.entropy),
                (got.unlikelihood, want.unlikelihood),
            ] {
                assert!(
                    (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                    "token {t}: {got:?} vs {want:?}"
                );
            }
            for (v, want) in gw.iter().enumerate() {
                let (a, b) = (
                    f64::from(g[v * tokens + t].to_f32()),
                    f64::from(scale) * want,
                );
                assert!(
                    (a - b).abs() <= tol * b.abs().max(1e-3),
                    "token {t} id {v}: {a} vs {b}"
                );
            }
        }
    }
}
