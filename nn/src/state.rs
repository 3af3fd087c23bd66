//! Reading and writing tensors as safetensors files, and whole-folder atomic writes.
//!
//! A state dict is the map from parameter names to tensors. Files are always written to a
//! temporary name and renamed into place, so a crash never leaves a half-written file behind.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use ndarray::{ArrayD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use crate::error::io_err;
use crate::module::Module;
use crate::{NnError, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The tensors of a safetensors file, still in their stored dtype.
pub struct TensorFile {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
    metadata: HashMap<String, String>,
}

fn format_err(path: &Path, msg: impl Into<String>) -> NnError {
    NnError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl TensorFile {
    /// Reads and validates a safetensors file (header, offsets, sizes) without converting.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        let parsed = SafeTensors::deserialize(&bytes)
            .map_err(|e| format_err(path, format!("not a valid safetensors file: {e}")))?;
        let metadata = SafeTensors::read_metadata(&bytes)
            .map(|(_, m)| m.metadata().clone().unwrap_or_default())
            .map_err(|e| format_err(path, format!("bad safetensors header: {e}")))?;
        drop(parsed);
        Ok(TensorFile {
            path: path.to_path_buf(),
            bytes,
            metadata,
        })
    }

    fn parsed(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .parsed()
            .names()
            .into_iter()
            .map(String::from)
            .collect();
        names.sort();
        names
    }

    /// `(dtype, shape)` of a tensor.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        self.parsed()
            .tensor(name)
            .ok()
            .map(|t| (t.dtype(), t.shape().to_vec()))
    }

    /// A floating-point tensor converted to f32 (stored as F32, F64, F16 or BF16).
    pub fn f32(&self, name: &str) -> Result<ArrayD<f32>> {
        Ok(self.f64(name)?.mapv(|v| v as f32))
    }

    /// A floating-point tensor converted to f64.
    pub fn f64(&self, name: &str) -> Result<ArrayD<f64>> {
        let parsed = self.parsed();
        let t = parsed.tensor(name).map_err(|_| self.missing(name))?;
        let data = t.data();
        let values: Vec<f64> = match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16) as f64)
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|b| f16_to_f64(u16::from_le_bytes([b[0], b[1]])))
                .collect(),
            other => {
                return Err(self.dtype_err(
                    name,
                    other,
                    "a floating-point dtype (F32, F64, F16, BF16)",
                ))
            }
        };
        ArrayD::from_shape_vec(IxDyn(t.shape()), values)
            .map_err(|e| self.tensor_err(name, e.to_string()))
    }

    /// An integer tensor (stored as I64, I32 or U32).
    pub fn i64(&self, name: &str) -> Result<ArrayD<i64>> {
        let parsed = self.parsed();
        let t = parsed.tensor(name).map_err(|_| self.missing(name))?;
        let data = t.data();
        let values: Vec<i64> = match t.dtype() {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            Dtype::U32 => data
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64)
                .collect(),
            other => return Err(self.dtype_err(name, other, "an integer dtype (I64, I32, U32)")),
        };
        ArrayD::from_shape_vec(IxDyn(t.shape()), values)
            .map_err(|e| self.tensor_err(name, e.to_string()))
    }

    fn missing(&self, name: &str) -> NnError {
        self.tensor_err(name, "not found".into())
    }

    fn dtype_err(&self, name: &str, got: Dtype, want: &str) -> NnError {
        self.tensor_err(name, format!("dtype {got:?}, expected {want}"))
    }

    fn tensor_err(&self, name: &str, msg: String) -> NnError {
        format_err(&self.path, format!("tensor `{name}`: {msg}"))
    }
}

/// IEEE half precision to f64.
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e - 15),
    }
}

/// A tensor to store: float32 values (weights, activations) or int64 ones (token ids).
pub enum Stored<'a> {
    F32(ndarray::ArrayViewD<'a, f32>),
    I64(ndarray::ArrayViewD<'a, i64>),
}

/// Serialises tensors of either kind with optional string metadata.
pub fn stored_to_safetensors_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Stored<'a>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| match t {
            Stored::F32(t) => (
                name.to_string(),
                Dtype::F32,
                t.shape().to_vec(),
                t.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
            Stored::I64(t) => (
                name.to_string(),
                Dtype::I64,
                t.shape().to_vec(),
                t.iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views = owned
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| NnError::Tensor {
            name: "?".into(),
            msg: e.to_string(),
        })?;
    safetensors::serialize(views, metadata).map_err(|e| NnError::Tensor {
        name: "?".into(),
        msg: format!("cannot serialise: {e}"),
    })
}

/// Serialises f32 tensors (in the given order of names) with optional string metadata.
pub fn to_safetensors_bytes<'a>(
    tensors: impl IntoIterator<Item = (&'a str, ndarray::ArrayViewD<'a, f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    stored_to_safetensors_bytes(
        tensors.into_iter().map(|(n, t)| (n, Stored::F32(t))),
        metadata,
    )
}

/// Writes f32 tensors to `path` atomically.
pub fn save_safetensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a str, ndarray::ArrayViewD<'a, f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    write_atomic(path, &to_safetensors_bytes(tensors, metadata)?)
}

/// The module's parameters by name (shared buffers, no copies).
pub fn state_dict(module: &dyn Module) -> BTreeMap<String, tapelora_autograd::Tensor<f32>> {
    module
        .parameters()
        .into_iter()
        .map(|p| (p.name.clone(), p.value.clone()))
        .collect()
}

/// Loads every parameter of `module` from `tensors` (by name, shapes checked). Returns the names
/// in `tensors` that the module does not have, for the caller to judge.
pub fn load_state_dict(
    module: &mut dyn Module,
    tensors: &mut BTreeMap<String, ArrayD<f32>>,
) -> Result<Vec<String>> {
    for p in module.parameters_mut() {
        let t = tensors.remove(&p.name).ok_or_else(|| NnError::Tensor {
            name: p.name.clone(),
            msg: "missing".into(),
        })?;
        if t.shape() != p.shape() {
            return Err(NnError::Tensor {
                name: p.name.clone(),
                msg: format!("shape {:?}, expected {:?}", t.shape(), p.shape()),
            });
        }
        p.value = t.into_shared();
    }
    Ok(tensors.keys().cloned().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Linear, WeightLayout};

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tapelora-nn-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn module_round_trips_through_safetensors() {
        let dir = temp_dir("roundtrip");
        let mut a = Linear::new("fc", 3, 2, true, WeightLayout::InOut);
        a.weight.value =
            ArrayD::from_shape_fn(IxDyn(&[3, 2]), |i| (i[0] * 2 + i[1]) as f32 * 0.5).into_shared();
        let state = state_dict(&a);
        let path = dir.join("m.safetensors");
        save_safetensors(
            &path,
            state.iter().map(|(n, t)| (n.as_str(), t.view())),
            Some(HashMap::from([("k".into(), "v".into())])),
        )
        .unwrap();
        let file = TensorFile::open(&path).unwrap();
        assert_eq!(file.names(), ["fc.bias", "fc.weight"]);
        assert_eq!(file.metadata()["k"], "v");
        let mut b = Linear::new("fc", 3, 2, true, WeightLayout::InOut);
        let mut tensors: BTreeMap<String, ArrayD<f32>> = file
            .names()
            .iter()
            .map(|n| (n.clone(), file.f32(n).unwrap()))
            .collect();
        tensors.insert("extra".into(), ArrayD::zeros(IxDyn(&[1])));
        assert_eq!(load_state_dict(&mut b, &mut tensors).unwrap(), ["extra"]);
        assert_eq!(b.weight.value, a.weight.value);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = temp_dir("bad");
        let path = dir.join("junk.safetensors");
        std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot a header").unwrap();
        let err = TensorFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("junk.safetensors"), "{err}");
        assert!(TensorFile::open(&dir.join("missing.safetensors")).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn half_precision_decodes() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
    }
}
