//! Validation of the names users choose: groups and holders.
//!
//! The API layer checks names before it proposes anything, and the state
//! machine checks them again on apply (it must be total: a bad command in the
//! log is rejected the same way on every replica, never a panic).

use serde::{Deserialize, Serialize};

/// The longest group or holder name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Member ids may not start with this (it names coordinators).
pub const COORDINATOR_PREFIX: &str = "coordinator-";

/// What a name names, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NameKind {
    /// A group's (and its lease's) name.
    Group,
    /// A lease holder's name.
    Holder,
    /// A group member's name.
    Member,
}

impl std::fmt::Display for NameKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameKind::Group => "group",
            NameKind::Holder => "holder",
            NameKind::Member => "member",
        })
    }
}

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("{kind} name must not be empty")]
    Empty {
        /// What the name names.
        kind: NameKind,
    },
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    #[error("{kind} name is {len} bytes long; the limit is {max} bytes", max = MAX_NAME_LEN)]
    TooLong {
        /// What the name names.
        kind: NameKind,
        /// Its length in bytes.
        len: usize,
    },
    /// The name has a character outside the allowed set (names go into
    /// Redis keys, log lines and URLs unquoted).
    #[error("{kind} name {name:?} contains {bad:?}; use letters, digits and . _ - : @ only")]
    BadCharacter {
        /// What the name names.
        kind: NameKind,
        /// The name as given.
        name: String,
        /// The first character refused.
        bad: char,
    },
}

/// Checks a group or holder name.
pub fn validate(kind: NameKind, name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty { kind });
    }
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::TooLong { kind, len: name.len() });
    }
    if let Some(bad) = name.chars().find(|c| !allowed(*c)) {
        return Err(NameError::BadCharacter { kind, name: name.to_owned(), bad });
    }
    Ok(())
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["cache", "G-1", "svc.primary", "host:7000", "a@b", "x".repeat(MAX_NAME_LEN).as_str()] {
            assert_eq!(validate(NameKind::Group, ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_bad_names_with_a_reason() {
        assert_eq!(validate(NameKind::Holder, ""), Err(NameError::Empty { kind: NameKind::Holder }));
        let long = "y".repeat(MAX_NAME_LEN + 1);
        assert_eq!(
            validate(NameKind::Group, &long),
            Err(NameError::TooLong { kind: NameKind::Group, len: MAX_NAME_LEN + 1 })
        );
        let err = validate(NameKind::Group, "a b").unwrap_err();
        assert_eq!(err.to_string(), "group name \"a b\" contains ' '; use letters, digits and . _ - : @ only");
    }
}
