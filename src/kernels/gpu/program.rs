//! The Metal programs: Apple's compiler takes one source string, so each op's MSL source is its
//! files (`gpu/common.h`, `gpu/softmax.h` where used, the op's kernels `<op>.h`, its entry points
//! `<op>.metal`) concatenated in include order, their `#pragma once` lines and the local
//! `#include "…"` of listed files dropped, the objectives' headers spliced in where
//! `objectives.h` includes them. The Metal host code (`metal.rs`) compiles that string; the simulation
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
    /// The sources of local includes that are not among `files` (the objectives' headers that
    /// the generated `objectives.h` includes), spliced in at their `#include` line.
    pub(crate) includes: Option<fn(&str) -> Option<&'static str>>,
}

impl Program {
    /// The program as one source string.
    pub(crate) fn source(&self) -> String {
        let mut source = String::new();
        for file in self.files {
            self.append(&mut source, file);
        }
        source
    }

    fn append(&self, source: &mut String, file: &str) {
        for line in file.lines() {
            let trimmed = line.trim_start();
            if let Some(path) = trimmed.strip_prefix("#include \"") {
                let path = path.trim_end().trim_end_matches('"');
                if let Some(spliced) = self.includes.and_then(|find| find(path)) {
                    self.append(source, spliced);
                }
                continue;
            }
            if trimmed.starts_with("#pragma once") {
                continue;
            }
            source.push_str(line);
            source.push('\n');
        }
    }
}
