//! Build script: provides the PTX of the CUDA kernels (`cuda/*.cu`) to the crate
//! as `EMBEDDED_PTX` in `$OUT_DIR/embedded_ptx.rs`, one entry per (family, target), deflated,
//! and beside it `EMBEDDED_CUBIN`, the `sm_90a` SASS (cubin) of every family, also deflated, so
//! that module load on Hopper needs no JIT (ptxas takes seconds per family), and
//! `KERNEL_FAMILIES`, the stems of `cuda/*.cu` (what both lists must cover).
//!
//! Where the PTX comes from (`NANOSEEK_NVCC` decides; see also `ptx/README.md`):
//! - unset (default): the committed `ptx/` (PTX and cubins) when its `MANIFEST` source
//!   hashes match `cuda/` (no compiler runs, so the normal build stays fast); when `cuda/` has
//!   changed and an nvcc is found (env `NVCC`, `$CUDA_HOME/bin/nvcc`,
//!   `.cuda/nvidia/cu13/bin/nvcc`, `PATH`), every `cuda/*.cu` is compiled (PTX per target
//!   and the sm_90a cubin) into `OUT_DIR` and that is embedded; with no nvcc, the stale
//!   `ptx/` is embedded with a warning.
//! - `1`: always compile with nvcc (an error when none is found).
//! - `0`: always embed the committed `ptx/`.
//!
//! Targets: `sm_90a` (Hopper; loads only on compute capability 9.0) and a portable
//! `sm_80` build for every other device; the runtime picks one from the device's
//! compute capability. `scripts/regen-ptx.sh` regenerates `ptx/` with the pinned
//! nvcc (CUDA 13.0) and `--check` fails when it is stale.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGETS: [&str; 2] = ["sm_90a", "sm_80"];
/// Keep in step with `FLAGS` in scripts/regen-ptx.sh.
const NVCC_FLAGS: [&str; 3] = ["-std=c++17", "-O3", "--ptx"];
/// The targets whose SASS is embedded too, and its flags (keep in step with scripts/regen-ptx.sh).
const CUBIN_TARGETS: [&str; 1] = ["sm_90a"];
const CUBIN_FLAGS: [&str; 3] = ["-std=c++17", "-O3", "-cubin"];

fn main() {
    println!("cargo:rerun-if-changed=ptx");
    println!("cargo:rerun-if-changed=cuda");
    for var in ["NANOSEEK_NVCC", "NVCC", "CUDA_HOME"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mode = std::env::var("NANOSEEK_NVCC").unwrap_or_default();
    let sources = list("cuda", &["cu"]);
    let fresh = committed_ptx_is_fresh();

    let compile = match mode.as_str() {
        "1" => true,
        "0" => false,
        _ => !fresh,
    };
    let mut entries: Vec<(String, String, PathBuf)> = Vec::new(); // (family, target, file)
    let mut cubins: Vec<(String, String, PathBuf)> = Vec::new(); // (family, target, file)
    let mut compiled = false;
    if compile {
        match find_nvcc() {
            Some(nvcc) => {
                let dir = out.join("ptx");
                std::fs::create_dir_all(&dir).expect("create OUT_DIR/ptx");
                for src in &sources {
                    let fam = stem(src);
                    for target in TARGETS {
                        let dst = dir.join(format!("{fam}.{target}.ptx"));
                        run_nvcc(&nvcc, &NVCC_FLAGS, target, src, &dst);
                        entries.push((fam.clone(), target.to_string(), dst));
                    }
                    for target in CUBIN_TARGETS {
                        let dst = dir.join(format!("{fam}.{target}.cubin"));
                        run_nvcc(&nvcc, &CUBIN_FLAGS, target, src, &dst);
                        cubins.push((fam.clone(), target.to_string(), dst));
                    }
                }
                compiled = true;
                if mode != "1" {
                    println!(
                        "cargo:warning=cuda/ changed since ptx/ was generated: compiled the kernels with {} (run scripts/regen-ptx.sh to refresh ptx/)",
                        nvcc.display()
                    );
                }
            }
            None if mode == "1" => panic!("NANOSEEK_NVCC=1 but no nvcc found (NVCC, CUDA_HOME, .cuda/, PATH)"),
            None => println!(
                "cargo:warning=ptx/ is stale against cuda/ and no nvcc was found: embedding the committed PTX (run scripts/install-cuda-toolchain.sh and scripts/regen-ptx.sh)"
            ),
        }
    }
    if !compiled {
        for p in list("ptx", &["ptx"]) {
            // ptx/<family>.<target>.ptx
            let name = stem(&p);
            if let Some((fam, target)) = name.split_once('.') {
                entries.push((fam.to_string(), target.to_string(), p.clone()));
            }
        }
        for p in list("ptx", &["cubin"]) {
            // ptx/<family>.<target>.cubin
            let name = stem(&p);
            if let Some((fam, target)) = name.split_once('.') {
                cubins.push((fam.to_string(), target.to_string(), p.clone()));
            }
        }
    }

    // Embedded deflated (PTX text shrinks about tenfold): the binaries, the test executables and
    // the gpu-check folder stay small. `backend::cuda::embedded_ptx` inflates on first use.
    let mut list = String::from(
        "/// Every kernel family's PTX per target: (family, target such as \"sm_90a\", deflated PTX text).\npub const EMBEDDED_PTX: &[(&str, &str, &[u8])] = &[\n",
    );
    let zdir = out.join("ptx-deflated");
    std::fs::create_dir_all(&zdir).expect("create OUT_DIR/ptx-deflated");
    for (fam, target, path) in &entries {
        let text = std::fs::read(path).expect("read PTX");
        let z = zdir.join(format!("{fam}.{target}.ptx.deflate"));
        std::fs::write(&z, miniz_oxide::deflate::compress_to_vec(&text, 9)).expect("write deflated PTX");
        writeln!(list, "    ({fam:?}, {target:?}, include_bytes!({:?})),", z.display().to_string()).unwrap();
    }
    list.push_str("];\n");
    // Cubins (ELF) deflate about sixfold.
    list.push_str(
        "/// The SASS of every kernel family per target: (family, target such as \"sm_90a\", deflated cubin).\npub const EMBEDDED_CUBIN: &[(&str, &str, &[u8])] = &[\n",
    );
    for (fam, target, path) in &cubins {
        let image = std::fs::read(path).expect("read cubin");
        let z = zdir.join(format!("{fam}.{target}.cubin.deflate"));
        std::fs::write(&z, miniz_oxide::deflate::compress_to_vec(&image, 9)).expect("write deflated cubin");
        writeln!(list, "    ({fam:?}, {target:?}, include_bytes!({:?})),", z.display().to_string()).unwrap();
    }
    list.push_str("];\n");
    list.push_str(
        "/// The kernel families, the stems of `cuda/*.cu` at build time.\npub const KERNEL_FAMILIES: &[&str] = &[",
    );
    for src in &sources {
        write!(list, "{:?}, ", stem(src)).unwrap();
    }
    list.push_str("];\n");
    writeln!(
        list,
        "/// Where `EMBEDDED_PTX` came from: \"nvcc\" (compiled by this build) or \"ptx/\" (committed).\npub const PTX_SOURCE: &str = {:?};",
        if compiled { "nvcc" } else { "ptx/" }
    )
    .unwrap();
    std::fs::write(out.join("embedded_ptx.rs"), list).expect("write embedded_ptx.rs");
}

/// Compiles `src` for `target` with `flags` into `dst`; panics with what failed.
fn run_nvcc(nvcc: &Path, flags: &[&str], target: &str, src: &Path, dst: &Path) {
    let status = Command::new(nvcc)
        .args(flags)
        .arg(format!("-arch={target}"))
        .arg(src)
        .arg("-o")
        .arg(dst)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {} for {target} ({})", src.display(), flags.join(" "));
}

fn stem(p: &Path) -> String {
    p.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Files of `dir` with one of the extensions, sorted.
fn list(dir: &str, exts: &[&str]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| exts.iter().any(|e| x == *e)))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// True when ptx/MANIFEST lists exactly the sources in cuda/ with their current sha256.
fn committed_ptx_is_fresh() -> bool {
    let Ok(manifest) = std::fs::read_to_string("ptx/MANIFEST") else {
        return list("cuda", &["cu"]).is_empty();
    };
    let mut listed: Vec<(String, String)> = manifest
        .lines()
        .filter_map(|l| l.strip_prefix("source "))
        .filter_map(|l| l.split_once(' ').map(|(h, f)| (f.to_string(), h.to_string())))
        .collect();
    listed.sort();
    let mut actual: Vec<(String, String)> = list("cuda", &["cu", "cuh", "h"])
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).expect("read cuda source");
            (format!("cuda/{}", p.file_name().unwrap().to_string_lossy()), hex(&sha256(&bytes)))
        })
        .collect();
    actual.sort();
    listed == actual
}

fn find_nvcc() -> Option<PathBuf> {
    let exe = |p: PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("NVCC") {
        return exe(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("CUDA_HOME").and_then(|h| exe(PathBuf::from(h).join("bin/nvcc"))) {
        return Some(p);
    }
    if let Some(p) = exe(PathBuf::from(".cuda/nvidia/cu13/bin/nvcc")) {
        return Some(std::fs::canonicalize(p).unwrap_or_default());
    }
    std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).find_map(|d| exe(d.join("nvcc"))))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 (FIPS 180-4), enough for hashing a few source files without a dependency.
fn sha256(data: &[u8]) -> [u8; 32] {
    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5, 0xd807aa98,
        0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786,
        0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8,
        0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13,
        0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819,
        0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a,
        0x5b9cca4f, 0x682e6ff3, 0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];
    let mut h: [u32; 8] =
        [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 64];
        for i in 0..16 {
            w[i] = u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap());
        }
        for i in 16..64 {
            let s0 = w[i - 15].rotate_right(7) ^ w[i - 15].rotate_right(18) ^ (w[i - 15] >> 3);
            let s1 = w[i - 2].rotate_right(17) ^ w[i - 2].rotate_right(19) ^ (w[i - 2] >> 10);
            w[i] = w[i - 16].wrapping_add(s0).wrapping_add(w[i - 7]).wrapping_add(s1);
        }
        let mut v = h;
        for i in 0..64 {
            let s1 = v[4].rotate_right(6) ^ v[4].rotate_right(11) ^ v[4].rotate_right(25);
            let ch = (v[4] & v[5]) ^ (!v[4] & v[6]);
            let t1 = v[7].wrapping_add(s1).wrapping_add(ch).wrapping_add(K[i]).wrapping_add(w[i]);
            let s0 = v[0].rotate_right(2) ^ v[0].rotate_right(13) ^ v[0].rotate_right(22);
            let maj = (v[0] & v[1]) ^ (v[0] & v[2]) ^ (v[1] & v[2]);
            let t2 = s0.wrapping_add(maj);
            v = [t1.wrapping_add(t2), v[0], v[1], v[2], v[3].wrapping_add(t1), v[4], v[5], v[6]];
        }
        for (a, b) in h.iter_mut().zip(v) {
            *a = a.wrapping_add(b);
        }
    }
    let mut out = [0u8; 32];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}
