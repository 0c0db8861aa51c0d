"""The percentile bootstrap of lib/src/eval/bootstrap.rs, for the scripts that report
intervals of their own: the same resamples (SplitMix64 from the same seed), the same
1,000 replicates and the same interpolated percentiles, so that a script's 95%
interval is the one quark-eval gives for the same values (a Rust test holds the two
to each other).

    from bootstrap import resamples, interval
    draws = resamples(len(values))             # index lists, one per replicate
    low, high = interval([statistic(d) for d in draws])
"""

import math

REPLICATES = 1000
SEED = 0x0B00_7575_7261_7000
LEVEL = 0.95
_MASK = (1 << 64) - 1


class SplitMix64:
    """lib/src/rng.rs's generator (Steele, Lea and Flood 2014)."""

    def __init__(self, seed):
        self.state = seed & _MASK

    def next_u64(self):
        self.state = (self.state + 0x9E37_79B9_7F4A_7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB) & _MASK
        return z ^ (z >> 31)

    def below(self, n):
        """A draw from range(n): the high word of a 64 x 64-bit product (Lemire 2019)."""
        return (self.next_u64() * n) >> 64


def resamples(n, replicates=REPLICATES, seed=SEED):
    """The indices of each replicate: n draws with replacement from range(n)."""
    rng = SplitMix64(seed)
    return [[rng.below(n) for _ in range(n)] for _ in range(replicates)]


def percentile(values, q):
    """The q-quantile (0..1) of the finite values, interpolating linearly between order
    statistics (numpy's default); None for none."""
    v = sorted(x for x in values if math.isfinite(x))
    if not v:
        return None
    at = q * (len(v) - 1)
    lo, hi = int(at), min(int(at) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (at - lo)


def interval(values):
    """The central LEVEL interval of replicate values: (low, high), or None for none."""
    tail = (1.0 - LEVEL) / 2.0
    low, high = percentile(values, tail), percentile(values, 1.0 - tail)
    return None if low is None else (low, high)
