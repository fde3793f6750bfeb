//! `quorate server --restore FILE`: seeding a new cluster from a backup.
//!
//! Only the node that forms the cluster (the lowest id, checked by the
//! config) restores, and only into an empty `data_dir`: restoring over a
//! node's data would replace a state other nodes may share, and a restart
//! with the flag still given is refused rather than restoring again. The
//! file is read and checked whole (header, checksum, content) before
//! anything is written, so a corrupt or truncated file leaves the data
//! directory as it was. The state then goes in with every epoch bumped
//! (`quorate_core::Machine::restored`, by `restore_epoch_bump`) as this
//! node's first snapshot (`raft::state_machine::seed`); the other nodes
//! receive it by Raft.

use std::path::Path;

use quorate_core::Machine;
use tracing::info;

use super::ServerError;
use crate::config::ServerConfig;

/// The state to seed this node's store with, when `restore` is given;
/// refuses a data directory that holds anything.
pub fn prepare(config: &ServerConfig) -> Result<Option<Machine>, ServerError> {
    let path = &config.restore;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    ensure_empty(&config.data_dir)?;
    let backup = crate::backup::read_file(path)
        .map_err(|e| ServerError::Restore(format!("cannot restore from {}: {e}", path.display())))?;
    let machine = backup
        .machine
        .restored(config.restore_epoch_bump)
        .map_err(|e| ServerError::Restore(format!("cannot restore from {}: {e}", path.display())))?;
    info!(
        file = %path.display(),
        revision = backup.revision,
        taken_at_unix_ms = backup.taken_at_unix_ms,
        groups = machine.groups().count(),
        leases = machine.lease_count(),
        epoch_bump = config.restore_epoch_bump,
        max_epoch_in_backup = backup.machine.max_epoch(),
        "restoring a new cluster from a backup: every lease starts free at its epoch + restore_epoch_bump"
    );
    Ok(Some(machine))
}

/// A directory that does not exist yet, or holds nothing.
fn ensure_empty(dir: &Path) -> Result<(), ServerError> {
    let mut entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(ServerError::DataDir { path: dir.display().to_string(), source }),
    };
    if entries.next().is_some() {
        return Err(ServerError::Restore(format!(
            "data_dir {} is not empty: a restore seeds a new cluster and only goes into an empty data directory \
             (a node that already runs keeps its data: start it without --restore)",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{Backup, encode, write_file_atomic};

    fn config(dir: &Path, restore: &Path) -> ServerConfig {
        ServerConfig {
            node_id: 1,
            listen: "127.0.0.1:7101".into(),
            data_dir: dir.join("node-1"),
            peers: "1=127.0.0.1:7101,2=127.0.0.1:7102,3=127.0.0.1:7103".into(),
            insecure: true,
            restore: restore.to_owned(),
            ..ServerConfig::default()
        }
    }

    #[test]
    fn only_a_good_file_into_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("b.snap");
        let b = Backup {
            machine: Machine::new(),
            revision: 9,
            served_by: 1,
            taken_at_unix_ms: 0,
            quorate_version: "t".into(),
        };
        let bytes = encode(&b).unwrap();
        write_file_atomic(&file, &bytes).unwrap();
        let c = config(dir.path(), &file);
        assert_eq!(prepare(&c).unwrap().unwrap().epoch_floor(), 1_000_000, "the floor is bumped too");
        std::fs::create_dir_all(&c.data_dir).unwrap();
        assert!(prepare(&c).unwrap().is_some(), "an empty directory is fine");
        std::fs::write(c.data_dir.join("raft.redb"), b"x").unwrap();
        let e = prepare(&c).unwrap_err().to_string();
        assert!(e.starts_with(&format!("data_dir {} is not empty", c.data_dir.display())), "{e}");
        // A truncated file is refused, naming the file and what is wrong.
        std::fs::remove_dir_all(&c.data_dir).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 3]).unwrap();
        let e = prepare(&c).unwrap_err().to_string();
        assert!(e.contains("b.snap: the snapshot is truncated"), "{e}");
        assert!(!c.data_dir.exists(), "nothing written");
        assert!(prepare(&config(dir.path(), Path::new(""))).unwrap().is_none());
    }
}
