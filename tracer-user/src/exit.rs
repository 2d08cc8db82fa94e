//! Exit statuses of the `nattrace` command and the error type that carries one.
//!
//! 0 results, 1 no results, 2 bad input, 3 partial (some data unreadable),
//! 4 environment (permission, lock held, missing kernel feature).

use std::fmt;

/// Why a command ended, as its exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    NoResults = 1,
    BadInput = 2,
    Partial = 3,
    Environment = 4,
}

/// An error that ends the command with a given status and a one-line message naming the
/// cause and what to do. Raise it with `return Err(UserError::bad_input("…").into())`;
/// `main` prints it once and exits with its status.
#[derive(Debug)]
pub struct UserError {
    pub status: Status,
    pub message: String,
}

impl UserError {
    pub fn bad_input(message: impl Into<String>) -> Self {
        Self {
            status: Status::BadInput,
            message: message.into(),
        }
    }

    pub fn environment(message: impl Into<String>) -> Self {
        Self {
            status: Status::Environment,
            message: message.into(),
        }
    }

    /// Some data could not be read or proven: status 3.
    pub fn partial(message: impl Into<String>) -> Self {
        Self {
            status: Status::Partial,
            message: message.into(),
        }
    }
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}
