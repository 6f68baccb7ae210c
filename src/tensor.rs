//! A small dense tensor: a shape and f32 values in row-major order, on the CPU.
//!
//! The CPU backend is the f32 reference. bf16 exists only as a storage format
//! (`to_bf16`/`from_bf16`, via `half`) for checkpoints and, later, device copies.

use crate::rng::Rng;
use half::bf16;

#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), data: vec![0.0; shape.iter().product()] }
    }

    /// Panics if `data.len()` does not match the shape (a programming error, not bad input).
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Tensor {
        let n: usize = shape.iter().product();
        assert_eq!(n, data.len(), "Tensor::from_vec: shape {shape:?} holds {n} values, got {}", data.len());
        Tensor { shape: shape.to_vec(), data }
    }

    /// Normal(0, std²) entries drawn from `rng`.
    pub fn randn(shape: &[usize], std: f32, rng: &mut Rng) -> Tensor {
        let n = shape.iter().product();
        let data = (0..n).map(|_| (rng.normal() as f32) * std).collect();
        Tensor { shape: shape.to_vec(), data }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Rows and columns of a 2-D tensor.
    pub fn dims2(&self) -> (usize, usize) {
        assert_eq!(self.shape.len(), 2, "expected a 2-D tensor, got shape {:?}", self.shape);
        (self.shape[0], self.shape[1])
    }

    pub fn to_bf16(&self) -> Vec<bf16> {
        self.data.iter().map(|&x| bf16::from_f32(x)).collect()
    }

    pub fn from_bf16(shape: &[usize], values: &[bf16]) -> Tensor {
        Tensor::from_vec(shape, values.iter().map(|x| x.to_f32()).collect())
    }

    /// Little-endian bytes of the f32 values (the safetensors F32 layout).
    pub fn to_le_bytes(&self) -> Vec<u8> {
        self.data.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    pub fn from_le_bytes(shape: &[usize], bytes: &[u8]) -> Tensor {
        let data = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Tensor::from_vec(shape, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_and_bytes_round_trip() {
        let t = Tensor::from_vec(&[2, 2], vec![1.0, -2.5, 0.125, 3.0]);
        assert_eq!(Tensor::from_bf16(&[2, 2], &t.to_bf16()), t);
        assert_eq!(Tensor::from_le_bytes(&[2, 2], &t.to_le_bytes()), t);
    }
}
