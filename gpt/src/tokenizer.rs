//! Tokenizers, offline: character-level and GPT-2's byte-level BPE.
//!
//! * **char** — one token per Unicode character; the vocabulary is the sorted set of distinct
//!   characters of the training text (nanoGPT's `shakespeare_char`). It is stored in the model
//!   folder as `tokenizer_chars.json`:
//!   ```json
//!   {"type": "char", "chars": ["\n", " ", "!", "$", "&", "'", ",", "-", ".", "3", ":", ";", "?", "A", "B", …]}
//!   ```
//!   where a character's index in `chars` is its token id.
//! * **gpt2** — GPT-2's byte-level BPE (vocabulary 50257, `<|endoftext|>` = 50256). Built in from
//!   tiktoken-rs's embedded `r50k_base` ranks, or read from a folder's `vocab.json` +
//!   `merges.txt` when it has them (GPT-2's token ids are its merge ranks, so the vocabulary alone
//!   defines the BPE).
//!
//! A model folder's tokenizer is found by [`Tokenizer::from_model_dir`]: `tokenizer_chars.json`,
//! else `vocab.json` + `merges.txt`, else built-in GPT-2 BPE if the vocabulary size is 50257.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rustc_hash::FxHashMap;
use serde_json::{json, Value};
use thiserror::Error;
use tiktoken_rs::CoreBPE;

pub const CHARS_FILE: &str = "tokenizer_chars.json";
pub const VOCAB_FILE: &str = "vocab.json";
pub const MERGES_FILE: &str = "merges.txt";
pub const GPT2_VOCAB_SIZE: usize = 50257;
pub const GPT2_EOT: u32 = 50256;
const END_OF_TEXT: &str = "<|endoftext|>";
/// GPT-2's pre-tokenisation pattern (tiktoken's r50k_base).
const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("character {ch:?} at position {position} is not in the tokenizer's vocabulary of {vocab} characters")]
    UnknownChar {
        ch: char,
        position: usize,
        vocab: usize,
    },
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    UnknownId { id: u32, vocab: usize },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T> = std::result::Result<T, TokenizerError>;

fn file_err(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::File {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A character-level vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub struct CharTokenizer {
    chars: Vec<char>,
}

/// GPT-2 byte-level BPE.
#[derive(Clone)]
pub struct Gpt2Bpe {
    bpe: CoreBPE,
    vocab_size: usize,
    eot: Option<u32>,
    /// `vocab.json` and `merges.txt` it was read from (copied along when the model is saved).
    source_files: Option<(PathBuf, PathBuf)>,
}

impl std::fmt::Debug for Gpt2Bpe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Bpe")
            .field("vocab_size", &self.vocab_size)
            .field("source_files", &self.source_files)
            .finish()
    }
}

#[derive(Clone, Debug)]
pub enum Tokenizer {
    Char(CharTokenizer),
    Gpt2(Box<Gpt2Bpe>),
}

/// GPT-2's reversible map from bytes to printable characters (used by `vocab.json`).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        let c = if printable.contains(&b) {
            b
        } else {
            extra += 1;
            255 + extra
        };
        table[b as usize] = char::from_u32(c).expect("valid scalar");
    }
    printable.clear();
    table
}

impl Tokenizer {
    /// A character vocabulary from `text`: its distinct characters, sorted.
    pub fn char_from_text(text: &str) -> Result<Self> {
        let chars: Vec<char> = text.chars().collect::<BTreeSet<_>>().into_iter().collect();
        if chars.is_empty() {
            return Err(TokenizerError::Invalid(
                "cannot build a character vocabulary from empty text".into(),
            ));
        }
        Ok(Tokenizer::Char(CharTokenizer { chars }))
    }

    /// GPT-2's BPE from tiktoken-rs's embedded ranks (no files, no network).
    pub fn gpt2() -> Result<Self> {
        let bpe = tiktoken_rs::r50k_base().map_err(|e| {
            TokenizerError::Invalid(format!("cannot build the built-in GPT-2 tokenizer: {e}"))
        })?;
        Ok(Tokenizer::Gpt2(Box::new(Gpt2Bpe {
            bpe,
            vocab_size: GPT2_VOCAB_SIZE,
            eot: Some(GPT2_EOT),
            source_files: None,
        })))
    }

    /// GPT-2-style BPE from a Hugging Face `vocab.json` + `merges.txt`.
    pub fn gpt2_from_files(vocab: &Path, merges: &Path) -> Result<Self> {
        let merges_text =
            std::fs::read_to_string(merges).map_err(|e| file_err(merges, e.to_string()))?;
        for (n, line) in merges_text.lines().enumerate() {
            if line.is_empty() || (n == 0 && line.starts_with("#version")) {
                continue;
            }
            if line.split(' ').count() != 2 {
                return Err(file_err(
                    merges,
                    format!(
                        "line {}: expected two space-separated tokens, got {line:?}",
                        n + 1
                    ),
                ));
            }
        }
        let text = std::fs::read_to_string(vocab).map_err(|e| file_err(vocab, e.to_string()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| file_err(vocab, format!("not valid JSON: {e}")))?;
        let map = value
            .as_object()
            .ok_or_else(|| file_err(vocab, "expected a JSON object of token → id"))?;
        let mut byte_of = FxHashMap::default();
        for (b, c) in bytes_to_unicode().iter().enumerate() {
            byte_of.insert(*c, b as u8);
        }
        let mut encoder: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        let mut special: FxHashMap<String, u32> = FxHashMap::default();
        let mut max_id = 0;
        for (token, id) in map {
            let id = id
                .as_u64()
                .filter(|&i| i <= u32::MAX as u64)
                .ok_or_else(|| {
                    file_err(vocab, format!("id of {token:?} is not a token id: {id}"))
                })? as u32;
            max_id = max_id.max(id);
            if token == END_OF_TEXT {
                special.insert(token.clone(), id);
                continue;
            }
            let bytes: Option<Vec<u8>> = token.chars().map(|c| byte_of.get(&c).copied()).collect();
            let bytes = bytes.ok_or_else(|| {
                file_err(
                    vocab,
                    format!("token {token:?} is not in GPT-2's byte-level alphabet"),
                )
            })?;
            if encoder.insert(bytes, id).is_some() {
                return Err(file_err(
                    vocab,
                    format!("token {token:?} decodes to the same bytes as another token"),
                ));
            }
        }
        let vocab_size = map.len();
        if max_id as usize + 1 != vocab_size {
            return Err(file_err(
                vocab,
                format!("ids must be 0..{vocab_size}, found id {max_id}"),
            ));
        }
        let eot = special.get(END_OF_TEXT).copied();
        let bpe = CoreBPE::new(encoder, special, GPT2_PATTERN)
            .map_err(|e| file_err(vocab, format!("cannot build a BPE: {e}")))?;
        Ok(Tokenizer::Gpt2(Box::new(Gpt2Bpe {
            bpe,
            vocab_size,
            eot,
            source_files: Some((vocab.to_path_buf(), merges.to_path_buf())),
        })))
    }

    /// The tokenizer stored with a model folder (see the module docs for the order of lookup).
    pub fn from_model_dir(dir: &Path, vocab_size: usize) -> Result<Self> {
        let chars_path = dir.join(CHARS_FILE);
        if chars_path.exists() {
            let tok = Self::load_chars(&chars_path)?;
            if tok.vocab_size() != vocab_size {
                return Err(file_err(
                    &chars_path,
                    format!(
                        "holds {} characters but the model's vocab_size is {vocab_size}",
                        tok.vocab_size()
                    ),
                ));
            }
            return Ok(tok);
        }
        let (vocab, merges) = (dir.join(VOCAB_FILE), dir.join(MERGES_FILE));
        if vocab.exists() && merges.exists() {
            let tok = Self::gpt2_from_files(&vocab, &merges)?;
            if tok.vocab_size() != vocab_size {
                return Err(file_err(
                    &vocab,
                    format!(
                        "holds {} tokens but the model's vocab_size is {vocab_size}",
                        tok.vocab_size()
                    ),
                ));
            }
            return Ok(tok);
        }
        if vocab_size == GPT2_VOCAB_SIZE {
            return Self::gpt2();
        }
        Err(file_err(dir, format!("no tokenizer files ({CHARS_FILE}, or {VOCAB_FILE} + {MERGES_FILE}) and vocab_size {vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}")))
    }

    fn load_chars(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e.to_string()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| file_err(path, format!("not valid JSON: {e}")))?;
        if value.get("type").and_then(Value::as_str) != Some("char") {
            return Err(file_err(path, "expected \"type\": \"char\""));
        }
        let list = value
            .get("chars")
            .and_then(Value::as_array)
            .ok_or_else(|| file_err(path, "expected \"chars\": a list of one-character strings"))?;
        let mut chars = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let mut it = v.as_str().map(str::chars).into_iter().flatten();
            match (it.next(), it.next()) {
                (Some(c), None) => chars.push(c),
                _ => {
                    return Err(file_err(
                        path,
                        format!("entry {i} is not a one-character string: {v}"),
                    ))
                }
            }
        }
        if chars.is_empty() {
            return Err(file_err(path, "the character list is empty"));
        }
        let distinct: BTreeSet<char> = chars.iter().copied().collect();
        if distinct.len() != chars.len() {
            return Err(file_err(path, "the character list has duplicates"));
        }
        Ok(Tokenizer::Char(CharTokenizer { chars }))
    }

    /// Writes the tokenizer's files into a model folder (nothing for built-in GPT-2 BPE).
    pub fn save(&self, dir: &Path) -> Result<()> {
        match self {
            Tokenizer::Char(t) => {
                let path = dir.join(CHARS_FILE);
                let body = json!({"type": "char", "chars": t.chars.iter().map(|c| c.to_string()).collect::<Vec<_>>()});
                tapelora_nn::write_atomic(&path, body.to_string().as_bytes())
                    .map_err(|e| file_err(&path, e.to_string()))
            }
            Tokenizer::Gpt2(bpe) if bpe.source_files.is_some() => {
                let (vocab, merges) = bpe.source_files.as_ref().expect("checked");
                for (src, name) in [(vocab, VOCAB_FILE), (merges, MERGES_FILE)] {
                    let dest = dir.join(name);
                    if src != &dest {
                        std::fs::copy(src, &dest).map_err(|e| file_err(&dest, e.to_string()))?;
                    }
                }
                Ok(())
            }
            Tokenizer::Gpt2(_) => Ok(()),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char(t) => text
                .chars()
                .enumerate()
                .map(|(position, ch)| {
                    t.chars.binary_search(&ch).map(|i| i as u32).map_err(|_| {
                        TokenizerError::UnknownChar {
                            ch,
                            position,
                            vocab: t.chars.len(),
                        }
                    })
                })
                .collect(),
            Tokenizer::Gpt2(t) => Ok(t.bpe.encode_ordinary(text)),
        }
    }

    /// Like `encode`, but `<|endoftext|>` in the text becomes the special token.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Gpt2(t) => Ok(t.bpe.encode_with_special_tokens(text)),
            Tokenizer::Char(_) => self.encode(text),
        }
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let vocab = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(TokenizerError::UnknownId { id, vocab });
        }
        match self {
            Tokenizer::Char(t) => Ok(ids.iter().map(|&i| t.chars[i as usize]).collect()),
            Tokenizer::Gpt2(t) => {
                let bytes = t
                    .bpe
                    .decode_bytes(ids)
                    .map_err(|e| TokenizerError::Invalid(format!("cannot decode: {e:?}")))?;
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char(t) => t.chars.len(),
            Tokenizer::Gpt2(t) => t.vocab_size,
        }
    }

    /// GPT-2's `<|endoftext|>`; none for characters.
    pub fn eot_token(&self) -> Option<u32> {
        match self {
            Tokenizer::Gpt2(t) => t.eot,
            Tokenizer::Char(_) => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Char(_) => "char",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tapelora-tok-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn gpt2_test_vectors() {
        let t = Tokenizer::gpt2().unwrap();
        assert_eq!(t.encode("Hello world!").unwrap(), [15496, 995, 0]);
        assert_eq!(
            t.encode("This is something more complex.").unwrap(),
            [1212, 318, 1223, 517, 3716, 13]
        );
        assert_eq!(
            t.decode(&[1212, 318, 1223, 517, 3716, 13]).unwrap(),
            "This is something more complex."
        );
        assert_eq!((t.vocab_size(), t.eot_token()), (50257, Some(50256)));
        assert!(
            t.encode("<|endoftext|>").unwrap().len() > 1,
            "plain text, not the special token"
        );
        assert_eq!(t.encode_with_special("<|endoftext|>").unwrap(), [50256]);
        assert!(t.decode(&[50257]).is_err());
    }

    #[test]
    fn bytes_to_unicode_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'!' as usize], '!');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 256);
    }

    #[test]
    fn vocab_and_merges_files_define_a_bpe() {
        let dir = temp("bpe");
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (b, c) in table.iter().enumerate() {
            vocab.insert(c.to_string(), json!(b));
        }
        for (i, tok) in ["he", "ll", "hell", "Ġw"].iter().enumerate() {
            vocab.insert(tok.to_string(), json!(256 + i));
        }
        vocab.insert(END_OF_TEXT.into(), json!(260));
        std::fs::write(dir.join(VOCAB_FILE), Value::Object(vocab).to_string()).unwrap();
        std::fs::write(
            dir.join(MERGES_FILE),
            "#version: 0.2\nh e\nl l\nhe ll\nĠ w\n",
        )
        .unwrap();
        let t = Tokenizer::from_model_dir(&dir, 261).unwrap();
        assert_eq!(
            t.encode("hello world").unwrap(),
            [
                258,
                b'o' as u32,
                259,
                b'o' as u32,
                b'r' as u32,
                b'l' as u32,
                b'd' as u32
            ]
        );
        assert_eq!(t.decode(&[258, b'o' as u32]).unwrap(), "hello");
        assert_eq!(t.eot_token(), Some(260));
        assert!(Tokenizer::from_model_dir(&dir, 300)
            .unwrap_err()
            .to_string()
            .contains("vocab.json"));
        std::fs::write(dir.join(MERGES_FILE), "h e x\n").unwrap();
        assert!(Tokenizer::from_model_dir(&dir, 261)
            .unwrap_err()
            .to_string()
            .contains("merges.txt"));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn char_tokenizer_round_trips_and_names_unknown_chars() {
        let t = Tokenizer::char_from_text("hello world").unwrap();
        let Tokenizer::Char(c) = &t else { panic!() };
        assert_eq!(c.chars, [' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']);
        assert_eq!(t.decode(&t.encode("low red").unwrap()).unwrap(), "low red");
        let e = t.encode("hé").unwrap_err().to_string();
        assert!(e.contains("'é'") && e.contains("position 1"), "{e}");
        assert!(Tokenizer::char_from_text("").is_err());
        let dir = temp("char");
        t.save(&dir).unwrap();
        let back = Tokenizer::from_model_dir(&dir, 8).unwrap();
        assert_eq!(back.encode("word").unwrap(), t.encode("word").unwrap());
        for (bad, why) in [
            ("{", "JSON"),
            (r#"{"type":"char","chars":"abc"}"#, "list"),
            (r#"{"type":"char","chars":["a","a"]}"#, "duplicates"),
            (r#"{"type":"char","chars":["ab"]}"#, "one-character"),
        ] {
            std::fs::write(dir.join(CHARS_FILE), bad).unwrap();
            let e = Tokenizer::from_model_dir(&dir, 2).unwrap_err().to_string();
            assert!(e.contains(CHARS_FILE) && e.contains(why), "{bad}: {e}");
        }
        std::fs::write(dir.join(CHARS_FILE), r#"{"type":"char","chars":["a","b"]}"#).unwrap();
        assert!(Tokenizer::from_model_dir(&dir, 3)
            .unwrap_err()
            .to_string()
            .contains("vocab_size is 3"));
        std::fs::remove_dir_all(&dir).unwrap();
        let empty = temp("empty");
        let e = Tokenizer::from_model_dir(&empty, 65)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(CHARS_FILE) && e.contains(VOCAB_FILE) && e.contains("65"),
            "{e}"
        );
        assert_eq!(
            Tokenizer::from_model_dir(&empty, 50257).unwrap().kind(),
            "gpt2"
        );
        std::fs::remove_dir_all(&empty).unwrap();
    }
}
