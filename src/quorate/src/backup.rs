//! Backup files: the replicated state as `quorate snapshot save` writes it
//! and `quorate server --restore` reads it.
//!
//! A file is a fixed header followed by the state:
//!
//! | bytes | what |
//! | --- | --- |
//! | 0..8 | magic, `QRTSNAP` and a newline |
//! | 8..12 | format version, u32 little-endian ([`FORMAT_VERSION`]) |
//! | 12..20 | payload length in bytes, u64 little-endian |
//! | 20..52 | SHA-256 of the payload |
//! | 52.. | payload: [`Backup`] as JSON (the core machine's own encoding) |
//!
//! Decoding checks all of it before anything is used, and says what is
//! wrong: not a snapshot, a version this build does not read, truncated,
//! longer than its header says, a checksum mismatch, a payload that does
//! not decode. Files are bounded ([`MAX_BACKUP_BYTES`]) on both sides, and
//! written atomically (a temporary file beside the target, fsync, rename,
//! fsync of the directory), so a reader sees a whole file or none.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use quorate_core::Machine;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 8] = b"QRTSNAP\n";
/// The format this build writes, and the only one it reads.
pub const FORMAT_VERSION: u32 = 1;
/// The header's size: magic, version, length, checksum.
pub const HEADER_BYTES: usize = 8 + 4 + 8 + 32;
/// The largest backup file written or read. The state is held in memory
/// (and shipped as one Raft snapshot), so it stays far below this; the
/// bound keeps a wrong file from being read into memory whole.
pub const MAX_BACKUP_BYTES: u64 = 512 << 20;

/// What a backup holds: the state machine and where it was read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// The whole replicated state (groups, leases, epochs, elections).
    pub machine: Machine,
    /// The Raft log index the state was read at.
    pub revision: u64,
    /// The node (the leader) that read it.
    pub served_by: u64,
    /// When, on that node's wall clock (for people; never compared).
    pub taken_at_unix_ms: u64,
    /// The quorate version that wrote it.
    pub quorate_version: String,
}

/// Why a backup cannot be read or written. Every message says what is
/// wrong with the file, not only that something is.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {what}: {source}")]
    Io { path: String, what: &'static str, source: std::io::Error },
    #[error("the snapshot is {bytes} bytes; the limit is {limit} bytes (MAX_BACKUP_BYTES)")]
    TooLarge { bytes: u64, limit: u64 },
    #[error("not a quorate snapshot file: it does not start with the snapshot header")]
    BadMagic,
    #[error("snapshot format version {found} is not supported: this build reads version {supported}")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("the snapshot is truncated: {bytes} bytes, its header says {expected}")]
    Truncated { bytes: u64, expected: u64 },
    #[error("the snapshot has {extra} bytes after the {expected} its header says: not one whole snapshot file")]
    TrailingBytes { extra: u64, expected: u64 },
    #[error("the snapshot is corrupt: its SHA-256 is {actual}, its header says {expected}")]
    Checksum { expected: String, actual: String },
    #[error("the snapshot's content is not a quorate state: {0}")]
    Payload(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 of `bytes`, in hex (shown to people next to a saved file).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A backup as the bytes of its file.
pub fn encode(backup: &Backup) -> Result<Vec<u8>, BackupError> {
    let payload = serde_json::to_vec(backup).map_err(|e| BackupError::Payload(e.to_string()))?;
    let total = (HEADER_BYTES + payload.len()) as u64;
    if total > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge { bytes: total, limit: MAX_BACKUP_BYTES });
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks and decodes the bytes of a backup file.
pub fn decode(bytes: &[u8]) -> Result<Backup, BackupError> {
    let len = bytes.len() as u64;
    if len > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge { bytes: len, limit: MAX_BACKUP_BYTES });
    }
    // A file shorter than the magic may still be the start of one.
    let magic_len = bytes.len().min(MAGIC.len());
    if bytes[..magic_len] != MAGIC[..magic_len] {
        return Err(BackupError::BadMagic);
    }
    if bytes.len() < HEADER_BYTES {
        return Err(BackupError::Truncated { bytes: len, expected: HEADER_BYTES as u64 });
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(BackupError::UnsupportedVersion { found: version, supported: FORMAT_VERSION });
    }
    let payload_len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
    let expected = (HEADER_BYTES as u64).saturating_add(payload_len);
    if expected > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge { bytes: expected, limit: MAX_BACKUP_BYTES });
    }
    if len < expected {
        return Err(BackupError::Truncated { bytes: len, expected });
    }
    if len > expected {
        return Err(BackupError::TrailingBytes { extra: len - expected, expected });
    }
    let payload = &bytes[HEADER_BYTES..];
    let actual = Sha256::digest(payload);
    if actual[..] != bytes[20..52] {
        return Err(BackupError::Checksum { expected: hex(&bytes[20..52]), actual: hex(&actual) });
    }
    serde_json::from_slice(payload).map_err(|e| BackupError::Payload(e.to_string()))
}

fn io_error(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> BackupError + use<> {
    let path = path.display().to_string();
    move |source| BackupError::Io { path, what, source }
}

/// Reads and checks a backup file, reading no more than the bound.
pub fn read_file(path: &Path) -> Result<Backup, BackupError> {
    let file = std::fs::File::open(path).map_err(io_error(path, "cannot open"))?;
    let size = file.metadata().map_err(io_error(path, "cannot read"))?.len();
    if size > MAX_BACKUP_BYTES {
        return Err(BackupError::TooLarge { bytes: size, limit: MAX_BACKUP_BYTES });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // One byte past the bound, to tell a file that grew meanwhile.
    file.take(MAX_BACKUP_BYTES + 1).read_to_end(&mut bytes).map_err(io_error(path, "cannot read"))?;
    decode(&bytes)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory, flushed to disk, renamed over `path`, then the directory
/// flushed, so that `path` is the whole file or what it was before. The
/// temporary file is removed on failure.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if name.is_empty() {
        return Err(BackupError::Io {
            path: path.display().to_string(),
            what: "cannot write",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
        });
    }
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_error(&tmp, "cannot create"))?;
        f.write_all(bytes).map_err(io_error(&tmp, "cannot write"))?;
        f.sync_all().map_err(io_error(&tmp, "cannot flush"))?;
        std::fs::rename(&tmp, path).map_err(io_error(path, "cannot rename the temporary file to"))?;
        std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir, "cannot flush"))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorate_core::machine::{Command, LeaderStamp, LogPosition, Op};

    fn backup() -> Backup {
        let mut m = Machine::new();
        let stamp = LeaderStamp { node_id: 1, boot_id: 1, now_ms: 0, timing: Default::default(), wall_ms: 0 };
        let op = Op::Acquire { group: "orders".into(), holder: "svc".into(), ttl_ms: 1000 };
        m.apply(LogPosition { index: 1, term: 1, leader_node_id: 1 }, &Command { stamp, op });
        Backup { machine: m, revision: 1, served_by: 1, taken_at_unix_ms: 5, quorate_version: "test".into() }
    }

    #[test]
    fn a_backup_round_trips() {
        let b = backup();
        let bytes = encode(&b).unwrap();
        assert_eq!(&bytes[..8], MAGIC);
        assert_eq!(decode(&bytes).unwrap(), b);
    }

    #[test]
    fn every_kind_of_damage_is_named() {
        let bytes = encode(&backup()).unwrap();
        let msg = |b: &[u8]| decode(b).unwrap_err().to_string();
        // Truncated anywhere: in the header, or in the payload.
        for cut in [3, 8, 30, HEADER_BYTES, bytes.len() - 1] {
            let m = msg(&bytes[..cut]);
            assert!(m.starts_with("the snapshot is truncated"), "cut at {cut}: {m}");
        }
        assert!(msg(b"").starts_with("the snapshot is truncated"));
        let mut extra = bytes.clone();
        extra.push(b'x');
        assert!(msg(&extra).contains("1 bytes after"), "{}", msg(&extra));
        assert_eq!(
            msg(b"{\"machine\": {}}"),
            "not a quorate snapshot file: it does not start with the snapshot header"
        );
        let mut version = bytes.clone();
        version[8] = 2;
        assert_eq!(msg(&version), "snapshot format version 2 is not supported: this build reads version 1");
        let mut flipped = bytes.clone();
        let last = flipped.len() - 2;
        flipped[last] ^= 0x20;
        assert!(msg(&flipped).starts_with("the snapshot is corrupt: its SHA-256 is"), "{}", msg(&flipped));
        let mut huge = bytes.clone();
        huge[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(msg(&huge).contains("the limit is"), "{}", msg(&huge));
        // A well-formed file whose payload is not a state.
        let payload = b"[1,2,3]";
        let mut wrong = Vec::new();
        wrong.extend_from_slice(MAGIC);
        wrong.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        wrong.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        wrong.extend_from_slice(&Sha256::digest(payload));
        wrong.extend_from_slice(payload);
        assert!(msg(&wrong).starts_with("the snapshot's content is not a quorate state"), "{}", msg(&wrong));
    }

    #[test]
    fn files_are_written_whole_and_read_back_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("q.snap");
        let b = backup();
        write_file_atomic(&path, &encode(&b).unwrap()).unwrap();
        assert_eq!(read_file(&path).unwrap(), b);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("q.snap")], "no temporary file left behind");
        // A failed write leaves the old file as it was.
        let e = write_file_atomic(&dir.path().join("missing/q.snap"), b"x").unwrap_err();
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert_eq!(read_file(&path).unwrap(), b);
        let e = read_file(&dir.path().join("nope")).unwrap_err().to_string();
        assert!(e.contains("nope: cannot open"), "{e}");
        // Oversized files are refused before they are read.
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(MAX_BACKUP_BYTES + 1).unwrap();
        assert!(read_file(&big).unwrap_err().to_string().contains("the limit is"));
    }
}
