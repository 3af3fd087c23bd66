//! Hugging Face GPT-2 model folders: `config.json` + `model.safetensors`.
//!
//! Reading accepts tensor names with or without the `transformer.` prefix, ignores the
//! `attn.bias` / `attn.masked_bias` buffers older transformers versions saved, and accepts an
//! `lm_head.weight` only if it equals `wte` (GPT-2 ties them). Missing, extra, mis-shaped or
//! non-float tensors are errors naming the tensor and the file.
//!
//! Writing produces what `GPT2LMHeadModel.save_pretrained` produces (names with the
//! `transformer.` prefix, Conv1D `[in, out]` weights, `{"format": "pt"}` metadata), into a
//! temporary folder that is renamed into place only when complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ndarray::{ArrayD, IxDyn};
use tapelora_nn::{save_safetensors, write_atomic, Module, TensorFile};

use crate::config::GptConfig;
use crate::error::io_err;
use crate::model::Gpt;
use crate::{GptError, Result};

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
const PREFIX: &str = "transformer.";

fn format_err(path: &Path, msg: impl Into<String>) -> GptError {
    GptError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads `dir/config.json`.
pub fn load_config(dir: &Path) -> Result<GptConfig> {
    recover_dir(dir);
    if !dir.is_dir() {
        return Err(format_err(
            dir,
            "not a folder (expected a model folder with config.json and model.safetensors)",
        ));
    }
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format_err(&path, format!("not valid JSON: {e}")))?;
    GptConfig::from_hf_json(&value, &path)
}

/// Loads a model folder written by transformers or by tapelora.
pub fn load_model(dir: &Path) -> Result<Gpt> {
    let config = load_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    // Before allocating anything the config asks for, check the weights file can hold it: a
    // config claiming a billion-row vocabulary must fail here, not abort on allocation.
    let file_len = std::fs::metadata(&path).map_err(io_err(&path))?.len() as u128;
    let (c, l, v, p, inner) = (
        config.n_embd as u128,
        config.n_layer as u128,
        config.vocab_size as u128,
        config.n_positions as u128,
        config.n_inner as u128,
    );
    let needed = v * c + p * c + l * (4 * c * c + 2 * c * inner);
    if needed * 2 > file_len {
        return Err(format_err(
            &path,
            format!(
                "holds {file_len} bytes, too few for the {needed}+ parameters {} describes",
                dir.join(CONFIG_FILE).display()
            ),
        ));
    }
    let file = TensorFile::open(&path)?;
    let mut model = Gpt::zeros(config)?;
    let mut by_name: BTreeMap<String, String> = BTreeMap::new(); // our name → name in file
    let mut lm_head = None;
    for stored in file.names() {
        let name = stored.strip_prefix(PREFIX).unwrap_or(&stored).to_string();
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            continue; // causal-mask buffers, not parameters
        }
        if name == "lm_head.weight" {
            lm_head = Some(stored.clone());
            continue;
        }
        if by_name.insert(name.clone(), stored.clone()).is_some() {
            return Err(format_err(
                &path,
                format!("tensor `{name}` appears both with and without the `{PREFIX}` prefix"),
            ));
        }
    }
    let expected: Vec<String> = model.parameters().iter().map(|p| p.name.clone()).collect();
    for p in model.parameters_mut() {
        let stored = by_name
            .remove(&p.name)
            .ok_or_else(|| format_err(&path, format!("tensor `{PREFIX}{}` is missing", p.name)))?;
        let t = file.f32(&stored)?;
        if t.shape() != p.shape() {
            return Err(format_err(
                &path,
                format!(
                    "tensor `{stored}` has shape {:?}, expected {:?}",
                    t.shape(),
                    p.shape()
                ),
            ));
        }
        p.value = t.into_shared();
    }
    for (name, stored) in by_name {
        // A bias-free tapelora model is saved with zero biases for transformers' sake.
        let is_zero_bias = !model.config.bias
            && name.ends_with(".bias")
            && file.f32(&stored)?.iter().all(|&v| v == 0.0);
        if !is_zero_bias {
            let known = expected.len();
            return Err(format_err(&path, format!("unexpected tensor `{stored}` (the config describes a model of {known} tensors)")));
        }
    }
    if let Some(stored) = lm_head {
        let head = file.f32(&stored)?;
        if head != model.wte.weight.value.view() {
            return Err(format_err(&path, format!("`{stored}` differs from the token embedding; untied lm_heads are not supported")));
        }
    }
    let non_finite = model
        .parameters()
        .into_iter()
        .find(|p| p.value.iter().any(|v| !v.is_finite()));
    if let Some(p) = non_finite {
        return Err(format_err(
            &path,
            format!("tensor `{PREFIX}{}` holds NaN or infinite values", p.name),
        ));
    }
    Ok(model)
}

/// The tensors to save under Hugging Face names: the model's parameters plus, for a bias-free
/// model, zero biases (transformers' GPT-2 always has them; zeros compute the same function).
fn hf_tensors(model: &Gpt) -> Vec<(String, ArrayD<f32>)> {
    let mut out: Vec<(String, ArrayD<f32>)> = model
        .parameters()
        .iter()
        .map(|p| (format!("{PREFIX}{}", p.name), p.value.to_owned()))
        .collect();
    if !model.config.bias {
        let mut zeros = |name: String, len: usize| {
            out.push((format!("{PREFIX}{name}"), ArrayD::zeros(IxDyn(&[len]))))
        };
        let c = model.config.n_embd;
        for i in 0..model.config.n_layer {
            for (layer, len) in [
                ("ln_1", c),
                ("attn.c_attn", 3 * c),
                ("attn.c_proj", c),
                ("ln_2", c),
                ("mlp.c_fc", model.config.n_inner),
                ("mlp.c_proj", c),
            ] {
                zeros(format!("h.{i}.{layer}.bias"), len);
            }
        }
        zeros("ln_f.bias".into(), c);
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Writes `config.json` and `model.safetensors` into `dir`.
pub fn write_model_files(model: &Gpt, dir: &Path) -> Result<()> {
    let config =
        serde_json::to_string_pretty(&model.config.to_hf_json()).expect("JSON value serialises");
    write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())?;
    let tensors = hf_tensors(model);
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(
        &dir.join(WEIGHTS_FILE),
        tensors.iter().map(|(n, t)| (n.as_str(), t.view())),
        Some(metadata),
    )?;
    Ok(())
}

/// Builds a folder atomically: `fill` writes into a temporary sibling folder, which then
/// replaces `dir` in one step. On error the temporary folder is removed and `dir` is untouched.
///
/// Why this survives `kill -9` at any moment: until the last step only the temporary folder
/// changes; the last step is one `renameat2(RENAME_EXCHANGE)` (Linux) that swaps the new folder
/// with the old one, after which the old one (now under the temporary name) is deleted. Where
/// the exchange is unsupported, the old folder is renamed aside to `.NAME.old-PID` and the new
/// one renamed in; a kill between those two renames leaves only the aside folder, which
/// [`recover_dir`] (run by every loader and by the next write) renames back.
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, name) = split_dir(dir)?;
    std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
    recover_dir(dir);
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = parent.join(format!(".{name}.old-{}", std::process::id()));
    let result = if dir.exists() {
        replace_dir(&tmp, dir, &old)
    } else {
        std::fs::rename(&tmp, dir)
    };
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(io_err(dir)(e));
    }
    // Make the renames durable too (best effort: not every platform can sync a folder).
    if let Ok(f) = std::fs::File::open(&parent) {
        let _ = f.sync_all();
    }
    Ok(())
}

fn split_dir(dir: &Path) -> Result<(PathBuf, String)> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| format_err(dir, "not a valid folder name"))?;
    let parent: PathBuf = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok((parent, name))
}

/// Swaps `new` into `dir`'s place; `dir`'s old contents are deleted.
fn replace_dir(new: &Path, dir: &Path, old: &Path) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    match exchange(new, dir) {
        Ok(()) => {
            // `new` now names the previous folder.
            let _ = std::fs::remove_dir_all(new);
            return Ok(());
        }
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {}
        Err(e) => return Err(e),
    }
    std::fs::rename(dir, old)?;
    if let Err(e) = std::fs::rename(new, dir) {
        let _ = std::fs::rename(old, dir);
        return Err(e);
    }
    let _ = std::fs::remove_dir_all(old);
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Whether the process that owns a `.NAME.tmp-PID` / `.NAME.old-PID` folder is gone.
fn writer_gone(pid: &str) -> bool {
    match pid.parse::<u32>() {
        Ok(pid) if pid == std::process::id() => false,
        Ok(pid) if cfg!(target_os = "linux") => !Path::new(&format!("/proc/{pid}")).exists(),
        // Elsewhere liveness is unknown: treat the writer as gone only for recovery of a
        // missing folder (which no live writer leaves for more than an instant).
        Ok(_) => false,
        Err(_) => false,
    }
}

/// Repairs what a writer killed mid-save can leave beside `dir`: if `dir` is missing but an
/// aside copy `.NAME.old-PID` exists (the previous complete version), it is renamed back; the
/// unfinished `.NAME.tmp-PID` folders of dead writers are removed. Loaders call this first, so
/// the previous checkpoint stays loadable whatever moment the writer was killed at.
pub fn recover_dir(dir: &Path) {
    let Ok((parent, name)) = split_dir(dir) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(&parent) else {
        return;
    };
    let (old_prefix, tmp_prefix) = (format!(".{name}.old-"), format!(".{name}.tmp-"));
    let mut olds = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if let Some(pid) = file_name.strip_prefix(&old_prefix) {
            olds.push((entry.path(), pid.to_string()));
        } else if let Some(pid) = file_name.strip_prefix(&tmp_prefix) {
            if writer_gone(pid) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    for (path, pid) in olds {
        if !dir.exists() && pid.parse::<u32>().is_ok_and(|p| p != std::process::id()) {
            let _ = std::fs::rename(&path, dir);
        } else if writer_gone(&pid) {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

/// Saves a model folder atomically; `extra` may add files (tokenizer, training state).
pub fn save_model(model: &Gpt, dir: &Path, extra: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    write_dir_atomic(dir, |tmp| {
        write_model_files(model, tmp)?;
        extra(tmp)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// A one-block model small enough to write and read in microseconds.
    fn tiny(bias: bool) -> GptConfig {
        GptConfig {
            n_layer: 1,
            n_head: 2,
            n_embd: 4,
            n_positions: 8,
            vocab_size: 7,
            n_inner: 16,
            layer_norm_epsilon: 1e-5,
            bias,
            dropout: 0.0,
        }
    }

    fn temp(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tapelora-gpt-hf-{tag}-{}", std::process::id()))
    }

    #[test]
    fn a_config_larger_than_its_weights_is_rejected_before_allocating() {
        let cfg = tiny(true);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
        let dir = temp("huge");
        save_model(&model, &dir, |_| Ok(())).unwrap();
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .unwrap()
            .replace("\"vocab_size\": 7", "\"vocab_size\": 9000000000000");
        std::fs::write(dir.join(CONFIG_FILE), text).unwrap();
        let e = load_model(&dir).unwrap_err().to_string();
        assert!(
            e.contains("too few") && e.contains("model.safetensors"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bias_free_model_round_trips_through_a_folder() {
        let cfg = tiny(false);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
        let dir = temp("roundtrip");
        save_model(&model, &dir, |_| Ok(())).unwrap();
        let file = TensorFile::open(&dir.join(WEIGHTS_FILE)).unwrap();
        assert!(file
            .names()
            .contains(&"transformer.h.0.attn.c_attn.bias".to_string()));
        let back = load_model(&dir).unwrap();
        for (a, b) in model.parameters().iter().zip(back.parameters()) {
            assert_eq!((&a.name, &a.value), (&b.name, &b.value));
        }
        // A failing writer leaves the previous folder as it was.
        let err = save_model(&model, &dir, |_| Err(GptError::Input("boom".into())));
        assert!(err.is_err());
        assert!(load_model(&dir).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The states a writer killed mid-save can leave behind, and what loading makes of them.
    #[test]
    fn a_writer_killed_between_steps_leaves_the_previous_folder_loadable() {
        let cfg = tiny(true);
        let model = Gpt::new(cfg, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
        let root = temp("killed");
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let dir = root.join("ckpt");
        save_model(&model, &dir, |_| Ok(())).unwrap();
        // A pid that cannot be alive (above Linux's pid_max limit).
        let dead = 4_194_999u32;

        // Killed while filling its temporary folder: the folder is untouched, the debris goes.
        let tmp = root.join(format!(".ckpt.tmp-{dead}"));
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(tmp.join(WEIGHTS_FILE), b"half a file").unwrap();
        assert!(load_model(&dir).is_ok());
        if cfg!(target_os = "linux") {
            assert!(!tmp.exists(), "a dead writer's temporary folder is removed");
        }

        // Killed between moving the old folder aside and moving the new one in (the fallback
        // without an exchange rename): loading renames the aside copy back.
        let aside = root.join(format!(".ckpt.old-{dead}"));
        std::fs::rename(&dir, &aside).unwrap();
        let back = load_model(&dir).unwrap();
        assert!(dir.exists() && !aside.exists());
        for (a, b) in model.parameters().iter().zip(back.parameters()) {
            assert_eq!(a.value, b.value);
        }

        // Replacing an existing folder leaves no sibling behind.
        save_model(&model, &dir, |_| Ok(())).unwrap();
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["ckpt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
