//! Contiguous row-major tensors. Compute is f32; f16 and bf16 are storage formats with conversions.
//!
//! `Storage` is the op boundary: every op matches on it, so a CUDA variant plugs in beside `Cpu*`
//! without touching callers (style.md: organise by op, not by backend).
pub mod rng;

use crate::error::{Error, Result};
use half::{bf16, f16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub enum Storage {
    Cpu(Vec<f32>),
    CpuF16(Vec<f16>),
    CpuBF16(Vec<bf16>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(vec![0.0; numel(shape)]),
        }
    }

    pub fn full(shape: &[usize], value: f32) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(vec![value; numel(shape)]),
        }
    }

    pub fn scalar(value: f32) -> Tensor {
        Tensor {
            shape: vec![],
            storage: Storage::Cpu(vec![value]),
        }
    }

    /// Wraps `data`; errors when its length is not the product of `shape`.
    pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_vec",
                format!(
                    "shape {:?} needs {} values, got {}",
                    shape,
                    numel(shape),
                    data.len()
                ),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(data),
        })
    }

    pub fn from_f16(shape: &[usize], data: Vec<f16>) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_f16",
                format!("shape {:?} vs {} values", shape, data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::CpuF16(data),
        })
    }

    pub fn from_bf16(shape: &[usize], data: Vec<bf16>) -> Result<Tensor> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_bf16",
                format!("shape {:?} vs {} values", shape, data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::CpuBF16(data),
        })
    }

    pub fn randn(shape: &[usize], std: f64, rng: &mut rng::Rng) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(rng.normal_vec(numel(shape), std)),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(_) => DType::F32,
            Storage::CpuF16(_) => DType::F16,
            Storage::CpuBF16(_) => DType::BF16,
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The f32 values on the host; `op` names the caller in the error for any other storage.
    pub fn f32s(&self, op: &'static str) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs f32 host storage, got {:?}", self.dtype()),
            }),
        }
    }

    pub fn f32s_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        let dtype = self.dtype();
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs f32 host storage, got {dtype:?}"),
            }),
        }
    }

    /// Host f32 values, converting from f16/bf16 storage where needed.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Cpu(v) => v.clone(),
            Storage::CpuF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::CpuBF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }

    /// Converts storage to `dtype` (round to nearest even for the 16-bit formats).
    pub fn to_dtype(&self, dtype: DType) -> Tensor {
        let storage = match dtype {
            DType::F32 => Storage::Cpu(self.to_f32_vec()),
            DType::F16 => Storage::CpuF16(
                self.to_f32_vec()
                    .iter()
                    .map(|&x| f16::from_f32(x))
                    .collect(),
            ),
            DType::BF16 => Storage::CpuBF16(
                self.to_f32_vec()
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect(),
            ),
        };
        Tensor {
            shape: self.shape.clone(),
            storage,
        }
    }

    /// The same values under a new shape with the same element count.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return Err(Error::shape(
                "reshape",
                format!("{:?} -> {:?} changes the element count", self.shape, shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Consumes the tensor and returns its host f32 buffer (for recycling in a buffer pool).
    pub fn into_f32_vec(self) -> Option<Vec<f32>> {
        match self.storage {
            Storage::Cpu(v) => Some(v),
            _ => None,
        }
    }

    /// Size of the last dimension and the number of rows before it (1 for a scalar).
    pub fn rows_cols(&self) -> (usize, usize) {
        let c = self.shape.last().copied().unwrap_or(1);
        (if c == 0 { 0 } else { self.numel() / c }, c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_storage_round_trips_and_rounds_to_nearest_even() {
        let mut r = rng::Rng::new(9);
        let t = Tensor::randn(&[3, 7], 2.0, &mut r);
        for dtype in [DType::F16, DType::BF16] {
            let h = t.to_dtype(dtype);
            assert_eq!(h.dtype(), dtype);
            assert_eq!(h.shape(), &[3, 7]);
            // Half formats keep 11 (f16) or 8 (bf16) significant bits: relative error at most 2^-11 or 2^-8.
            let tol = if dtype == DType::F16 { 1.0 / 2048.0 } else { 1.0 / 256.0 };
            for (a, b) in t.to_f32_vec().iter().zip(h.to_f32_vec()) {
                assert!((a - b).abs() <= tol * a.abs(), "{dtype:?}: {a} -> {b}");
            }
            assert!(h.f32s("test_op").unwrap_err().to_string().contains("test_op"));
        }
        // 1 + 2^-8 lies halfway between two bf16 values; ties go to the even mantissa (1.0).
        let tie = Tensor::from_vec(&[1], vec![1.0 + 1.0 / 256.0]).unwrap().to_dtype(DType::BF16);
        assert_eq!(tie.to_f32_vec(), vec![1.0]);
    }

    #[test]
    fn shape_errors_name_the_op_and_shapes() {
        let e = Tensor::from_vec(&[2, 3], vec![0.0; 5]).unwrap_err().to_string();
        assert!(e.contains("from_vec") && e.contains("[2, 3]") && e.contains('5'), "{e}");
        let e = Tensor::zeros(&[2, 3]).reshape(&[4]).unwrap_err().to_string();
        assert!(e.contains("reshape") && e.contains("[2, 3]") && e.contains("[4]"), "{e}");
        assert!(Tensor::from_f16(&[2], vec![half::f16::ZERO; 3]).is_err());
    }
}
