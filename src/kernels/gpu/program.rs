//! The Metal programs: Apple's compiler takes one source string, so each op's MSL source is its
//! files (`gpu/common.h`, `gpu/softmax.h` where used, the op's kernels `<op>.h`, its entry points
//! `<op>.metal`) concatenated in include order, their local `#include "…"` and `#pragma once`
//! lines dropped. The Metal host code (`metal.rs`) compiles that string; the simulation
//! (`sim.rs`) compiles the very same string with g++, so a missing or misordered file fails the
//! tests.

/// The shared device code, first in every program.
pub(crate) const COMMON: &str = include_str!("common.h");
/// The online softmax (after [`COMMON`]).
pub(crate) const SOFTMAX: &str = include_str!("softmax.h");

/// One op's Metal program: the op's folder name and its files in include order.
pub(crate) struct Program {
    pub(crate) op: &'static str,
    pub(crate) files: &'static [&'static str],
}

impl Program {
    /// The program as one source string.
    pub(crate) fn source(&self) -> String {
        let mut source = String::new();
        for line in self.files.iter().flat_map(|f| f.lines()) {
            let trimmed = line.trim_start();
            if trimmed.starts_with("#include \"") || trimmed.starts_with("#pragma once") {
                continue;
            }
            source.push_str(line);
            source.push('\n');
        }
        source
    }
}
