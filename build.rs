//! Build script. Embeds the committed PTX in `ptx/` (generated from `cuda/*.cu`
//! with the pinned nvcc) so that a plain `cargo build` needs nothing CUDA.
//!
//! Today `cuda/` holds no kernels yet, so the embedded list is empty; compiling
//! `cuda/*.cu` with nvcc when it is present, the PTX freshness check and the
//! bindgen ABI bindings arrive with the CUDA backend.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=ptx");
    println!("cargo:rerun-if-changed=cuda");
    let mut list = String::from("/// (kernel family, PTX text) for every committed `ptx/*.ptx`.\npub const EMBEDDED_PTX: &[(&str, &str)] = &[\n");
    let mut files: Vec<_> = std::fs::read_dir("ptx")
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "ptx")).collect())
        .unwrap_or_default();
    files.sort();
    for p in files {
        let family = p.file_stem().unwrap().to_string_lossy().into_owned();
        let abs = std::fs::canonicalize(&p).expect("ptx path");
        writeln!(list, "    ({family:?}, include_str!({:?})),", abs.display().to_string()).unwrap();
    }
    list.push_str("];\n");
    let out = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(Path::new(&out).join("embedded_ptx.rs"), list).expect("write embedded_ptx.rs");
}
