//! The verifiable toy task: reverse a string of digits.
//!
//! Prompt `[BOS, d_1 … d_k, SEP]`, completion `k` tokens, reward = fraction of positions equal to
//! the reversed digits (1.0 is an exact match, every correct position earns partial credit). A
//! policy that picks uniformly among the 12 tokens scores 1/12 ≈ 0.083 on average; one that
//! picks uniformly among the 10 digits scores 0.1.

/// Digits are tokens 0..=9.
pub const SEP: u32 = 10;
pub const BOS: u32 = 11;
pub const VOCAB: usize = 12;

/// SplitMix64: a small, seedable, reproducible generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }
    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }
    /// Samples an index from unnormalised log-weights `logits / temperature`.
    pub fn categorical(&mut self, logits: &[f32], temperature: f64) -> u32 {
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let weights: Vec<f64> = logits
            .iter()
            .map(|&l| ((l as f64 - max) / temperature).exp())
            .collect();
        let mut u = self.uniform() * weights.iter().sum::<f64>();
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                return i as u32;
            }
            u -= w;
        }
        (weights.len() - 1) as u32
    }
}

/// A prompt's tokens, `k + 2` long.
pub fn prompt(digits: &[u32]) -> Vec<u32> {
    let mut tokens = vec![BOS];
    tokens.extend_from_slice(digits);
    tokens.push(SEP);
    tokens
}

/// Fraction of completion positions that match the reversed digits.
pub fn reward(digits: &[u32], completion: &[u32]) -> f64 {
    let correct = digits
        .iter()
        .rev()
        .zip(completion)
        .filter(|(want, got)| want == got)
        .count();
    correct as f64 / digits.len() as f64
}

pub fn random_digits(rng: &mut Rng, k: usize) -> Vec<u32> {
    (0..k).map(|_| rng.below(10) as u32).collect()
}
