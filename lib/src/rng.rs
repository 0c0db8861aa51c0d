//! The crate's one random generator: SplitMix64 (Steele, Lea and Flood 2014), whose
//! stream is fixed by its seed on every machine and device. It draws the new
//! control tokens' noise ([`crate::model::control`]) and the bootstrap's resamples
//! ([`crate::eval::bootstrap`]).

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw from 0..n (the high word of a 64 x 64-bit product, Lemire 2019).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A uniform draw in (0, 1] from 53 random bits: never 0, so its logarithm is
    /// finite.
    pub fn unit_open(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }
}
