//! Checkpoint manifests: what a checkpoint directory holds, hashed so that any changed byte
//! (tensor data, header, padding, config) is caught and named, and signed by the coordinator
//! and the replicas that agreed on it.
//!
//! Hashes: each safetensors file's header (the 8-byte length prefix plus the JSON with its
//! padding) has one blake3 hash; each tensor's data is hashed in chunks of `chunk_size`
//! bytes; other files (config.json) are hashed in chunks too; every file also has a
//! whole-file hash. The checkpoint's root is a blake3 (derive-key mode) over a
//! length-prefixed encoding of all of these, so it is independent of protobuf and is what
//! replicas report as their weight root.
//!
//! Signatures: ed25519 over `"potluck/manifest/v1" || blake3(body)`, where `body` is the
//! exact stored bytes of the encoded [`ManifestBody`]; a body is accepted only if it is the
//! canonical encoding of what it decodes to, which refuses unknown fields and every other
//! second spelling of the same content.

use crate::round::{CommitRecord, Contributor};
use crate::safetensors_header::{self, HeaderError};
use crate::{Hash32, PeerId};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use potluck_proto::{DecodeError, decode_limited, invalid, v1};
use prost::Message;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// The signed manifest's file name inside a checkpoint directory.
pub const MANIFEST_FILE: &str = "manifest.pb";
/// The signed run manifest's file name inside a checkpoint directory.
pub const RUN_FILE: &str = "run.pb";
/// Chunk size used unless told otherwise: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Largest encoded signed manifest accepted (a 1 TB checkpoint in 1 MiB chunks is ~32 MiB).
pub const MAX_MANIFEST_BYTES: usize = 64 << 20;
pub const MAX_FILES: usize = 4096;
pub const MAX_CONTRIBUTORS: usize = 1 << 20;
pub const MAX_SIGNATURES: usize = 1 << 16;
pub const MAX_NAME_LEN: usize = 1024;
pub const FORMAT_VERSION: u32 = 1;

const ROOT_CONTEXT: &str = "potluck 2026 checkpoint root v1";
const SIGNATURE_DOMAIN: &[u8] = b"potluck/manifest/v1";

/// What can go wrong making, reading or signing a manifest.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: safetensors header: {source}")]
    Header {
        path: PathBuf,
        #[source]
        source: HeaderError,
    },
    #[error(
        "{path}: not a regular file (links and subdirectories are not allowed in a checkpoint)"
    )]
    NotAFile { path: PathBuf },
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("signature {index} (key {key}): invalid")]
    BadSignature { index: usize, key: String },
    #[error("key {key} signed twice")]
    DuplicateSigner { key: String },
    #[error("invalid secret key: {0}")]
    Key(String),
    #[error("checkpoint directory holds more than {MAX_FILES} files")]
    TooManyFiles,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a file of a checkpoint is hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Safetensors,
    Opaque,
}

/// One tensor of a safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRecord {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<u64>,
    pub data_begin: u64,
    pub data_end: u64,
    pub chunk_hashes: Vec<Hash32>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub path: String,
    pub kind: FileKind,
    pub size: u64,
    pub file_hash: Hash32,
    /// Safetensors only (0 and zero hash otherwise).
    pub header_len: u64,
    pub header_hash: Hash32,
    pub tensors: Vec<TensorRecord>,
    /// Opaque files only.
    pub chunk_hashes: Vec<Hash32>,
}

/// Every file of a checkpoint with its hashes, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointContent {
    pub chunk_size: u32,
    pub files: Vec<FileRecord>,
}

/// What a hashed piece of a file is, for error messages and transfers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PieceLabel {
    Header,
    TensorChunk { tensor: String, chunk: u32 },
    FileChunk { chunk: u32 },
}

/// A byte range of one file with the hash it must have. The pieces of a file tile it exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Index into [`CheckpointContent::files`].
    pub file: usize,
    pub offset: u64,
    pub len: u64,
    pub hash: Hash32,
    pub label: PieceLabel,
}

fn chunk_count(len: u64, chunk_size: u32) -> u64 {
    len.div_ceil(u64::from(chunk_size))
}

/// Whether `name` may be a file name in a checkpoint directory.
pub fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
}

/// Hashes `(name, source)` pairs in name order with `hash_one`, after the checks a
/// directory's names would get (no reserved, duplicate or invalid name, at most
/// [`MAX_FILES`]); `path_of` names a refused one in the error.
fn hash_named<T>(
    files: &[(String, T)],
    chunk_size: u32,
    path_of: impl Fn(&str, &T) -> PathBuf,
    mut hash_one: impl FnMut(&str, &T, &mut [u8]) -> Result<FileRecord, ManifestError>,
) -> Result<CheckpointContent, ManifestError> {
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(invalid("chunk size", format!("{chunk_size} out of range")).into());
    }
    if files.len() > MAX_FILES {
        return Err(ManifestError::TooManyFiles);
    }
    let mut sorted: Vec<&(String, T)> = files.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut buf = vec![0u8; chunk_size as usize];
    let mut out = Vec::with_capacity(sorted.len());
    for (i, (name, source)) in sorted.iter().enumerate() {
        let reserved = name == MANIFEST_FILE || name == RUN_FILE;
        let duplicate = i > 0 && sorted[i - 1].0 == *name;
        if reserved || duplicate || !valid_file_name(name) {
            return Err(ManifestError::NotAFile {
                path: path_of(name, source),
            });
        }
        out.push(hash_one(name, source, &mut buf)?);
    }
    Ok(CheckpointContent {
        chunk_size,
        files: out,
    })
}

/// Hashes `len` bytes of `r` in `chunk_size` pieces, feeding the whole-file hasher too.
fn hash_chunks<R: Read>(
    r: &mut R,
    len: u64,
    chunk_size: u32,
    whole: &mut blake3::Hasher,
    buf: &mut [u8],
) -> std::io::Result<Vec<Hash32>> {
    let mut out = Vec::with_capacity(chunk_count(len, chunk_size) as usize);
    let mut left = len;
    while left > 0 {
        let n = left.min(u64::from(chunk_size)) as usize;
        let b = &mut buf[..n];
        r.read_exact(b)?;
        whole.update(b);
        out.push(blake3::hash(b).into());
        left -= n as u64;
    }
    Ok(out)
}

impl CheckpointContent {
    /// Hashes every file of the checkpoint directory `dir` (the manifest files excepted).
    pub fn scan(dir: &Path, chunk_size: u32) -> Result<Self, ManifestError> {
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(invalid("chunk size", format!("{chunk_size} out of range")).into());
        }
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let path = e.path();
            let name = e
                .file_name()
                .into_string()
                .map_err(|_| ManifestError::NotAFile { path: path.clone() })?;
            if name == MANIFEST_FILE || name == RUN_FILE {
                continue;
            }
            let ft = e.file_type().map_err(io(&path))?;
            if !ft.is_file() || !valid_file_name(&name) {
                return Err(ManifestError::NotAFile { path });
            }
            names.push(name);
            if names.len() > MAX_FILES {
                return Err(ManifestError::TooManyFiles);
            }
        }
        let named: Vec<(String, PathBuf)> = names
            .into_iter()
            .map(|name| {
                let path = dir.join(&name);
                (name, path)
            })
            .collect();
        Self::of_files(&named, chunk_size)
    }

    /// Hashes files that lie elsewhere as if they were in one checkpoint directory under the
    /// names given, `(name, path)`: the content a directory holding copies of them would
    /// have. A run's data package is pinned this way before any copy exists.
    pub fn of_files(files: &[(String, PathBuf)], chunk_size: u32) -> Result<Self, ManifestError> {
        hash_named(
            files,
            chunk_size,
            |_, path| path.clone(),
            |name, path, buf| hash_file(path, name.to_string(), chunk_size, buf),
        )
    }

    /// Hashes a checkpoint held in memory as `(file name, bytes)`, exactly as [`Self::scan`]
    /// would hash the same files written to a directory: a replica computes the root of the
    /// checkpoint its state would be without writing it.
    pub fn from_files(files: &[(String, Vec<u8>)], chunk_size: u32) -> Result<Self, ManifestError> {
        hash_named(
            files,
            chunk_size,
            |name, _| PathBuf::from(name),
            |name, bytes, buf| {
                let len = bytes.len() as u64;
                hash_reader(
                    bytes.as_slice(),
                    len,
                    Path::new(name),
                    name.to_string(),
                    chunk_size,
                    buf,
                )
            },
        )
    }

    /// The checkpoint's root hash.
    pub fn root(&self) -> Hash32 {
        let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
        let put_u64 = |h: &mut blake3::Hasher, v: u64| {
            h.update(&v.to_le_bytes());
        };
        let put_str = |h: &mut blake3::Hasher, s: &str| {
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        };
        let put_hashes = |h: &mut blake3::Hasher, v: &[Hash32]| {
            h.update(&(v.len() as u64).to_le_bytes());
            for x in v {
                h.update(&x.0);
            }
        };
        put_u64(&mut h, u64::from(self.chunk_size));
        put_u64(&mut h, self.files.len() as u64);
        for f in &self.files {
            put_str(&mut h, &f.path);
            put_u64(&mut h, f.kind as u64);
            put_u64(&mut h, f.size);
            h.update(&f.file_hash.0);
            put_u64(&mut h, f.header_len);
            h.update(&f.header_hash.0);
            put_u64(&mut h, f.tensors.len() as u64);
            for t in &f.tensors {
                put_str(&mut h, &t.name);
                put_str(&mut h, &t.dtype);
                put_u64(&mut h, t.shape.len() as u64);
                for d in &t.shape {
                    put_u64(&mut h, *d);
                }
                put_u64(&mut h, t.data_begin);
                put_u64(&mut h, t.data_end);
                put_hashes(&mut h, &t.chunk_hashes);
            }
            put_hashes(&mut h, &f.chunk_hashes);
        }
        h.finalize().into()
    }

    /// Every hashed piece of every file, in file order and offset order.
    pub fn pieces(&self) -> Vec<Piece> {
        let cs = u64::from(self.chunk_size);
        let mut out = Vec::new();
        for (fi, f) in self.files.iter().enumerate() {
            match f.kind {
                FileKind::Safetensors => {
                    out.push(Piece {
                        file: fi,
                        offset: 0,
                        len: 8 + f.header_len,
                        hash: f.header_hash,
                        label: PieceLabel::Header,
                    });
                    let start = 8 + f.header_len;
                    for t in &f.tensors {
                        for (ci, h) in t.chunk_hashes.iter().enumerate() {
                            let off = t.data_begin + ci as u64 * cs;
                            out.push(Piece {
                                file: fi,
                                offset: start + off,
                                len: cs.min(t.data_end - off),
                                hash: *h,
                                label: PieceLabel::TensorChunk {
                                    tensor: t.name.clone(),
                                    chunk: ci as u32,
                                },
                            });
                        }
                    }
                }
                FileKind::Opaque => {
                    for (ci, h) in f.chunk_hashes.iter().enumerate() {
                        let off = ci as u64 * cs;
                        out.push(Piece {
                            file: fi,
                            offset: off,
                            len: cs.min(f.size - off),
                            hash: *h,
                            label: PieceLabel::FileChunk { chunk: ci as u32 },
                        });
                    }
                }
            }
        }
        out
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

fn hash_file(
    path: &Path,
    name: String,
    chunk_size: u32,
    buf: &mut [u8],
) -> Result<FileRecord, ManifestError> {
    let f = File::open(path).map_err(io(path))?;
    let size = f.metadata().map_err(io(path))?.len();
    let r = BufReader::with_capacity(1 << 20, f);
    hash_reader(r, size, path, name, chunk_size, buf)
}

/// Hashes one file's `size` bytes read from `r`; `path` names it in errors.
fn hash_reader<R: Read>(
    mut r: R,
    size: u64,
    path: &Path,
    name: String,
    chunk_size: u32,
    buf: &mut [u8],
) -> Result<FileRecord, ManifestError> {
    let mut whole = blake3::Hasher::new();
    let rec = if name.ends_with(".safetensors") {
        let header = safetensors_header::read_header(&mut r, size).map_err(|source| {
            ManifestError::Header {
                path: path.to_path_buf(),
                source,
            }
        })?;
        whole.update(&header.raw);
        let mut tensors = Vec::with_capacity(header.tensors.len());
        for t in header.tensors {
            let chunk_hashes = hash_chunks(
                &mut r,
                t.data_end - t.data_begin,
                chunk_size,
                &mut whole,
                buf,
            )
            .map_err(io(path))?;
            tensors.push(TensorRecord {
                name: t.name,
                dtype: t.dtype,
                shape: t.shape,
                data_begin: t.data_begin,
                data_end: t.data_end,
                chunk_hashes,
            });
        }
        FileRecord {
            path: name,
            kind: FileKind::Safetensors,
            size,
            file_hash: Hash32::default(),
            header_len: header.header_len,
            header_hash: blake3::hash(&header.raw).into(),
            tensors,
            chunk_hashes: Vec::new(),
        }
    } else {
        let chunk_hashes =
            hash_chunks(&mut r, size, chunk_size, &mut whole, buf).map_err(io(path))?;
        FileRecord {
            path: name,
            kind: FileKind::Opaque,
            size,
            file_hash: Hash32::default(),
            header_len: 0,
            header_hash: Hash32::default(),
            tensors: Vec::new(),
            chunk_hashes,
        }
    };
    Ok(FileRecord {
        file_hash: whole.finalize().into(),
        ..rec
    })
}

/// The signed content of a checkpoint manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestBody {
    pub run_id: Hash32,
    pub round: u64,
    /// The previous commit's round and root; `None` for the run's first checkpoint.
    pub parent: Option<(u64, Hash32)>,
    pub root: Hash32,
    pub content: CheckpointContent,
    /// Sorted by peer id.
    pub contributors: Vec<Contributor>,
    pub coordinator_key: [u8; 32],
}

impl ManifestBody {
    /// The body for the checkpoint in `dir` that `commit` committed. Fails when the
    /// directory's root is not the committed root: this replica does not hold what the
    /// quorum agreed on.
    pub fn for_commit(
        dir: &Path,
        chunk_size: u32,
        run_id: Hash32,
        commit: &CommitRecord,
        coordinator_key: [u8; 32],
    ) -> Result<Self, ManifestError> {
        let content = CheckpointContent::scan(dir, chunk_size)?;
        let root = content.root();
        if root != commit.root {
            return Err(invalid(
                "checkpoint",
                format!(
                    "directory root {} differs from the committed root {} of round {}",
                    root.short(),
                    commit.root.short(),
                    commit.round
                ),
            )
            .into());
        }
        Ok(ManifestBody {
            run_id,
            round: commit.round,
            parent: commit.parent,
            root,
            content,
            contributors: commit.agreeing.clone(),
            coordinator_key,
        })
    }

    /// Encodes the body; these exact bytes are what gets signed and stored.
    pub fn encode(&self) -> Vec<u8> {
        self.to_wire().encode_to_vec()
    }

    fn to_wire(&self) -> v1::ManifestBody {
        let cat = |v: &[Hash32]| v.iter().flat_map(|h| h.0).collect::<Vec<u8>>();
        v1::ManifestBody {
            format_version: FORMAT_VERSION,
            run_id: self.run_id.0.to_vec(),
            round: self.round,
            parent_root: self.parent.map(|p| p.1.0.to_vec()).unwrap_or_default(),
            parent_round: self.parent.map(|p| p.0).unwrap_or(0),
            root: self.root.0.to_vec(),
            chunk_size: self.content.chunk_size,
            files: self
                .content
                .files
                .iter()
                .map(|f| v1::FileEntry {
                    path: f.path.clone(),
                    kind: match f.kind {
                        FileKind::Safetensors => v1::FileKind::Safetensors,
                        FileKind::Opaque => v1::FileKind::Opaque,
                    } as i32,
                    size: f.size,
                    file_hash: f.file_hash.0.to_vec(),
                    header_len: f.header_len,
                    header_hash: match f.kind {
                        FileKind::Safetensors => f.header_hash.0.to_vec(),
                        FileKind::Opaque => Vec::new(),
                    },
                    tensors: f
                        .tensors
                        .iter()
                        .map(|t| v1::TensorEntry {
                            name: t.name.clone(),
                            dtype: t.dtype.clone(),
                            shape: t.shape.clone(),
                            data_begin: t.data_begin,
                            data_end: t.data_end,
                            chunk_hashes: cat(&t.chunk_hashes),
                        })
                        .collect(),
                    chunk_hashes: cat(&f.chunk_hashes),
                })
                .collect(),
            contributors: self
                .contributors
                .iter()
                .map(|c| v1::Contributor {
                    peer_id: c.peer.0.clone(),
                    update_hash: c.update_hash.0.to_vec(),
                    tokens: c.tokens,
                })
                .collect(),
            coordinator_key: self.coordinator_key.to_vec(),
        }
    }

    /// Decodes and checks body bytes: size limit, canonical encoding, every field's shape,
    /// and that `root` is the root of the listed content.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let wire: v1::ManifestBody = decode_limited("manifest body", bytes, MAX_MANIFEST_BYTES)?;
        if wire.encode_to_vec() != bytes {
            return Err(invalid(
                "manifest body",
                "not canonically encoded (unknown fields or non-canonical field order)",
            )
            .into());
        }
        Ok(Self::try_from(wire)?)
    }
}

fn split_hashes(what: &'static str, b: &[u8], expected: u64) -> Result<Vec<Hash32>, DecodeError> {
    if b.len() as u64 != expected.saturating_mul(32) {
        return Err(invalid(
            what,
            format!(
                "{} bytes of chunk hashes, expected {expected} hashes",
                b.len()
            ),
        ));
    }
    Ok(b.chunks_exact(32)
        .map(|c| {
            let mut a = [0u8; 32];
            a.copy_from_slice(c);
            Hash32(a)
        })
        .collect())
}

fn key32(what: &'static str, b: &[u8]) -> Result<[u8; 32], DecodeError> {
    Ok(Hash32::from_slice(what, b)?.0)
}

impl TryFrom<v1::ManifestBody> for ManifestBody {
    type Error = DecodeError;

    fn try_from(w: v1::ManifestBody) -> Result<Self, DecodeError> {
        if w.format_version != FORMAT_VERSION {
            return Err(invalid(
                "manifest body",
                format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    w.format_version
                ),
            ));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&w.chunk_size) {
            return Err(invalid(
                "manifest body",
                format!("chunk size {}", w.chunk_size),
            ));
        }
        if w.files.len() > MAX_FILES || w.contributors.len() > MAX_CONTRIBUTORS {
            return Err(invalid("manifest body", "too many files or contributors"));
        }
        let cs = w.chunk_size;
        let mut files = Vec::with_capacity(w.files.len());
        for f in w.files {
            if !valid_file_name(&f.path) || f.path == MANIFEST_FILE || f.path == RUN_FILE {
                return Err(invalid("file entry", format!("bad file name {:?}", f.path)));
            }
            if let Some(prev) = files.last().map(|p: &FileRecord| p.path.as_str())
                && prev >= f.path.as_str()
            {
                return Err(invalid("file entry", "files not sorted by name"));
            }
            let file_hash = Hash32::from_slice("file hash", &f.file_hash)?;
            let kind = match v1::FileKind::try_from(f.kind) {
                Ok(v1::FileKind::Safetensors) => FileKind::Safetensors,
                Ok(v1::FileKind::Opaque) => FileKind::Opaque,
                _ => return Err(invalid("file entry", format!("{}: unknown kind", f.path))),
            };
            let rec = match kind {
                FileKind::Opaque => {
                    if !f.tensors.is_empty() || f.header_len != 0 || !f.header_hash.is_empty() {
                        return Err(invalid(
                            "file entry",
                            format!("{}: opaque file with a header", f.path),
                        ));
                    }
                    FileRecord {
                        chunk_hashes: split_hashes(
                            "file entry",
                            &f.chunk_hashes,
                            chunk_count(f.size, cs),
                        )?,
                        path: f.path,
                        kind,
                        size: f.size,
                        file_hash,
                        header_len: 0,
                        header_hash: Hash32::default(),
                        tensors: Vec::new(),
                    }
                }
                FileKind::Safetensors => {
                    if !f.chunk_hashes.is_empty()
                        || f.header_len > safetensors_header::MAX_HEADER_LEN
                    {
                        return Err(invalid(
                            "file entry",
                            format!("{}: bad safetensors entry", f.path),
                        ));
                    }
                    if f.tensors.len() > safetensors_header::MAX_TENSORS {
                        return Err(invalid(
                            "file entry",
                            format!("{}: too many tensors", f.path),
                        ));
                    }
                    let data_len = f.size.checked_sub(8 + f.header_len).ok_or_else(|| {
                        invalid("file entry", format!("{}: smaller than its header", f.path))
                    })?;
                    let mut at = 0u64;
                    let mut tensors = Vec::with_capacity(f.tensors.len());
                    for t in f.tensors {
                        let bad = |r: &str| {
                            invalid("tensor entry", format!("{}/{}: {r}", f.path, t.name))
                        };
                        if t.name.len() > MAX_NAME_LEN || t.dtype.len() > 32 {
                            return Err(bad("name too long"));
                        }
                        if t.shape.len() > safetensors_header::MAX_RANK {
                            return Err(bad("too many dimensions"));
                        }
                        if t.data_begin != at || t.data_end < t.data_begin {
                            return Err(bad("tensors do not tile the data section"));
                        }
                        let elem = safetensors_header::dtype_size(&t.dtype)
                            .ok_or_else(|| bad("unknown dtype"))?;
                        let bytes = t.shape.iter().try_fold(elem, |a, d| a.checked_mul(*d));
                        if bytes != Some(t.data_end - t.data_begin) {
                            return Err(bad("shape does not match data offsets"));
                        }
                        at = t.data_end;
                        tensors.push(TensorRecord {
                            chunk_hashes: split_hashes(
                                "tensor entry",
                                &t.chunk_hashes,
                                chunk_count(t.data_end - t.data_begin, cs),
                            )?,
                            name: t.name,
                            dtype: t.dtype,
                            shape: t.shape,
                            data_begin: t.data_begin,
                            data_end: t.data_end,
                        });
                    }
                    if at != data_len {
                        return Err(invalid(
                            "file entry",
                            format!("{}: tensors do not cover the data section", f.path),
                        ));
                    }
                    FileRecord {
                        header_hash: Hash32::from_slice("header hash", &f.header_hash)?,
                        path: f.path,
                        kind,
                        size: f.size,
                        file_hash,
                        header_len: f.header_len,
                        tensors,
                        chunk_hashes: Vec::new(),
                    }
                }
            };
            files.push(rec);
        }
        let mut contributors = Vec::with_capacity(w.contributors.len());
        for c in w.contributors {
            let peer = PeerId::from_wire(&c.peer_id)?;
            if contributors
                .last()
                .is_some_and(|p: &Contributor| p.peer >= peer)
            {
                return Err(invalid(
                    "contributor",
                    "not sorted by peer id or listed twice",
                ));
            }
            contributors.push(Contributor {
                peer,
                tokens: c.tokens,
                update_hash: Hash32::from_slice("update hash", &c.update_hash)?,
            });
        }
        let parent = if w.parent_root.is_empty() {
            if w.parent_round != 0 {
                return Err(invalid("manifest body", "parent round without parent root"));
            }
            None
        } else {
            if w.parent_round >= w.round {
                return Err(invalid(
                    "manifest body",
                    "parent round not before the round",
                ));
            }
            Some((
                w.parent_round,
                Hash32::from_slice("parent root", &w.parent_root)?,
            ))
        };
        let content = CheckpointContent {
            chunk_size: cs,
            files,
        };
        let root = Hash32::from_slice("root", &w.root)?;
        if content.root() != root {
            return Err(invalid(
                "manifest body",
                "root is not the root of the listed files",
            ));
        }
        Ok(ManifestBody {
            run_id: Hash32::from_slice("run id", &w.run_id)?,
            round: w.round,
            parent,
            root,
            content,
            contributors,
            coordinator_key: key32("coordinator key", &w.coordinator_key)?,
        })
    }
}

/// Who signed a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignerRole {
    Coordinator,
    Replica,
}

/// One ed25519 signature over a manifest body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSignature {
    pub role: SignerRole,
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

/// The message an ed25519 key signs for a body: a domain tag and the body's blake3.
pub fn signing_message(body_bytes: &[u8]) -> Vec<u8> {
    let mut m = SIGNATURE_DOMAIN.to_vec();
    m.extend_from_slice(blake3::hash(body_bytes).as_bytes());
    m
}

/// The signing key for 32 raw secret-key bytes (a libp2p ed25519 identity's secret).
pub fn signing_key(secret_key: &[u8; 32]) -> SigningKey {
    SigningKey::from_bytes(secret_key)
}

/// The 32 secret-key bytes of a 64-byte ed25519 keypair encoding (secret then public, as
/// libp2p's `ed25519::Keypair::to_bytes` writes it); refuses a pair whose halves disagree.
pub fn secret_from_keypair_bytes(keypair: &[u8; 64]) -> Result<[u8; 32], ManifestError> {
    SigningKey::from_keypair_bytes(keypair)
        .map(|k| k.to_bytes())
        .map_err(|e| ManifestError::Key(e.to_string()))
}

/// The public key of 32 raw secret-key bytes.
pub fn public_key(secret_key: &[u8; 32]) -> [u8; 32] {
    SigningKey::from_bytes(secret_key)
        .verifying_key()
        .to_bytes()
}

impl ManifestSignature {
    /// Signs `body_bytes` with a raw 32-byte ed25519 secret key.
    pub fn sign(body_bytes: &[u8], role: SignerRole, secret_key: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(secret_key);
        ManifestSignature {
            role,
            public_key: key.verifying_key().to_bytes(),
            signature: key.sign(&signing_message(body_bytes)).to_bytes(),
        }
    }

    /// Checks the signature over `body_bytes` (strict ed25519 verification).
    pub fn verify(&self, body_bytes: &[u8]) -> bool {
        let Ok(key) = VerifyingKey::from_bytes(&self.public_key) else {
            return false;
        };
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature);
        key.verify_strict(&signing_message(body_bytes), &sig)
            .is_ok()
    }
}

impl ManifestSignature {
    /// The signature alone on the wire (a replica sends it to the coordinator).
    pub fn encode(&self) -> Vec<u8> {
        self.to_wire().encode_to_vec()
    }

    fn to_wire(&self) -> v1::ManifestSignature {
        v1::ManifestSignature {
            role: match self.role {
                SignerRole::Coordinator => v1::SignerRole::Coordinator,
                SignerRole::Replica => v1::SignerRole::Replica,
            } as i32,
            public_key: self.public_key.to_vec(),
            signature: self.signature.to_vec(),
        }
    }

    /// Decodes a signature received alone; verify it with [`SignedManifest::add_signature`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let w: v1::ManifestSignature = decode_limited("manifest signature", bytes, 256)?;
        Ok(Self::try_from(w)?)
    }
}

impl TryFrom<v1::ManifestSignature> for ManifestSignature {
    type Error = DecodeError;

    fn try_from(s: v1::ManifestSignature) -> Result<Self, DecodeError> {
        let role = match v1::SignerRole::try_from(s.role) {
            Ok(v1::SignerRole::Coordinator) => SignerRole::Coordinator,
            Ok(v1::SignerRole::Replica) => SignerRole::Replica,
            _ => return Err(invalid("manifest signature", "unknown signer role")),
        };
        let public_key = key32("public key", &s.public_key)?;
        let signature: [u8; 64] = s
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| invalid("manifest signature", "signature is not 64 bytes"))?;
        Ok(ManifestSignature {
            role,
            public_key,
            signature,
        })
    }
}

/// A manifest body with its exact bytes and the signatures over them. Every signature held
/// has been verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedManifest {
    body_bytes: Vec<u8>,
    body: ManifestBody,
    signatures: Vec<ManifestSignature>,
}

impl SignedManifest {
    /// An unsigned manifest for `body`.
    pub fn new(body: ManifestBody) -> Self {
        SignedManifest {
            body_bytes: body.encode(),
            body,
            signatures: Vec::new(),
        }
    }

    /// Signs with a raw 32-byte ed25519 secret key and keeps the signature. A coordinator
    /// signature must come from the body's coordinator key.
    pub fn sign(&mut self, role: SignerRole, secret_key: &[u8; 32]) -> Result<(), ManifestError> {
        let sig = ManifestSignature::sign(&self.body_bytes, role, secret_key);
        self.add_signature(sig)
    }

    /// Adds a signature received from another signer after verifying it.
    pub fn add_signature(&mut self, sig: ManifestSignature) -> Result<(), ManifestError> {
        let index = self.signatures.len();
        if index >= MAX_SIGNATURES {
            return Err(invalid("signed manifest", "too many signatures").into());
        }
        if !sig.verify(&self.body_bytes)
            || (sig.role == SignerRole::Coordinator && sig.public_key != self.body.coordinator_key)
        {
            return Err(ManifestError::BadSignature {
                index,
                key: hex::encode(sig.public_key),
            });
        }
        if self
            .signatures
            .iter()
            .any(|s| s.public_key == sig.public_key)
        {
            return Err(ManifestError::DuplicateSigner {
                key: hex::encode(sig.public_key),
            });
        }
        self.signatures.push(sig);
        Ok(())
    }

    pub fn body(&self) -> &ManifestBody {
        &self.body
    }

    /// The exact signed bytes.
    pub fn body_bytes(&self) -> &[u8] {
        &self.body_bytes
    }

    pub fn signatures(&self) -> &[ManifestSignature] {
        &self.signatures
    }

    /// blake3 of the body bytes: the manifest's id.
    pub fn id(&self) -> Hash32 {
        blake3::hash(&self.body_bytes).into()
    }

    /// Whether the body's coordinator signed it.
    pub fn coordinator_signed(&self) -> bool {
        self.signatures
            .iter()
            .any(|s| s.role == SignerRole::Coordinator && s.public_key == self.body.coordinator_key)
    }

    /// Replica keys that signed it.
    pub fn replica_signers(&self) -> impl Iterator<Item = &[u8; 32]> {
        self.signatures
            .iter()
            .filter(|s| s.role == SignerRole::Replica)
            .map(|s| &s.public_key)
    }

    pub fn encode(&self) -> Vec<u8> {
        v1::SignedManifest {
            body: self.body_bytes.clone(),
            signatures: self.signatures.iter().map(|s| s.to_wire()).collect(),
        }
        .encode_to_vec()
    }

    /// Decodes a stored or received signed manifest and verifies every signature in it
    /// against the stored body bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, ManifestError> {
        let wire: v1::SignedManifest =
            decode_limited("signed manifest", bytes, MAX_MANIFEST_BYTES)?;
        if wire.signatures.len() > MAX_SIGNATURES {
            return Err(invalid("signed manifest", "too many signatures").into());
        }
        if wire.encode_to_vec() != bytes {
            return Err(invalid(
                "signed manifest",
                "not canonically encoded (unknown fields?)",
            )
            .into());
        }
        let body = ManifestBody::decode(&wire.body)?;
        let mut m = SignedManifest {
            body_bytes: wire.body,
            body,
            signatures: Vec::with_capacity(wire.signatures.len()),
        };
        for (index, s) in wire.signatures.into_iter().enumerate() {
            let key = hex::encode(&s.public_key);
            let sig = ManifestSignature::try_from(s)
                .map_err(|_| ManifestError::BadSignature { index, key })?;
            m.add_signature(sig)?;
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;

    #[test]
    fn replica_signature_travels_alone_and_is_checked() {
        let t = tempfile::tempdir().unwrap();
        let (run, ms) = chain(t.path(), 1);
        let mut m = SignedManifest::new(ms[0].body().clone());
        let sig = ManifestSignature::sign(m.body_bytes(), SignerRole::Replica, &REPLICA);
        let back = ManifestSignature::decode(&sig.encode()).unwrap();
        m.add_signature(back.clone()).unwrap();
        assert!(matches!(
            m.add_signature(back),
            Err(ManifestError::DuplicateSigner { .. })
        ));
        // A signature over another body does not verify.
        let other = ManifestSignature::sign(b"other", SignerRole::Replica, &SUCC);
        assert!(matches!(
            m.add_signature(other),
            Err(ManifestError::BadSignature { .. })
        ));
        assert!(!m.coordinator_signed());
        m.sign(SignerRole::Coordinator, &COORD).unwrap();
        assert!(m.coordinator_signed());
        assert_eq!(SignedManifest::decode(&m.encode()).unwrap(), m);
        // write_manifest_files refuses an unsigned manifest and writes a signed one.
        let d = t.path().join("0");
        let unsigned = SignedManifest::new(ms[0].body().clone());
        assert!(crate::store::write_manifest_files(&d, &unsigned, &run).is_err());
        crate::store::write_manifest_files(&d, &m, &run).unwrap();
        crate::verify::verify_checkpoint_dir(&d, &Default::default()).unwrap();
    }

    #[test]
    fn in_memory_files_hash_like_the_directory() {
        let t = tempfile::tempdir().unwrap();
        write_model(t.path(), 1);
        std::fs::write(t.path().join("outer.bin"), vec![7u8; 10_000]).unwrap();
        let on_disk = CheckpointContent::scan(t.path(), MIN_CHUNK_SIZE).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.file_name().into_string().unwrap(),
                    std::fs::read(e.path()).unwrap(),
                )
            })
            .collect();
        files.reverse();
        let in_memory = CheckpointContent::from_files(&files, MIN_CHUNK_SIZE).unwrap();
        assert_eq!(in_memory, on_disk);
        assert_eq!(in_memory.root(), on_disk.root());
        // One flipped byte changes the root.
        files[0].1[3] ^= 1;
        let flipped = CheckpointContent::from_files(&files, MIN_CHUNK_SIZE);
        assert!(flipped.map(|c| c.root() != on_disk.root()).unwrap_or(true));
        // Names a directory could not hold, or the manifest's own, are refused.
        for bad in ["../x", "", MANIFEST_FILE] {
            let f = vec![(bad.to_string(), vec![1u8])];
            assert!(
                CheckpointContent::from_files(&f, MIN_CHUNK_SIZE).is_err(),
                "{bad}"
            );
        }
        let dup = vec![("a".to_string(), vec![1u8]), ("a".to_string(), vec![2u8])];
        assert!(CheckpointContent::from_files(&dup, MIN_CHUNK_SIZE).is_err());
    }

    #[test]
    fn files_hashed_in_place_under_other_names_hash_like_the_directory() {
        let t = tempfile::tempdir().unwrap();
        let (src, dir) = (t.path().join("src"), t.path().join("dir"));
        std::fs::create_dir_all(src.join("nested")).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
        let texts = [("nested/x.txt", vec![3u8; 9_000]), ("y.txt", vec![4u8; 10])];
        let mut named = Vec::new();
        for (i, (path, bytes)) in texts.iter().enumerate() {
            std::fs::write(src.join(path), bytes).unwrap();
            std::fs::write(dir.join(format!("text-{i}")), bytes).unwrap();
            named.push((format!("text-{i}"), src.join(path)));
        }
        named.reverse();
        let in_place = CheckpointContent::of_files(&named, MIN_CHUNK_SIZE).unwrap();
        assert_eq!(
            in_place,
            CheckpointContent::scan(&dir, MIN_CHUNK_SIZE).unwrap()
        );
        // The same rules on names as a directory's, and a missing file says which.
        let twice = vec![named[0].clone(), named[0].clone()];
        assert!(CheckpointContent::of_files(&twice, MIN_CHUNK_SIZE).is_err());
        let reserved = vec![(RUN_FILE.to_string(), named[0].1.clone())];
        assert!(CheckpointContent::of_files(&reserved, MIN_CHUNK_SIZE).is_err());
        let missing = vec![("a".to_string(), src.join("gone"))];
        let err = CheckpointContent::of_files(&missing, MIN_CHUNK_SIZE).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }

    #[test]
    fn keypair_bytes_are_accepted_and_checked() {
        let mut pair = [0u8; 64];
        pair[..32].copy_from_slice(&COORD);
        pair[32..].copy_from_slice(&public_key(&COORD));
        assert_eq!(secret_from_keypair_bytes(&pair).unwrap(), COORD);
        pair[40] ^= 1;
        assert!(matches!(
            secret_from_keypair_bytes(&pair),
            Err(ManifestError::Key(_))
        ));
    }

    #[test]
    fn body_for_a_commit_refuses_a_directory_with_other_weights() {
        let t = tempfile::tempdir().unwrap();
        write_model(t.path(), 1);
        let commit = crate::round::CommitRecord {
            round: 1,
            root: Hash32([9; 32]),
            parent: Some((0, Hash32([0; 32]))),
            participants: 1,
            agreeing: vec![],
        };
        let err = ManifestBody::for_commit(
            t.path(),
            CHUNK,
            Hash32([1; 32]),
            &commit,
            public_key(&COORD),
        );
        assert!(matches!(err, Err(ManifestError::Decode(_))));
    }
}
