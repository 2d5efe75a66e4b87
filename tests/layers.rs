//! The floor plan, checked: every module of `src/` belongs to one layer, and no module imports
//! from a layer above its own or takes part in an import circle.
//!
//! ```text
//! math        error, real, piecewise, gate, kl, aggregation, entropy, softmax, checks,
//!             vectorize, pool, order_statistics
//!   ↑
//! objectives  losses/{objective, trust_region, each objective's file, ratio, metrics, inputs,
//!             config, bypass, checks}, rollout_correction/config
//!   ↑
//! kernels     kernels/** (traversal, memory, devices)
//!   ↑
//! api         the crate root, losses (its front), losses/{policy_loss, presets,
//!             gradient_weights}, logprobs, linear_logprobs, rollout_correction, advantages
//! ```
//!
//! The edges are read from the sources: every `crate::…` and `super::…` path (in `use` lines,
//! `use` trees and expressions), resolved to the longest module it names. A module's own
//! descendants are not edges (a parent declares and re-exports its children).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const LAYERS: [&str; 4] = ["math", "objectives", "kernels", "api"];

/// Module-path prefixes and their layers (the longest prefix wins).
const TABLE: &[(&str, usize)] = &[
    ("error", 0),
    ("real", 0),
    ("piecewise", 0),
    ("gate", 0),
    ("kl", 0),
    ("aggregation", 0),
    ("entropy", 0),
    ("softmax", 0),
    ("checks", 0),
    ("vectorize", 0),
    ("pool", 0),
    ("order_statistics", 0),
    ("lm_head", 1),
    ("losses::objective", 1),
    ("losses::trust_region", 1),
    ("losses::soft_gate", 1),
    ("losses::unclipped", 1),
    ("losses::policy_gradient", 1),
    ("losses::clip", 1),
    ("losses::cispo", 1),
    ("losses::dppo", 1),
    ("losses::dro", 1),
    ("losses::gmpo", 1),
    ("losses::kl_cov", 1),
    ("losses::masks", 1),
    ("losses::gate_family", 1),
    ("losses::topr", 1),
    ("losses::clip_cov", 1),
    ("losses::vespo", 1),
    ("losses::ratio", 1),
    ("losses::chain", 1),
    ("losses::metrics", 1),
    ("losses::inputs", 1),
    ("losses::config", 1),
    ("losses::bypass", 1),
    ("losses::checks", 1),
    ("rollout_correction::config", 1),
    ("kernels", 2),
    ("", 3),
];

fn layer(module: &str) -> usize {
    TABLE
        .iter()
        .filter(|(prefix, _)| {
            prefix.is_empty() || module == *prefix || module.starts_with(&format!("{prefix}::"))
        })
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|(_, l)| *l)
        .unwrap()
}

/// `src/a/b.rs` → `a::b`, `src/a/mod.rs` → `a`, `src/lib.rs` → ``.
fn module_of(rel: &Path) -> String {
    let mut parts: Vec<String> = rel
        .with_extension("")
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source without comments, string literals and its unit tests (a `#[cfg(test)]` module
/// at the end of the file: test code is not the product's floor plan).
fn code(source: &str) -> String {
    let mut out = String::new();
    let lines: Vec<&str> = source.lines().collect();
    for (n, line) in lines.iter().enumerate() {
        let next = lines.get(n + 1).map_or("", |l| l.trim_start());
        if line.trim() == "#[cfg(test)]" && next.starts_with("mod ") && next.ends_with('{') {
            break;
        }
        let mut in_string = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_string && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && prev != '\'' {
                in_string = !in_string;
            } else if !in_string {
                kept.push(c);
            }
            prev = c;
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

fn ident_at(s: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < s.len() && (s[i].is_ascii_alphanumeric() || s[i] == b'_') {
        i += 1;
    }
    (String::from_utf8_lossy(&s[start..i]).into_owned(), i)
}

/// The paths of a `use` tree or an expression path starting at `i` (after `crate::` or
/// `super::`), each as its segments, appended to `base`.
fn paths_at(s: &[u8], mut i: usize, base: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let mut path = base;
    loop {
        while i < s.len() && s[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < s.len() && s[i] == b'{' {
            i += 1;
            loop {
                while i < s.len() && (s[i].is_ascii_whitespace() || s[i] == b',') {
                    i += 1;
                }
                if i >= s.len() || s[i] == b'}' {
                    return i + 1;
                }
                i = paths_at(s, i, path.clone(), out);
            }
        }
        let (ident, next) = ident_at(s, i);
        if ident.is_empty() {
            out.push(path);
            return i;
        }
        path.push(ident);
        i = next;
        if s.get(i..i + 2) == Some(b"::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The modules a file imports.
fn imports(module: &str, source: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let code = code(source);
    let s = code.as_bytes();
    let mut paths = Vec::new();
    let here: Vec<String> = if module.is_empty() {
        vec![]
    } else {
        module.split("::").map(String::from).collect()
    };
    let mut i = 0;
    while i < s.len() {
        let boundary = i == 0 || !(s[i - 1].is_ascii_alphanumeric() || s[i - 1] == b'_');
        if boundary && s[i..].starts_with(b"crate::") {
            i = paths_at(s, i + 7, vec![], &mut paths);
        } else if boundary && s[i..].starts_with(b"super::") {
            // `super` of a file module `a::b` is `a` (a `mod.rs` is its folder's module, whose
            // `super` is the folder's parent: the same arithmetic on the module path).
            let mut base = here.clone();
            let mut j = i;
            while s[j..].starts_with(b"super::") {
                base.pop();
                j += 7;
            }
            i = paths_at(s, j, base, &mut paths);
        } else {
            i += 1;
        }
    }
    paths
        .into_iter()
        .filter_map(|path| {
            (0..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| modules.contains(m))
        })
        .filter(|target| {
            let descendant =
                module.is_empty() || target.starts_with(&format!("{module}::")) || target == module;
            !descendant
        })
        .collect()
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeMap<String, std::path::PathBuf> = files
        .into_iter()
        .map(|f| (module_of(f.strip_prefix(&src).unwrap()), f))
        .collect();
    let names: BTreeSet<String> = modules.keys().cloned().collect();
    modules
        .iter()
        .map(|(m, f)| {
            let source = std::fs::read_to_string(f).unwrap();
            (m.clone(), imports(m, &source, &names))
        })
        .collect()
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let mut bad = Vec::new();
    for (from, targets) in graph() {
        for to in targets {
            if layer(&to) > layer(&from) {
                bad.push(format!(
                    "{from} ({}) imports {to} ({})",
                    LAYERS[layer(&from)],
                    LAYERS[layer(&to)]
                ));
            }
        }
    }
    assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
}

#[test]
fn no_import_circle() {
    let graph = graph();
    // Depth-first search; a back edge closes a circle.
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
        circles: &mut Vec<String>,
    ) {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                0 => visit(next, graph, state, stack, circles),
                1 => {
                    let start = stack.iter().position(|n| n == next).unwrap();
                    let mut circle = stack[start..].to_vec();
                    circle.push(next.clone());
                    circles.push(circle.join(" → "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
    }
    let mut state = BTreeMap::new();
    let mut circles = Vec::new();
    for node in graph.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            visit(node, &graph, &mut state, &mut Vec::new(), &mut circles);
        }
    }
    assert!(
        circles.is_empty(),
        "import circles:\n{}",
        circles.join("\n")
    );
}

/// The reader itself: a `use` tree, `super` and an expression path.
#[test]
fn the_reader_finds_every_kind_of_path() {
    let modules: BTreeSet<String> = ["a", "a::b", "a::c", "d", "e::f", "e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let source = "use crate::{a::{b::X, c}, d};\n// crate::e::f in a comment\nfn g() { super::f::h(); let s = \"crate::e\"; }\n#[cfg(test)]\nmod tests {\n    use crate::e;\n}";
    let found = imports("e::g", source, &modules);
    let want: BTreeSet<String> = ["a::b", "a::c", "d", "e::f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(found, want);
    assert_eq!(layer("losses::cispo"), 1);
    assert_eq!(layer("losses::policy_loss"), 3);
    assert_eq!(layer("kernels::policy_loss::cpu"), 2);
    assert_eq!(layer("gate"), 0);
}
