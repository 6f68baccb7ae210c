//! `--device auto|cpu|cuda[:N]`: which backend a command runs on.

use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// Resolves a `--device` string. `auto` never fails: it falls back to the
    /// CPU and prints one line saying why. An explicit `cuda` that cannot be
    /// honoured is an error. (`nanoseek train` sends a model outside the CUDA kernels' shape
    /// rules on `auto` back to the CPU, see [`Device::for_model`].)
    pub fn resolve(spec: &str) -> Result<Device> {
        let spec = spec.trim().to_ascii_lowercase();
        match spec.as_str() {
            "cpu" => Ok(Device::Cpu),
            "auto" => {
                match crate::backend::cuda::probe_devices() {
                    Err(why) => eprintln!("device: {why}; using the CPU"),
                    Ok(_) => return Ok(Device::Cuda(0)),
                }
                Ok(Device::Cpu)
            }
            s if s == "cuda" || s.starts_with("cuda:") => {
                let index = match s.strip_prefix("cuda:") {
                    None => 0,
                    Some(i) => {
                        i.parse::<usize>().map_err(|_| anyhow::anyhow!("bad device '{spec}': expected cuda:N"))?
                    }
                };
                let n =
                    crate::backend::cuda::probe_devices().map_err(|why| anyhow::anyhow!("--device {spec}: {why}"))?;
                if index >= n {
                    bail!("--device {spec}: only {n} CUDA device(s) present");
                }
                Ok(Device::Cuda(index))
            }
            _ => bail!("unknown device '{spec}': expected auto, cpu, cuda or cuda:N"),
        }
    }

    /// `--device auto` for training `model`: every layer kind trains on CUDA, but a model outside
    /// the kernels' shape rules (e.g. head_dim 32) falls back to the
    /// CPU with a one-line notice. An explicit `cuda` is left as is (training then fails, saying
    /// which rule).
    pub fn for_model(self, spec: &str, model: &crate::nn::ModelConfig) -> Device {
        if self != Device::Cpu && spec.trim().eq_ignore_ascii_case("auto") {
            if let Err(why) = crate::backend::check_cuda_shapes(model) {
                eprintln!("device: {self} found, but {why}; using the CPU");
                return Device::Cpu;
            }
        }
        self
    }
}

/// The CUDA backend of device `ordinal` for a model (its kernels' shape rules checked first).
pub fn cuda_ops(ordinal: usize, config: &crate::nn::ModelConfig) -> anyhow::Result<crate::backend::CudaOps> {
    crate::backend::check_cuda_shapes(config)?;
    let be = crate::backend::cuda::CudaBackend::new(ordinal)?;
    crate::backend::CudaOps::new(be, config)
}
