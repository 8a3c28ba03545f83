//! Contiguous row-major tensors. Compute is f32; f16 and bf16 are storage formats with conversions.
//!
//! `Storage` is the op boundary: every op matches on it, so the CUDA variant (the `cuda` feature) sits beside
//! `Cpu*` without touching callers (style.md: organise by op, not by backend). An op runs where its inputs are
//! (`gpu::device_of`); `to_device` and `to_host` move values between the two.
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
    /// f32 values in GPU memory, from the device's caching allocator.
    #[cfg(feature = "cuda")]
    Cuda(crate::gpu::GpuBuf),
    /// bf16 values in GPU memory: the bf16 mode's activations that only GEMMs and bf16 kernels read (the MLP's
    /// gate, up and SwiGLU output, as torch.autocast keeps them) and their gradients. Shared, never copied, by
    /// the ops that take them as GEMM operands; writable only while unshared.
    #[cfg(feature = "cuda")]
    CudaBf16(std::sync::Arc<crate::gpu::Bf16Buf>),
}

#[derive(Clone, Debug)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// An error naming `op` unless `len` values fill `shape`.
#[cfg(feature = "cuda")]
fn check_len(op: &'static str, shape: &[usize], len: usize) -> Result<()> {
    match len == numel(shape) {
        true => Ok(()),
        false => Err(Error::shape(
            op,
            format!("shape {shape:?} needs {} values, got {len}", numel(shape)),
        )),
    }
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
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => DType::F32,
            #[cfg(feature = "cuda")]
            Storage::CudaBf16(_) => DType::BF16,
        }
    }

    /// Whether the values live on a GPU (always false without the `cuda` feature).
    pub fn is_cuda(&self) -> bool {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) | Storage::CudaBf16(_) => true,
            _ => false,
        }
    }

    /// Where the values live: `host` or `cuda:N`.
    pub fn device_name(&self) -> String {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => format!("cuda:{}", b.ctx().ordinal()),
            #[cfg(feature = "cuda")]
            Storage::CudaBf16(b) => format!("cuda:{}", b.ctx().ordinal()),
            _ => "host".into(),
        }
    }

    /// The dtype and device, for error messages (`F32 on cuda:0`).
    fn storage_name(&self) -> String {
        format!("{:?} on {}", self.dtype(), self.device_name())
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
                msg: format!("needs f32 host storage, got {}", self.storage_name()),
            }),
        }
    }

    pub fn f32s_mut(&mut self, op: &'static str) -> Result<&mut [f32]> {
        let name = self.storage_name();
        match &mut self.storage {
            Storage::Cpu(v) => Ok(v),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs f32 host storage, got {name}"),
            }),
        }
    }

    /// Host f32 values, converting from f16/bf16 storage where needed. Device values are copied to the host;
    /// that copy panics only if the CUDA context is broken (use [`Tensor::to_host`] to get the error instead).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.storage {
            Storage::Cpu(v) => v.clone(),
            Storage::CpuF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            Storage::CpuBF16(v) => v.iter().map(|x| x.to_f32()).collect(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.to_vec().unwrap_or_else(|e| panic!("to_f32_vec: {e}")),
            #[cfg(feature = "cuda")]
            Storage::CudaBf16(b) => b.to_f32_vec().unwrap_or_else(|e| panic!("to_f32_vec: {e}")),
        }
    }

    /// An f32 host copy (a device tensor is downloaded, 16-bit host storage widened).
    pub fn to_host(&self) -> Result<Tensor> {
        let data = match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => b.to_vec()?,
            #[cfg(feature = "cuda")]
            Storage::CudaBf16(b) => b.to_f32_vec()?,
            _ => self.to_f32_vec(),
        };
        Tensor::from_vec(&self.shape, data)
    }

    /// An f32 copy on the GPU of `ctx` (16-bit storage is widened first).
    #[cfg(feature = "cuda")]
    pub fn to_device(&self, ctx: &std::sync::Arc<crate::gpu::GpuContext>) -> Result<Tensor> {
        let buf = match &self.storage {
            Storage::Cpu(v) => ctx.upload(v)?,
            Storage::Cuda(b) if std::sync::Arc::ptr_eq(b.ctx(), ctx) => b.try_clone()?,
            Storage::Cuda(b) => ctx.upload(&b.to_vec()?)?,
            Storage::CudaBf16(b) => ctx.upload(&b.to_f32_vec()?)?,
            _ => ctx.upload(&self.to_f32_vec())?,
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage: Storage::Cuda(buf),
        })
    }

    /// Wraps a device buffer; errors when its length is not the product of `shape`.
    #[cfg(feature = "cuda")]
    pub fn from_gpu(shape: &[usize], buf: crate::gpu::GpuBuf) -> Result<Tensor> {
        check_len("Tensor::from_gpu", shape, buf.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cuda(buf),
        })
    }

    /// Wraps a bf16 device buffer; errors when its length is not the product of `shape`.
    #[cfg(feature = "cuda")]
    pub fn from_gpu_bf16(shape: &[usize], buf: crate::gpu::Bf16Buf) -> Result<Tensor> {
        check_len("Tensor::from_gpu_bf16", shape, buf.len())?;
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: Storage::CudaBf16(std::sync::Arc::new(buf)),
        })
    }

    /// The bf16 device buffer, shared; `op` names the caller in the error for any other storage.
    #[cfg(feature = "cuda")]
    pub fn gpu_bf16(&self, op: &'static str) -> Result<&std::sync::Arc<crate::gpu::Bf16Buf>> {
        match &self.storage {
            Storage::CudaBf16(b) => Ok(b),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs bf16 GPU storage, got {}", self.storage_name()),
            }),
        }
    }

    /// The bf16 device buffer to write; an error when another tensor shares it.
    #[cfg(feature = "cuda")]
    pub fn gpu_bf16_mut(&mut self, op: &'static str) -> Result<&mut crate::gpu::Bf16Buf> {
        let name = self.storage_name();
        match &mut self.storage {
            Storage::CudaBf16(b) => std::sync::Arc::get_mut(b).ok_or_else(|| Error::Storage {
                op,
                msg: "the bf16 GPU buffer is shared and cannot be written".into(),
            }),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs bf16 GPU storage, got {name}"),
            }),
        }
    }

    /// The device buffer; `op` names the caller in the error for host storage.
    #[cfg(feature = "cuda")]
    pub fn gpu(&self, op: &'static str) -> Result<&crate::gpu::GpuBuf> {
        match &self.storage {
            Storage::Cuda(b) => Ok(b),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs GPU storage, got {}", self.storage_name()),
            }),
        }
    }

    #[cfg(feature = "cuda")]
    pub fn gpu_mut(&mut self, op: &'static str) -> Result<&mut crate::gpu::GpuBuf> {
        let name = self.storage_name();
        match &mut self.storage {
            Storage::Cuda(b) => Ok(b),
            _ => Err(Error::Storage {
                op,
                msg: format!("needs GPU storage, got {name}"),
            }),
        }
    }

    /// A host copy in `dtype` (round to nearest even for the 16-bit formats; device values are downloaded).
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
        (self.numel().checked_div(c).unwrap_or(0), c)
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
            let tol = if dtype == DType::F16 {
                1.0 / 2048.0
            } else {
                1.0 / 256.0
            };
            for (a, b) in t.to_f32_vec().iter().zip(h.to_f32_vec()) {
                assert!((a - b).abs() <= tol * a.abs(), "{dtype:?}: {a} -> {b}");
            }
            assert!(h
                .f32s("test_op")
                .unwrap_err()
                .to_string()
                .contains("test_op"));
        }
        // 1 + 2^-8 lies halfway between two bf16 values; ties go to the even mantissa (1.0).
        let tie = Tensor::from_vec(&[1], vec![1.0 + 1.0 / 256.0])
            .unwrap()
            .to_dtype(DType::BF16);
        assert_eq!(tie.to_f32_vec(), vec![1.0]);
    }

    #[test]
    fn shape_errors_name_the_op_and_shapes() {
        let e = Tensor::from_vec(&[2, 3], vec![0.0; 5])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("from_vec") && e.contains("[2, 3]") && e.contains('5'),
            "{e}"
        );
        let e = Tensor::zeros(&[2, 3])
            .reshape(&[4])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("reshape") && e.contains("[2, 3]") && e.contains("[4]"),
            "{e}"
        );
        assert!(Tensor::from_f16(&[2], vec![half::f16::ZERO; 3]).is_err());
    }
}
