//! The bytes of a model file, shared by the GGUF and safetensors readers: a read-only mapping of the file, or an
//! image already in memory (fuzzing, tests). Tensor data stays in the mapping until a reader asks for it.
use crate::error::{Error, Result};
use memmap2::Mmap;
use std::path::Path;

pub enum FileBytes {
    Mmap(Mmap),
    Owned(Vec<u8>),
}

impl FileBytes {
    /// Maps the file at `path` read-only; errors name the path.
    pub fn map(path: &Path) -> Result<FileBytes> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and lives as long as the reader that owns it. Another process truncating
        // or rewriting the file while it is mapped is undefined behaviour that no mmap reader can rule out; model
        // files are not modified in place while in use (our writers replace files by rename, which leaves an
        // existing mapping intact).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Ok(FileBytes::Mmap(map))
    }
}

impl std::ops::Deref for FileBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            FileBytes::Mmap(m) => m,
            FileBytes::Owned(v) => v,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_names_the_path_when_it_cannot() {
        let dir = std::env::temp_dir().join(format!("eqat-mmap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bytes.bin");
        std::fs::write(&file, [1u8, 2, 3]).unwrap();
        assert_eq!(&*FileBytes::map(&file).unwrap(), &[1, 2, 3]);
        for bad in [dir.join("missing.gguf"), dir.clone()] {
            let e = FileBytes::map(&bad).err().expect("cannot map").to_string();
            assert!(e.contains(&bad.display().to_string()), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
