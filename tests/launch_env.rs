//! `nanoseek train` under a launcher's environment (torchrun, mpirun, srun) without the launcher:
//! an inconsistent environment is refused naming the variable, and several ranks on the CPU
//! without the `mpi` feature name the missing feature; nothing is written either way. (The
//! data-parallel runs themselves are scripts/check-data-parallel.sh, under mpirun.)

use std::path::Path;
use std::process::{Command, Output};

fn train(dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nanoseek"));
    cmd.args(["train", "--device", "cpu", "--n-layer", "1", "--n-embd", "64", "--n-head", "2", "--max-seq-len", "32"])
        .args(["--device-batch-size", "1", "--total-batch-size", "64", "--num-iterations", "1", "--quiet"])
        .args(["--sample-tokens", "0", "--run", "r", "--runs-dir"])
        .arg(dir);
    for k in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMPI_COMM_WORLD_RANK"] {
        cmd.env_remove(k);
    }
    for k in ["OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"] {
        cmd.env_remove(k);
    }
    cmd.envs(env.iter().copied()).output().expect("run nanoseek")
}

fn refused(env: &[(&str, &str)], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), env);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{env:?} was accepted");
    assert!(err.contains(needle), "{env:?}: expected '{needle}' in: {err}");
    assert!(!dir.path().join("r").exists(), "{env:?}: a refused launch wrote its run directory");
}

#[test]
fn inconsistent_launch_environments_are_refused_by_name() {
    refused(&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK=2 must be below WORLD_SIZE=2");
    refused(&[("RANK", "zero"), ("WORLD_SIZE", "2")], "RANK=\"zero\" is not a non-negative integer");
    refused(&[("WORLD_SIZE", "2")], "RANK is not set");
    refused(&[("OMPI_COMM_WORLD_RANK", "3"), ("OMPI_COMM_WORLD_SIZE", "2")], "OMPI_COMM_WORLD_RANK=3");
    refused(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "0")], "SLURM_NTASKS=0");
    refused(
        &[("RANK", "1"), ("WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")],
        "conflict with OMPI_COMM_WORLD_RANK",
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn several_cpu_ranks_without_mpi_name_the_feature() {
    refused(&[("RANK", "0"), ("WORLD_SIZE", "2")], "--features mpi");
}

#[test]
fn a_launch_of_one_rank_trains_as_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let out = train(dir.path(), &[("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let metrics = std::fs::read_to_string(dir.path().join("r/metrics.jsonl")).unwrap();
    assert!(!metrics.contains("comm_s"), "one rank logs no communication time: {metrics}");
}
