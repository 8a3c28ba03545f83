//! cuBLAS SGEMM with the CPU `ops::gemm::sgemm` contract: row-major C[m, n] = alpha·op(A)·op(B) + beta·C.
//!
//! cuBLAS is column-major, and a row-major X[r, c] buffer read column-major is Xᵀ. So C = op(A)·op(B) is
//! computed as Cᵀ = op(B)ᵀ·op(A)ᵀ: cuBLAS gets B first, then A, with m and n swapped and the same transposes.
//! The handle keeps cuBLAS's default math mode: true f32 (no TF32), which the equivalence tests rely on.
//!
//! `gemm_bf16` is the same contract on bf16 A and B through cublasGemmEx: f32 C, f32 accumulation
//! (CUBLAS_COMPUTE_32F), so only the rounding of the operands to bf16 differs from `sgemm`; `gemm_bf16_to_bf16`
//! also rounds C to bf16.
use super::{Bf16Buf, GpuBuf, GpuContext};
use crate::error::{Error, Result};
use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use std::ffi::c_void;

/// Checks that A, B and C hold their matrices; `op` names the caller.
#[allow(clippy::too_many_arguments)]
fn check_lens(
    op: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: usize,
    b: usize,
    c: usize,
) -> Result<()> {
    if a < m * k || b < k * n || c < m * n {
        return Err(Error::shape(
            op,
            format!(
                "m {m} n {n} k {k} need A {} B {} C {} values, got {a} {b} {c}",
                m * k,
                k * n,
                m * n
            ),
        ));
    }
    Ok(())
}

fn cublas_op(t: bool) -> cublasOperation_t {
    if t {
        cublasOperation_t::CUBLAS_OP_T
    } else {
        cublasOperation_t::CUBLAS_OP_N
    }
}

/// (m, n, k, lda, ldb) as cuBLAS's i32s; lda and ldb are the lengths of one stored row of A and B.
#[allow(clippy::too_many_arguments)]
fn dims_i32(
    op: &'static str,
    transa: bool,
    transb: bool,
    m: usize,
    n: usize,
    k: usize,
) -> Result<[i32; 5]> {
    let lda = if transa { m } else { k };
    let ldb = if transb { k } else { n };
    let dim = |x: usize| {
        i32::try_from(x.max(1))
            .map_err(|_| Error::invalid(op, format!("dimension {x} exceeds i32")))
    };
    Ok([dim(m)?, dim(n)?, dim(k)?, dim(lda)?, dim(ldb)?])
}

impl GpuContext {
    /// Row-major C[m, n] = alpha·op(A)·op(B) + beta·C, A [m, k] (or [k, m] with `transa`), B [k, n] (or [n, k]
    /// with `transb`). beta = 0 means C is not read. Errors when a buffer is shorter than its matrix.
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm(
        &self,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &GpuBuf,
        b: &GpuBuf,
        beta: f32,
        c: &mut GpuBuf,
    ) -> Result<()> {
        check_lens("sgemm_cuda", m, n, k, a.len(), b.len(), c.len())?;
        if self.gemm_without_product(m * n, k, beta, c)? {
            return Ok(());
        }
        self.sgemm_raw(transa, transb, m, n, k, alpha, a, b, beta, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn sgemm_raw(
        &self,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &GpuBuf,
        b: &GpuBuf,
        beta: f32,
        c: &mut GpuBuf,
    ) -> Result<()> {
        let [mi, ni, ki, ldai, ldbi] = dims_i32("sgemm_cuda", transa, transb, m, n, k)?;
        let (ap, bp, cp) = (a.ptr(), b.ptr(), c.ptr());
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Gpu(format!("sgemm: binding the context: {e}")))?;
        // SAFETY: the length checks above keep every access inside A, B and C; the handle is bound to the
        // context's stream, so the GEMM is ordered after the kernels that wrote A and B. alpha and beta are read
        // at call time (host pointer mode).
        unsafe {
            cudarc::cublas::result::sgemm(
                *self.blas.handle(),
                cublas_op(transb),
                cublas_op(transa),
                ni,
                mi,
                ki,
                &alpha,
                bp as *const f32,
                ldbi,
                ap as *const f32,
                ldai,
                &beta,
                cp as *mut f32,
                ni,
            )
        }
        .map_err(|e| Error::Gpu(format!("cuBLAS sgemm m {m} n {n} k {k}: {e}")))
    }

    /// Row-major C[m, n] = alpha·op(A)·op(B) + beta·C with bf16 A and B, f32 C and f32 accumulation; the
    /// layout contract of [`GpuContext::sgemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16(
        &self,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Bf16Buf,
        b: &Bf16Buf,
        beta: f32,
        c: &mut GpuBuf,
    ) -> Result<()> {
        check_lens("gemm_bf16", m, n, k, a.len(), b.len(), c.len())?;
        if self.gemm_without_product(m * n, k, beta, c)? {
            return Ok(());
        }
        let out = (c.ptr(), cudaDataType::CUDA_R_32F);
        self.gemm_ex_bf16(
            "gemm_bf16",
            (transa, transb),
            [m, n, k],
            alpha,
            a,
            b,
            beta,
            out,
        )
    }

    /// Row-major C[m, n] = alpha·op(A)·op(B) with bf16 A, B and C: f32 accumulation, C rounded to bf16 once at
    /// the end (as torch.autocast's bf16 matmul writes it), half the bytes of an f32 C.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_to_bf16(
        &self,
        transa: bool,
        transb: bool,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &Bf16Buf,
        b: &Bf16Buf,
        c: &mut Bf16Buf,
    ) -> Result<()> {
        check_lens("gemm_bf16_to_bf16", m, n, k, a.len(), b.len(), c.len())?;
        if m * n == 0 {
            return Ok(());
        }
        if k == 0 {
            return c.zero();
        }
        let out = (c.ptr(), cudaDataType::CUDA_R_16BF);
        self.gemm_ex_bf16(
            "gemm_bf16_to_bf16",
            (transa, transb),
            [m, n, k],
            alpha,
            a,
            b,
            0.0,
            out,
        )
    }

    /// cublasGemmEx on bf16 A and B with f32 accumulation into C at `out` = (address, element type), after the
    /// callers' length checks; `op` names the caller in errors.
    #[allow(clippy::too_many_arguments)]
    fn gemm_ex_bf16(
        &self,
        op: &'static str,
        (transa, transb): (bool, bool),
        [m, n, k]: [usize; 3],
        alpha: f32,
        a: &Bf16Buf,
        b: &Bf16Buf,
        beta: f32,
        (c_ptr, c_type): (u64, cudaDataType),
    ) -> Result<()> {
        let [mi, ni, ki, ldai, ldbi] = dims_i32(op, transa, transb, m, n, k)?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Gpu(format!("{op}: binding the context: {e}")))?;
        let bf16 = cudaDataType::CUDA_R_16BF;
        // SAFETY: the callers' length checks keep every access inside A, B (bf16 elements) and C (c_type
        // elements); the handle is bound to the context's stream, so the GEMM is ordered after the kernels that
        // wrote A and B; alpha and beta are f32 as CUBLAS_COMPUTE_32F requires, read at call time (host pointer
        // mode).
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.blas.handle(),
                cublas_op(transb),
                cublas_op(transa),
                ni,
                mi,
                ki,
                &alpha as *const f32 as *const c_void,
                b.ptr() as *const c_void,
                bf16,
                ldbi,
                a.ptr() as *const c_void,
                bf16,
                ldai,
                &beta as *const f32 as *const c_void,
                c_ptr as *mut c_void,
                c_type,
                ni,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| Error::Gpu(format!("cuBLAS {op} m {m} n {n} k {k}: {e}")))
    }

    /// `batch` products at once: row-major C[i] = alpha·op(A[i])·op(B[i]) + beta·C[i], where A[i], B[i] and C[i]
    /// are the i-th of `batch` consecutive matrices (m·k, k·n and m·n values apart). One
    /// cublasSgemmStridedBatched call, with the same row-major-as-transposed trick as [`GpuContext::sgemm`].
    #[allow(clippy::too_many_arguments)]
    pub fn sgemm_strided_batched(
        &self,
        transa: bool,
        transb: bool,
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: &GpuBuf,
        b: &GpuBuf,
        beta: f32,
        c: &mut GpuBuf,
    ) -> Result<()> {
        let (sa, sb, sc) = (m * k, k * n, m * n);
        if a.len() < batch * sa || b.len() < batch * sb || c.len() < batch * sc {
            return Err(Error::shape(
                "sgemm_strided_batched_cuda",
                format!(
                    "batch {batch} m {m} n {n} k {k} need A {} B {} C {} values, got {} {} {}",
                    batch * sa,
                    batch * sb,
                    batch * sc,
                    a.len(),
                    b.len(),
                    c.len()
                ),
            ));
        }
        if self.gemm_without_product(batch * sc, k, beta, c)? {
            return Ok(());
        }
        let [mi, ni, ki, ldai, ldbi] =
            dims_i32("sgemm_strided_batched_cuda", transa, transb, m, n, k)?;
        let bi = i32::try_from(batch).map_err(|_| {
            Error::invalid(
                "sgemm_strided_batched_cuda",
                format!("batch {batch} exceeds i32"),
            )
        })?;
        let (ap, bp, cp) = (a.ptr(), b.ptr(), c.ptr());
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Gpu(format!("sgemm_strided_batched: binding the context: {e}")))?;
        // SAFETY: the length checks above keep all `batch` matrices inside A, B and C; the handle is bound to
        // the context's stream (ordered after the kernels that wrote A and B); alpha and beta are host values
        // read at call time.
        unsafe {
            cudarc::cublas::result::sgemm_strided_batched(
                *self.blas.handle(),
                cublas_op(transb),
                cublas_op(transa),
                ni,
                mi,
                ki,
                &alpha,
                bp as *const f32,
                ldbi,
                sb as i64,
                ap as *const f32,
                ldai,
                sa as i64,
                &beta,
                cp as *mut f32,
                ni,
                sc as i64,
                bi,
            )
        }
        .map_err(|e| {
            Error::Gpu(format!(
                "cuBLAS sgemm_strided_batched batch {batch} m {m} n {n} k {k}: {e}"
            ))
        })
    }

    /// Handles the products with nothing to multiply and returns true when it did: with no C values
    /// (`c_values` = batch·m·n is 0) there is nothing to write; with k = 0 the sum is empty, so C = beta·C,
    /// and with beta = 0 C must be written without being read.
    fn gemm_without_product(
        &self,
        c_values: usize,
        k: usize,
        beta: f32,
        c: &mut GpuBuf,
    ) -> Result<bool> {
        if c_values == 0 {
            return Ok(true);
        }
        if k != 0 {
            return Ok(false);
        }
        if beta == 0.0 {
            c.zero()?;
        } else {
            self.sscal(c_values, beta, c)?;
        }
        Ok(true)
    }

    /// x[..n] *= alpha.
    fn sscal(&self, n: usize, alpha: f32, x: &mut GpuBuf) -> Result<()> {
        let n = i32::try_from(n)
            .map_err(|_| Error::invalid("sgemm_cuda", format!("{n} values exceed i32")))?;
        self.ctx
            .bind_to_thread()
            .map_err(|e| Error::Gpu(format!("sscal: binding the context: {e}")))?;
        // SAFETY: x holds at least n values (checked by the caller); the handle is on the context's stream.
        unsafe {
            cudarc::cublas::sys::cublasSscal_v2(
                *self.blas.handle(),
                n,
                &alpha,
                x.ptr() as *mut f32,
                1,
            )
        }
        .result()
        .map_err(|e| Error::Gpu(format!("cuBLAS sscal n {n}: {e}")))
    }
}
