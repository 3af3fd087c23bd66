//! Tokenizers: text ↔ token ids, and how a model folder records which one it uses.
//!
//! Two kinds, both behind [`Tokenizer`]:
//!
//! * **Character level** (`kind() == "char"`), as in nanoGPT's `shakespeare_char`: the vocabulary
//!   is the sorted set of distinct Unicode scalar values (`char`s) of the training text, and a
//!   character's id is its index in that list. Encoding a character outside the vocabulary is an
//!   error ([`TokenizerError::UnknownChar`]) that names it and its position; there is no
//!   end-of-text token.
//! * **GPT-2 byte-level BPE** (`kind() == "gpt2"`), computed by the `tiktoken-rs` crate. By default
//!   it uses GPT-2's own ranks (`r50k_base`) embedded in that crate: 50257 tokens, `<|endoftext|>`
//!   = 50256, no network and no files. It can also be built from a Hugging Face folder's
//!   `vocab.json` + `merges.txt`: each token string is turned back into bytes with GPT-2's
//!   [`bytes_to_unicode`] table and, as in GPT-2, its id is its BPE rank (so ids must follow the
//!   order of `merges.txt`, which is checked). [`Tokenizer::encode`] treats `<|endoftext|>` in the
//!   text as ordinary text (tiktoken's `encode_ordinary`); [`Tokenizer::encode_with_special`]
//!   turns it into the special token. Decoding is lossy: bytes that are not valid UTF-8 (a
//!   character cut between tokens) become U+FFFD, like Hugging Face's `errors="replace"`.
//!
//! ## Model folder files
//!
//! [`Tokenizer::from_model_dir`] looks, in this order, for:
//!
//! 1. `tokenizer_chars.json` → character level;
//! 2. `vocab.json` and `merges.txt` (Hugging Face GPT-2 style) → byte-level BPE from them;
//! 3. neither, and the model's `vocab_size` is 50257 → the embedded GPT-2 BPE;
//!
//! and otherwise fails. The tokenizer's size must equal the model's `vocab_size`.
//! [`Tokenizer::save`] writes `tokenizer_chars.json` for a character tokenizer, copies `vocab.json`
//! and `merges.txt` for a BPE loaded from them, and writes nothing for the embedded GPT-2 BPE.
//!
//! ### `tokenizer_chars.json`
//!
//! A UTF-8 JSON object with two members:
//!
//! ```json
//! {"type": "char", "chars": ["\n", " ", "!", "$", "&", "'", ",", "-", ".", "3", ":", ";", "?", "A"]}
//! ```
//!
//! * `"type"`: always `"char"`;
//! * `"chars"`: the vocabulary, a non-empty list of distinct one-character strings; the index of a
//!   character in the list is its token id, so the list's length is the model's `vocab_size`.
//!   Characters are written as JSON strings (control characters escaped, e.g. `"\n"`, others as
//!   themselves). Written by this crate the list is sorted by code point, as nanoGPT's
//!   `sorted(list(set(data)))`, but any order is read back as given.
//!
//! Other members are ignored. The file is written atomically (a temporary file in the same folder,
//! then renamed).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;
use tiktoken_rs::CoreBPE;

/// GPT-2's vocabulary size (50257, `<|endoftext|>` included).
pub const GPT2_VOCAB_SIZE: usize = 50257;
/// GPT-2's end-of-text token id.
pub const GPT2_EOT: u32 = 50256;
/// GPT-2's end-of-text token.
pub const ENDOFTEXT: &str = "<|endoftext|>";
/// File name of a character vocabulary in a model folder.
pub const CHARS_FILE: &str = "tokenizer_chars.json";
/// File name of a Hugging Face BPE vocabulary (token string → id).
pub const VOCAB_FILE: &str = "vocab.json";
/// File name of a Hugging Face BPE merge list.
pub const MERGES_FILE: &str = "merges.txt";

/// GPT-2's pre-tokenization regex, as tiktoken writes it for `r50k_base`.
const GPT2_PATTERN: &str =
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s";

/// Everything that can go wrong building, loading, saving or using a [`Tokenizer`].
#[derive(Debug, Error)]
pub enum TokenizerError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but does not hold what was expected.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A character vocabulary needs at least one character.
    #[error("cannot build a character vocabulary from empty text")]
    EmptyText,
    /// The text holds a character that the character vocabulary lacks.
    #[error("character {ch:?} at position {position} is not in the character vocabulary of {vocab_size} characters")]
    UnknownChar {
        ch: char,
        /// Position in the input, counted in chars (not bytes).
        position: usize,
        vocab_size: usize,
    },
    /// A token id is not below the vocabulary size.
    #[error("token id {id} is out of range: the vocabulary has {vocab_size} tokens (ids 0..{vocab_size})")]
    IdOutOfRange { id: u32, vocab_size: usize },
    /// The tokenizer file's size disagrees with the model's `vocab_size`.
    #[error("{path} holds {found} tokens but the model's vocab_size is {expected}")]
    VocabSizeMismatch {
        path: PathBuf,
        found: usize,
        expected: usize,
    },
    /// The folder has no tokenizer files and the model is not GPT-2 sized.
    #[error("{dir} has no tokenizer files (looked for {CHARS_FILE}, and for {VOCAB_FILE} with {MERGES_FILE}) and vocab_size {vocab_size} is not GPT-2's {GPT2_VOCAB_SIZE}")]
    NoTokenizer { dir: PathBuf, vocab_size: usize },
    /// tiktoken's pre-tokenization regex failed on the text.
    #[error("GPT-2 BPE could not split the text: {0}")]
    Encode(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizerError + '_ {
    move |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> TokenizerError {
    TokenizerError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// GPT-2's `bytes_to_unicode`: the printable char that stands for each byte in `vocab.json` and
/// `merges.txt`. Printable Latin-1 bytes (`!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`) stand for themselves;
/// the other 68 map, in byte order, to U+0100.. (so b' ' is 'Ġ' U+0120, b'\n' is 'Ċ' U+010A).
pub fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    for (byte, slot) in (0..=255u8).zip(table.iter_mut()) {
        *slot = if matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(byte)
        } else {
            shifted += 1;
            char::from_u32(255 + shifted).expect("U+0100..=U+0143 are chars")
        };
    }
    table
}

/// A character-level vocabulary: `chars[id]`, and its inverse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CharVocab {
    chars: Vec<char>,
    ids: HashMap<char, u32>,
}

impl CharVocab {
    fn new(chars: Vec<char>) -> Result<Self, String> {
        if chars.is_empty() {
            return Err("the character list is empty".into());
        }
        let mut ids = HashMap::with_capacity(chars.len());
        for (id, &ch) in chars.iter().enumerate() {
            if let Some(first) = ids.insert(ch, id as u32) {
                return Err(format!(
                    "character {ch:?} is listed twice (ids {first} and {id})"
                ));
            }
        }
        Ok(Self { chars, ids })
    }
}

/// GPT-2 byte-level BPE: the embedded GPT-2 ranks, or ranks read from `vocab.json` + `merges.txt`.
#[derive(Clone)]
pub struct Gpt2Bpe(BpeSource);

#[derive(Clone)]
enum BpeSource {
    Embedded,
    Files {
        vocab: PathBuf,
        merges: PathBuf,
        core: Arc<CoreBPE>,
        vocab_size: usize,
        eot: u32,
    },
}

impl Gpt2Bpe {
    fn core(&self) -> &CoreBPE {
        match &self.0 {
            BpeSource::Embedded => tiktoken_rs::r50k_base_singleton(),
            BpeSource::Files { core, .. } => core,
        }
    }
}

impl fmt::Debug for Gpt2Bpe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            BpeSource::Embedded => f.write_str("Gpt2Bpe(embedded r50k_base)"),
            BpeSource::Files {
                vocab, vocab_size, ..
            } => write!(f, "Gpt2Bpe({}, {vocab_size} tokens)", vocab.display()),
        }
    }
}

/// A tokenizer: character level or GPT-2 byte-level BPE (see the [module docs](self)).
#[derive(Clone, Debug)]
pub enum Tokenizer {
    Char(CharVocab),
    Gpt2(Gpt2Bpe),
}

#[derive(Deserialize)]
struct CharsFile {
    #[serde(rename = "type")]
    kind: String,
    chars: Vec<char>,
}

impl Tokenizer {
    /// GPT-2's BPE from the ranks embedded in `tiktoken-rs` (50257 tokens). It cannot fail; the
    /// `Result` lets it stand beside the other constructors.
    pub fn gpt2() -> Result<Self, TokenizerError> {
        Ok(Self::Gpt2(Gpt2Bpe(BpeSource::Embedded)))
    }

    /// The character vocabulary of `text`: its distinct chars, sorted by code point.
    pub fn char_from_text(text: &str) -> Result<Self, TokenizerError> {
        let chars: BTreeSet<char> = text.chars().collect();
        CharVocab::new(chars.into_iter().collect())
            .map(Self::Char)
            .map_err(|_| TokenizerError::EmptyText)
    }

    /// Reads a `tokenizer_chars.json` file (format in the [module docs](self)).
    pub fn load_chars(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = fs::read(path).map_err(io_err(path))?;
        let file: CharsFile = serde_json::from_slice(&bytes).map_err(|e| {
            format_err(
                path,
                format!(r#"expected {{"type": "char", "chars": ["a", "b", ...]}}: {e}"#),
            )
        })?;
        if file.kind != "char" {
            return Err(format_err(
                path,
                format!(r#""type" is {:?}, expected "char""#, file.kind),
            ));
        }
        CharVocab::new(file.chars)
            .map(Self::Char)
            .map_err(|msg| format_err(path, msg))
    }

    /// GPT-2 style byte-level BPE from a Hugging Face `vocab.json` (token string → id) and
    /// `merges.txt`. The vocabulary must hold `<|endoftext|>` and all 256 byte tokens, use the
    /// ids 0..N once each, and number merged tokens in the order of `merges.txt`.
    pub fn gpt2_from_files(vocab_path: &Path, merges_path: &Path) -> Result<Self, TokenizerError> {
        let bad = |msg: String| format_err(vocab_path, msg);
        let bytes = fs::read(vocab_path).map_err(io_err(vocab_path))?;
        let vocab: HashMap<String, u32> = serde_json::from_slice(&bytes).map_err(|e| {
            bad(format!(
                "expected a JSON object mapping token strings to ids: {e}"
            ))
        })?;
        let eot = *vocab
            .get(ENDOFTEXT)
            .ok_or_else(|| bad(format!("has no {ENDOFTEXT:?} token")))?;
        let table = bytes_to_unicode();
        let byte_of: HashMap<char, u8> = (0..=255u8).map(|b| (table[b as usize], b)).collect();
        if let Some((b, c)) = (0..=255u8)
            .map(|b| (b, table[b as usize]))
            .find(|(_, c)| !vocab.contains_key(&c.to_string()))
        {
            return Err(bad(format!(
                "lacks the token {c:?} for byte 0x{b:02x}: a byte-level BPE vocabulary holds all 256 bytes"
            )));
        }

        let mut entries: Vec<(&String, u32)> = vocab.iter().map(|(t, &id)| (t, id)).collect();
        entries.sort_unstable_by_key(|&(token, id)| (id, token.as_str()));
        let n = entries.len();
        let mut encoder = Vec::with_capacity(n);
        let mut previous: Option<(&str, u32)> = None;
        for &(token, id) in &entries {
            if id as usize >= n {
                return Err(bad(format!(
                    "token {token:?} has id {id}, but the {n} entries must use the ids 0..{n}"
                )));
            }
            if let Some((other, prev)) = previous {
                if prev == id {
                    return Err(bad(format!(
                        "id {id} is used by both {other:?} and {token:?}"
                    )));
                }
            }
            previous = Some((token, id));
            if token == ENDOFTEXT {
                continue;
            }
            if token.is_empty() {
                return Err(bad(format!("token id {id} is the empty string")));
            }
            let bytes = token
                .chars()
                .map(|c| {
                    byte_of.get(&c).copied().ok_or_else(|| {
                        bad(format!(
                            "token {token:?} (id {id}) holds {c:?}, which is not in GPT-2's byte-to-unicode table"
                        ))
                    })
                })
                .collect::<Result<Vec<u8>, _>>()?;
            encoder.push((bytes, id));
        }
        check_merges(merges_path, vocab_path, &vocab)?;

        let core = CoreBPE::new(
            encoder.into_iter().collect(),
            [(ENDOFTEXT.to_string(), eot)].into_iter().collect(),
            GPT2_PATTERN,
        )
        .map_err(|e| bad(format!("cannot build the BPE: {e}")))?;
        Ok(Self::Gpt2(Gpt2Bpe(BpeSource::Files {
            vocab: vocab_path.to_path_buf(),
            merges: merges_path.to_path_buf(),
            core: Arc::new(core),
            vocab_size: n,
            eot,
        })))
    }

    /// The tokenizer of a model folder with `vocab_size` tokens (search order in the
    /// [module docs](self)); its size must equal `vocab_size`.
    pub fn from_model_dir(dir: &Path, vocab_size: usize) -> Result<Self, TokenizerError> {
        if !dir.is_dir() {
            return Err(format_err(dir, "not a folder"));
        }
        let check = |tok: Self, path: PathBuf| {
            if tok.vocab_size() == vocab_size {
                Ok(tok)
            } else {
                Err(TokenizerError::VocabSizeMismatch {
                    path,
                    found: tok.vocab_size(),
                    expected: vocab_size,
                })
            }
        };
        let chars = dir.join(CHARS_FILE);
        if chars.exists() {
            return check(Self::load_chars(&chars)?, chars);
        }
        let (vocab, merges) = (dir.join(VOCAB_FILE), dir.join(MERGES_FILE));
        match (vocab.exists(), merges.exists()) {
            (true, true) => check(Self::gpt2_from_files(&vocab, &merges)?, vocab),
            (true, false) => Err(format_err(
                &merges,
                format!("missing: {VOCAB_FILE} needs {MERGES_FILE} beside it"),
            )),
            (false, true) => Err(format_err(
                &vocab,
                format!("missing: {MERGES_FILE} needs {VOCAB_FILE} beside it"),
            )),
            (false, false) if vocab_size == GPT2_VOCAB_SIZE => Self::gpt2(),
            (false, false) => Err(TokenizerError::NoTokenizer {
                dir: dir.to_path_buf(),
                vocab_size,
            }),
        }
    }

    /// Records the tokenizer in the model folder `dir` (created if missing) so that
    /// [`from_model_dir`](Self::from_model_dir) finds it: writes `tokenizer_chars.json` for a
    /// character tokenizer, copies `vocab.json` + `merges.txt` for a BPE loaded from files (unless
    /// they already are `dir`'s), and writes nothing for the embedded GPT-2 BPE.
    pub fn save(&self, dir: &Path) -> Result<(), TokenizerError> {
        match self {
            Self::Char(v) => {
                let path = dir.join(CHARS_FILE);
                let list = serde_json::to_string(&v.chars)
                    .map_err(|e| format_err(&path, format!("cannot serialize: {e}")))?;
                fs::create_dir_all(dir).map_err(io_err(dir))?;
                let json = format!("{{\"type\": \"char\", \"chars\": {list}}}\n");
                write_atomic(&path, json.as_bytes())
            }
            Self::Gpt2(Gpt2Bpe(BpeSource::Embedded)) => Ok(()),
            Self::Gpt2(Gpt2Bpe(BpeSource::Files { vocab, merges, .. })) => {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
                for (src, name) in [(vocab, VOCAB_FILE), (merges, MERGES_FILE)] {
                    let dst = dir.join(name);
                    let same = matches!(
                        (fs::canonicalize(src), fs::canonicalize(&dst)),
                        (Ok(a), Ok(b)) if a == b
                    );
                    if !same {
                        write_atomic(&dst, &fs::read(src).map_err(io_err(src))?)?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Token ids of `text`. GPT-2: `<|endoftext|>` in the text is plain text (tiktoken's
    /// `encode_ordinary`). Char: every char must be in the vocabulary.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Char(_) => self.encode_with_special(text),
            Self::Gpt2(bpe) => bpe
                .core()
                .encode(text, &HashSet::new())
                .map(|(ids, _)| ids)
                .map_err(|e| TokenizerError::Encode(e.to_string())),
        }
    }

    /// Like [`encode`](Self::encode), but GPT-2's `<|endoftext|>` in the text becomes the special
    /// token. Same as `encode` for a character tokenizer, which has no special tokens.
    pub fn encode_with_special(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Self::Char(v) => text
                .chars()
                .enumerate()
                .map(|(position, ch)| {
                    v.ids.get(&ch).copied().ok_or(TokenizerError::UnknownChar {
                        ch,
                        position,
                        vocab_size: v.chars.len(),
                    })
                })
                .collect(),
            Self::Gpt2(bpe) => {
                let core = bpe.core();
                core.encode(text, &core.special_tokens())
                    .map(|(ids, _)| ids)
                    .map_err(|e| TokenizerError::Encode(e.to_string()))
            }
        }
    }

    /// The text of `ids`; an id `>= vocab_size()` is an error. BPE output that is not valid
    /// UTF-8 (a character split across a cut) is replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::IdOutOfRange { id, vocab_size });
        }
        match self {
            Self::Char(v) => Ok(ids.iter().map(|&id| v.chars[id as usize]).collect()),
            Self::Gpt2(bpe) => bpe
                .core()
                .decode_bytes(ids)
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .map_err(|e| TokenizerError::IdOutOfRange {
                    id: e.token,
                    vocab_size,
                }),
        }
    }

    /// Number of token ids (ids are `0..vocab_size()`).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Char(v) => v.chars.len(),
            Self::Gpt2(Gpt2Bpe(BpeSource::Embedded)) => GPT2_VOCAB_SIZE,
            Self::Gpt2(Gpt2Bpe(BpeSource::Files { vocab_size, .. })) => *vocab_size,
        }
    }

    /// The `<|endoftext|>` id (50256 for GPT-2); `None` for a character tokenizer.
    pub fn eot_token(&self) -> Option<u32> {
        match self {
            Self::Char(_) => None,
            Self::Gpt2(Gpt2Bpe(BpeSource::Embedded)) => Some(GPT2_EOT),
            Self::Gpt2(Gpt2Bpe(BpeSource::Files { eot, .. })) => Some(*eot),
        }
    }

    /// `"char"` or `"gpt2"`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Char(_) => "char",
            Self::Gpt2(_) => "gpt2",
        }
    }

    /// The character vocabulary (index = id); `None` for BPE.
    pub fn chars(&self) -> Option<&[char]> {
        match self {
            Self::Char(v) => Some(&v.chars),
            Self::Gpt2(_) => None,
        }
    }
}

/// Checks that `merges.txt` is a GPT-2 merge list consistent with `vocab`: an optional
/// `#version` first line, then lines of two space-separated tokens whose concatenation is in the
/// vocabulary with ids rising line by line (GPT-2's ids are its BPE ranks).
fn check_merges(
    path: &Path,
    vocab_path: &Path,
    vocab: &HashMap<String, u32>,
) -> Result<(), TokenizerError> {
    let text = fs::read_to_string(path).map_err(io_err(path))?;
    let mut previous: Option<(u32, usize)> = None;
    for (i, line) in text.lines().enumerate() {
        let lineno = i + 1;
        if line.trim().is_empty() || (i == 0 && line.starts_with("#version")) {
            continue;
        }
        let bad = |msg: String| format_err(path, format!("line {lineno}: {msg}"));
        let mut parts = line.split(' ');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(format!(
                "expected two space-separated tokens, found {line:?}"
            )));
        };
        if a.is_empty() || b.is_empty() {
            return Err(bad(format!(
                "expected two space-separated tokens, found {line:?}"
            )));
        }
        let merged = format!("{a}{b}");
        for token in [a, b, &merged] {
            if !vocab.contains_key(token) {
                return Err(bad(format!(
                    "token {token:?} is not in {}",
                    vocab_path.display()
                )));
            }
        }
        let id = vocab[&merged];
        if let Some((prev, prev_line)) = previous {
            if id <= prev {
                return Err(bad(format!(
                    "merged token {merged:?} has id {id}, not above the id {prev} of line {prev_line}: \
                     ids must follow the merge order (they are the BPE ranks)"
                )));
            }
        }
        previous = Some((id, lineno));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same folder, then renames it.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TokenizerError> {
    let name = path
        .file_name()
        .map_or_else(|| "tokenizer".into(), |n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let written = fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .map_err(io_err(&tmp))
        .and_then(|()| fs::rename(&tmp, path).map_err(io_err(path)));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNT: AtomicUsize = AtomicUsize::new(0);
            let n = COUNT.fetch_add(1, Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!(
                "tapelora-tokenizer-{tag}-{}-{n}",
                std::process::id()
            ));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Bytes in the order of GPT-2's first 256 ids (bytes_to_unicode's order).
    fn gpt2_byte_order() -> Vec<u8> {
        let table = bytes_to_unicode();
        let mut order: Vec<u8> = (0..=255).collect();
        order.sort_by_key(|&b| table[b as usize]);
        order
    }

    /// A tiny real byte-level BPE: 256 byte tokens, merges he, ll, hell, Ġw, then <|endoftext|>.
    fn write_tiny_bpe(dir: &Path) {
        let table = bytes_to_unicode();
        let mut vocab = serde_json::Map::new();
        for (id, b) in gpt2_byte_order().into_iter().enumerate() {
            vocab.insert(table[b as usize].to_string(), id.into());
        }
        let merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w")];
        for (i, (a, b)) in merges.iter().enumerate() {
            vocab.insert(format!("{a}{b}"), (256 + i).into());
        }
        vocab.insert(ENDOFTEXT.into(), 260.into());
        fs::write(dir.join(VOCAB_FILE), serde_json::to_string(&vocab).unwrap()).unwrap();
        let lines: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        let text = format!("#version: 0.2\n{}\n", lines.join("\n"));
        fs::write(dir.join(MERGES_FILE), text).unwrap();
    }

    fn byte_id(b: u8) -> u32 {
        gpt2_byte_order().iter().position(|&x| x == b).unwrap() as u32
    }

    #[test]
    fn gpt2_matches_reference_vectors() {
        let tok = Tokenizer::gpt2().unwrap();
        assert_eq!(tok.kind(), "gpt2");
        assert_eq!(tok.vocab_size(), 50257);
        assert_eq!(tok.eot_token(), Some(50256));
        for (text, ids) in [
            ("Hello world!", vec![15496, 995, 0]),
            (
                "This is something more complex.",
                vec![1212, 318, 1223, 517, 3716, 13],
            ),
        ] {
            assert_eq!(tok.encode(text).unwrap(), ids);
            assert_eq!(tok.decode(&ids).unwrap(), text);
        }
    }

    #[test]
    fn gpt2_special_token_only_when_asked() {
        let tok = Tokenizer::gpt2().unwrap();
        let plain = tok.encode("a<|endoftext|>b").unwrap();
        assert!(!plain.contains(&50256));
        assert_eq!(tok.decode(&plain).unwrap(), "a<|endoftext|>b");
        let special = tok.encode_with_special("a<|endoftext|>b").unwrap();
        assert_eq!(special.len(), 3);
        assert_eq!(special[1], 50256);
        assert_eq!(tok.decode(&special).unwrap(), "a<|endoftext|>b");
        let err = tok.decode(&[50257]).unwrap_err().to_string();
        assert!(
            err.contains("50257") && err.contains("out of range"),
            "{err}"
        );
    }

    #[test]
    fn bytes_to_unicode_is_gpt2s() {
        let table = bytes_to_unicode();
        assert_eq!(table[b' ' as usize], 'Ġ');
        assert_eq!(table[b'\n' as usize], 'Ċ');
        assert_eq!(table[b'!' as usize], '!');
        assert_eq!(table[0], '\u{100}');
        assert_eq!(table.iter().collect::<BTreeSet<_>>().len(), 256);
        // GPT-2's ids 0..256 are the single bytes in this table's order.
        let core = tiktoken_rs::r50k_base_singleton();
        for (id, b) in gpt2_byte_order().into_iter().enumerate() {
            assert_eq!(core.decode_bytes(&[id as u32]).unwrap(), vec![b]);
        }
    }

    #[test]
    fn bpe_from_vocab_and_merges() {
        let dir = TempDir::new("bpe");
        write_tiny_bpe(&dir.0);
        let tok = Tokenizer::from_model_dir(&dir.0, 261).unwrap();
        assert_eq!(
            (tok.kind(), tok.vocab_size(), tok.eot_token()),
            ("gpt2", 261, Some(260))
        );
        let ids = tok.encode("hello world").unwrap();
        let [o, r, l, d] = [b'o', b'r', b'l', b'd'].map(byte_id);
        assert_eq!([o, r, l, d], [78, 81, 75, 67]);
        assert_eq!(ids, vec![258, o, 259, o, r, l, d]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world");
        assert_eq!(tok.encode_with_special("<|endoftext|>").unwrap(), vec![260]);
        assert!(!tok.encode("<|endoftext|>").unwrap().contains(&260));
        let text = "héllo\n\twörld  ✓";
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        assert!(tok.decode(&[261]).is_err());

        // Saving elsewhere copies both files; the copy loads the same tokenizer.
        let other = TempDir::new("bpe-copy");
        tok.save(&other.0).unwrap();
        tok.save(&dir.0).unwrap();
        let copy = Tokenizer::from_model_dir(&other.0, 261).unwrap();
        assert_eq!(copy.encode("hello world").unwrap(), ids);
        let err = Tokenizer::from_model_dir(&other.0, 262)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(VOCAB_FILE) && err.contains("261") && err.contains("262"),
            "{err}"
        );
    }

    #[test]
    fn bad_bpe_files_are_named_errors() {
        let dir = TempDir::new("bpe-bad");
        let (vocab, merges) = (dir.0.join(VOCAB_FILE), dir.0.join(MERGES_FILE));
        let load = || {
            Tokenizer::gpt2_from_files(&vocab, &merges)
                .unwrap_err()
                .to_string()
        };
        write_tiny_bpe(&dir.0);
        let good_vocab = fs::read_to_string(&vocab).unwrap();
        for (bad_merges, needle) in [
            ("#version: 0.2\nh e x\n", "line 2"),
            ("h\n", "line 1"),
            ("h  e\n", "line 1"),
            ("l l\nh e\n", "merge order"),
            ("q z\n", "\"qz\""),
        ] {
            fs::write(&merges, bad_merges).unwrap();
            let err = load();
            assert!(err.contains(MERGES_FILE) && err.contains(needle), "{err}");
        }
        fs::write(&merges, b"\xff\xfe").unwrap();
        assert!(load().contains(MERGES_FILE));
        fs::write(&merges, "h e\n").unwrap();
        let edit = |from: &str, to: &str| {
            fs::write(&vocab, good_vocab.replace(from, to)).unwrap();
            let err = load();
            assert!(err.contains(VOCAB_FILE), "{err}");
            err
        };
        assert!(edit("\"<|endoftext|>\":260", "\"<|endoftext|>\":999").contains("999"));
        assert!(edit("\"<|endoftext|>\":260", "\"<|endoftext|>\":0").contains("used by both"));
        assert!(edit("\"<|endoftext|>\"", "\"<|end|>\"").contains("<|endoftext|>"));
        assert!(edit("\"hell\":258", "\"hell\":-1").contains("expected a JSON object"));
        assert!(edit("\"Ġw\"", "\"x y\"").contains("' '"));
        assert!(edit("\"Ġ\":", "\"zz\":").contains("0x20"));
        assert!(edit("{", "[").contains("expected a JSON object"));
    }

    #[test]
    fn char_vocab_round_trip_and_unknown_char() {
        let tok = Tokenizer::char_from_text("hello world").unwrap();
        assert_eq!(
            tok.chars().unwrap(),
            [' ', 'd', 'e', 'h', 'l', 'o', 'r', 'w']
        );
        assert_eq!(
            (tok.kind(), tok.vocab_size(), tok.eot_token()),
            ("char", 8, None)
        );
        let ids = tok.encode("hello world").unwrap();
        assert_eq!(ids, vec![3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world");
        let err = tok.encode("held é").unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::UnknownChar {
                ch: 'é',
                position: 5,
                ..
            }
        ));
        assert!(err.to_string().contains("'é'") && err.to_string().contains("position 5"));
        assert!(tok.decode(&[8]).unwrap_err().to_string().contains('8'));
        assert!(matches!(
            Tokenizer::char_from_text(""),
            Err(TokenizerError::EmptyText)
        ));
    }

    #[test]
    fn char_vocab_save_and_load() {
        let dir = TempDir::new("char");
        let tok = Tokenizer::char_from_text("To be,\nor not\t\"é\"\u{0}!").unwrap();
        tok.save(&dir.0).unwrap();
        let json = fs::read_to_string(dir.0.join(CHARS_FILE)).unwrap();
        assert!(json.starts_with(r#"{"type": "char", "chars": ["\u0000","\t","\n"," ","!","\"""#));
        let back = Tokenizer::from_model_dir(&dir.0, tok.vocab_size()).unwrap();
        assert_eq!(back.chars(), tok.chars());
        let names: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [CHARS_FILE]);
    }

    #[test]
    fn bad_char_files_are_named_errors() {
        let dir = TempDir::new("char-bad");
        let path = dir.0.join(CHARS_FILE);
        for (content, needle) in [
            (&b"not json"[..], "expected"),
            (br#"{"type": "char", "chars": "abc"}"#, "expected"),
            (br#"{"type": "char", "chars": ["ab"]}"#, "expected"),
            (br#"{"type": "char", "chars": [1, 2]}"#, "expected"),
            (br#"{"chars": ["a"]}"#, "type"),
            (br#"{"type": "bpe", "chars": ["a"]}"#, "\"bpe\""),
            (
                br#"{"type": "char", "chars": ["a", "b", "a"]}"#,
                "'a' is listed twice (ids 0 and 2)",
            ),
            (br#"{"type": "char", "chars": []}"#, "empty"),
            (b"{\"type\": \"char\", \"chars\": [\"\xff\"]}", "expected"),
            (
                br#"{"type": "char", "chars": ["a", "b"]}"#,
                "holds 2 tokens but the model's vocab_size is 3",
            ),
        ] {
            fs::write(&path, content).unwrap();
            let err = Tokenizer::from_model_dir(&dir.0, 3)
                .unwrap_err()
                .to_string();
            assert!(err.contains(CHARS_FILE) && err.contains(needle), "{err}");
        }
    }

    #[test]
    fn empty_folder_falls_back_to_gpt2_only_for_its_size() {
        let dir = TempDir::new("empty");
        let err = Tokenizer::from_model_dir(&dir.0, 65)
            .unwrap_err()
            .to_string();
        for needle in [CHARS_FILE, VOCAB_FILE, MERGES_FILE, "65", "50257"] {
            assert!(err.contains(needle), "{err}");
        }
        let tok = Tokenizer::from_model_dir(&dir.0, 50257).unwrap();
        assert_eq!((tok.kind(), tok.vocab_size()), ("gpt2", 50257));
        tok.save(&dir.0).unwrap();
        assert_eq!(fs::read_dir(&dir.0).unwrap().count(), 0);
        fs::write(dir.0.join(VOCAB_FILE), "{}").unwrap();
        let err = Tokenizer::from_model_dir(&dir.0, 50257)
            .unwrap_err()
            .to_string();
        assert!(err.contains(MERGES_FILE), "{err}");
        assert!(Tokenizer::from_model_dir(&dir.0.join("nope"), 50257).is_err());
    }

    /// GPT-2's real `vocab.json` + `merges.txt` (e.g. a Hugging Face `gpt2` folder) give the same
    /// ids as the embedded ranks.
    #[test]
    #[ignore = "needs TAPELORA_GPT2_DIR: a folder with GPT-2's vocab.json and merges.txt"]
    fn real_gpt2_files_match_the_embedded_ranks() {
        let dir = PathBuf::from(std::env::var_os("TAPELORA_GPT2_DIR").expect("TAPELORA_GPT2_DIR"));
        let files = Tokenizer::from_model_dir(&dir, GPT2_VOCAB_SIZE).unwrap();
        assert!(matches!(
            &files,
            Tokenizer::Gpt2(Gpt2Bpe(BpeSource::Files { .. }))
        ));
        let embedded = Tokenizer::gpt2().unwrap();
        let text = "It's 2024: naïve café-goers ate 3.14 π's —  \n\n\t<|endoftext|> 日本語 🦀!";
        assert_eq!(files.encode(text).unwrap(), embedded.encode(text).unwrap());
        let special = files.encode_with_special(text).unwrap();
        assert_eq!(special, embedded.encode_with_special(text).unwrap());
        let ids: Vec<u32> = (0..GPT2_VOCAB_SIZE as u32).collect();
        assert_eq!(files.decode(&ids).unwrap(), embedded.decode(&ids).unwrap());
    }

    #[test]
    fn tokenizer_is_send_and_sync() {
        fn check<T: Send + Sync + Clone>() {}
        check::<Tokenizer>();
    }
}
