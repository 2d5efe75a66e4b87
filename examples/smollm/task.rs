//! The task: two-number addition in one user turn, rewarded by the answer the completion states.
//!
//! Question: `What is {a} + {b}? Reply with only the number.` (in the chat template). The answer
//! ([`stated_answer`]) is the first integer after the last `=` of the completion when it has one
//! (`43 + 20 = 63`), else its last integer (`The sum is 63.`); the reward is 1 when it equals
//! `a + b`, else 0 (no format bonus). Operands are drawn from `[lo, hi)`; a fixed held-out set of
//! pairs (the same for every seed) is never trained on.

use crate::digits_task::Rng;

/// One problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Problem {
    pub a: u32,
    pub b: u32,
}

impl Problem {
    pub fn question(&self) -> String {
        format!(
            "What is {} + {}? Reply with only the number.",
            self.a, self.b
        )
    }

    /// 1 when the completion states `a + b`, else 0.
    pub fn reward(&self, completion: &str) -> f64 {
        (stated_answer(completion) == Some(self.a as i64 + self.b as i64)) as u8 as f64
    }
}

/// The integers of `text` (an optional `-` right before the digits), in order.
fn integers(text: &str) -> Vec<i64> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            let negative = start > 0 && bytes[start - 1] == b'-';
            // Longer than i64: not an answer to this task.
            if let Ok(v) = text[start..i].parse::<i64>() {
                out.push(if negative { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The answer a completion states: the first integer after its last `=`, else its last integer.
pub fn stated_answer(completion: &str) -> Option<i64> {
    match completion.rfind('=') {
        Some(at) => integers(&completion[at + 1..]).first().copied(),
        None => integers(completion).last().copied(),
    }
}

/// The problems with both operands in `[lo, hi)`, split into a held-out set of `held_out` pairs
/// (chosen by a fixed seed, whatever the run's) and the rest for training.
pub fn split(lo: u32, hi: u32, held_out: usize) -> (Vec<Problem>, Vec<Problem>) {
    let mut all: Vec<Problem> = (lo..hi)
        .flat_map(|a| (lo..hi).map(move |b| Problem { a, b }))
        .collect();
    let mut rng = Rng::new(0x5EED_4E1D);
    for i in (1..all.len()).rev() {
        all.swap(i, rng.below(i + 1));
    }
    let train = all.split_off(held_out.min(all.len()));
    (all, train)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stated_answers() {
        assert_eq!(stated_answer("63"), Some(63));
        assert_eq!(stated_answer(" 63<|im_end|>"), Some(63));
        assert_eq!(stated_answer("43 + 20 = 63. So the answer is 63"), Some(63));
        assert_eq!(stated_answer("43 + 20 = 63, then 7"), Some(63));
        assert_eq!(stated_answer("To add 43 and 20, we"), Some(20));
        assert_eq!(stated_answer("The sum is -3."), Some(-3));
        assert_eq!(stated_answer("x ="), None);
        assert_eq!(stated_answer("no number"), None);
        assert_eq!(stated_answer("99999999999999999999999 7"), Some(7));
        let p = Problem { a: 43, b: 20 };
        assert_eq!(p.reward("43 + 20 = 63"), 1.0);
        assert_eq!(p.reward("64"), 0.0);
    }

    #[test]
    fn held_out_is_disjoint_and_fixed() {
        let (held, train) = split(10, 50, 200);
        assert_eq!(held.len(), 200);
        assert_eq!(train.len(), 40 * 40 - 200);
        let set: std::collections::HashSet<_> = held.iter().collect();
        assert!(train.iter().all(|p| !set.contains(p)));
        assert_eq!(split(10, 50, 200).0, held);
    }
}
