//! The layers stack (issue #17): kernels (`src/backend/cpu`, `src/backend/cuda`), the drop-in
//! kernel API (`src/kernels`), autograd, model, optimizer, programs. Above the kernel layer no
//! module names `backend::cpu` or `backend::cuda`, neither in a `use` line nor as an inline path
//! (`crate::backend::cuda::probe_devices()`): everything above goes through `crate::kernels`
//! (small shared types may come from `crate::backend::{..}` itself).
//!
//! Allowed to name them (the kernel layer, and device selection):
//! - `src/backend/**`: the kernels themselves;
//! - `src/kernels/**`: the kernel API over them;
//! - `src/selftest/**`: the kernels' CUDA-versus-CPU parity harness, which runs each backend's
//!   kernels side by side and is itself part of the kernel layer;
//! - `src/device.rs`: device selection (probing for CUDA devices).
//!
//! Everything else under `src/` and every criterion bench in `benches/` is checked. Comment
//! lines (trimmed text starting with `//`, doc comments included) are ignored: prose may name
//! the backend modules.

use std::fs;
use std::path::{Path, PathBuf};

/// Paths (relative to the crate root, `/`-separated) allowed to name the backend modules:
/// a directory prefix ends in `/`, a file is named whole.
const KERNEL_LAYER: &[&str] = &["src/backend/", "src/kernels/", "src/selftest/", "src/device.rs"];

const FORBIDDEN: &[&str] = &["backend::cpu", "backend::cuda"];

/// Every `.rs` file under `dir`, recursively, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("reading {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn in_kernel_layer(rel: &str) -> bool {
    KERNEL_LAYER.iter().any(|a| if a.ends_with('/') { rel.starts_with(a) } else { rel == *a })
}

/// `file:line: text` for each non-comment line of `text` that names a backend module: a path
/// through `backend::cpu` / `backend::cuda`, a `backend::{..}` group holding `cpu` or `cuda`
/// (on this line or the next ones), or a glob or alias of `backend` (which would let later
/// lines name `cuda::` unseen).
fn violations_in(rel: &str, text: &str) -> Vec<String> {
    let code: Vec<(usize, &str)> =
        text.lines().enumerate().map(|(i, l)| (i + 1, l.trim())).filter(|(_, t)| !t.starts_with("//")).collect();
    let mut found = Vec::new();
    for (at, &(line, t)) in code.iter().enumerate() {
        let direct = FORBIDDEN.iter().any(|f| t.contains(f));
        let glob_or_alias = t.contains("backend::*") || t.contains("backend as ");
        let group = t.contains("backend::{") && group_names_a_backend(&code[at..]);
        if direct || glob_or_alias || group {
            found.push(format!("{rel}:{line}: {t}"));
        }
    }
    found
}

/// Whether the first `backend::{..}` group starting on `lines[0]` (and possibly closing on a
/// later line) names `cpu` or `cuda` as a path segment.
fn group_names_a_backend(lines: &[(usize, &str)]) -> bool {
    let start = lines[0].1.find("backend::{").expect("the caller found it") + "backend::".len();
    let (mut depth, mut group) = (0usize, String::new());
    let rest = std::iter::once(&lines[0].1[start..]).chain(lines[1..].iter().map(|(_, t)| *t));
    'lines: for t in rest {
        for c in t.chars() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        break 'lines;
                    }
                }
                _ => {}
            }
            group.push(c);
        }
        group.push(' ');
    }
    group.split(|c: char| !(c.is_alphanumeric() || c == '_')).any(|w| w == "cpu" || w == "cuda")
}

/// Every violation under `dirs` of the crate root, outside the kernel layer.
fn violations(dirs: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = Vec::new();
    for dir in dirs {
        for path in rust_files(&root.join(dir)) {
            let rel = path.strip_prefix(root).expect("under the crate root");
            let rel = rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/");
            if in_kernel_layer(&rel) {
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {rel}: {e}"));
            found.extend(violations_in(&rel, &text));
        }
    }
    found
}

#[test]
fn only_the_kernel_layer_names_the_backends() {
    let found = violations(&["src", "benches"]);
    assert!(
        found.is_empty(),
        "{} line(s) above the kernel layer name backend::cpu or backend::cuda; go through \
         crate::kernels instead (allowed: {}):\n{}",
        found.len(),
        KERNEL_LAYER.join(", "),
        found.join("\n")
    );
}

/// The checker itself: inline paths count, comments and the allowed paths do not.
#[test]
fn the_check_sees_inline_paths_and_skips_comments() {
    let text = "use crate::kernels;\n\
                // uses backend::cpu::gemm\n\
                /// see `backend::cuda`\n\
                let n = crate::backend::cuda::probe_devices();\n\
                use crate::backend::{AttnDims, RouterConfig};\n\
                use crate::backend::cpu::moe::route;\n\
                use crate::backend::{\n\
                    cuda::gemm,\n\
                    AttnDims,\n\
                };\n\
                use nanoseek::backend::*;\n";
    assert_eq!(
        violations_in("src/x.rs", text),
        [
            "src/x.rs:4: let n = crate::backend::cuda::probe_devices();",
            "src/x.rs:6: use crate::backend::cpu::moe::route;",
            "src/x.rs:7: use crate::backend::{",
            "src/x.rs:11: use nanoseek::backend::*;",
        ]
    );
    assert!(in_kernel_layer("src/kernels/cuda.rs") && in_kernel_layer("src/device.rs"));
    assert!(in_kernel_layer("src/selftest/mod.rs") && in_kernel_layer("src/backend/cuda/gemm.rs"));
    assert!(!in_kernel_layer("src/devices.rs") && !in_kernel_layer("src/nn/model.rs"));
    assert!(!in_kernel_layer("benches/gemm.rs") && !in_kernel_layer("src/kernels.rs"));
}
