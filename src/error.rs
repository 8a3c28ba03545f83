//! One error type for the whole crate. Messages name the op, tensor, file or flag and the shapes,
//! so that the CLI can print them as one clear line.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Shapes that do not fit together. `msg` carries the shapes.
    #[error("{op}: shape mismatch: {msg}")]
    Shape { op: &'static str, msg: String },
    /// An argument outside what the op accepts (bits outside 2..=8, a group size that does not divide, ...).
    #[error("{op}: {msg}")]
    Invalid { op: &'static str, msg: String },
    /// A tensor whose storage (dtype or device) the op cannot use.
    #[error("{op}: unsupported storage: {msg}")]
    Storage { op: &'static str, msg: String },
    /// A value that must be finite is not (a NaN loss, an exploding gradient).
    #[error("non-finite value in {what}")]
    NonFinite { what: String },
    /// A file whose contents are wrong: names the file and the field.
    #[error("{}: {field}: {msg}", path.display())]
    Format {
        path: PathBuf,
        field: String,
        msg: String,
    },
    /// An I/O failure on a named file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A CUDA driver, NVRTC or cuBLAS failure: no device, a kernel that does not compile (with the full NVRTC
    /// log), a launch or copy the driver refused. The message names the op or kernel.
    #[error("{0}")]
    Gpu(String),
    /// Anything the autograd tape refuses (backward of a non-scalar, a missing backward, ...).
    #[error("autograd: {0}")]
    Autograd(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Shape {
            op,
            msg: msg.into(),
        }
    }
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::Invalid {
            op,
            msg: msg.into(),
        }
    }
    pub fn format(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Format {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Error::invalid("json", e.to_string())
    }
}
