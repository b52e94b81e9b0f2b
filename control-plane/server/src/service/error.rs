//! What a service answers when it cannot do what it was asked: a [`Kind`] that callers branch on
//! (the HTTP adapter maps it to a status), a stable `code` naming what went wrong (the API's and
//! the CLI's machine-readable name for it), a message, and a hint on what to do instead.

/// The kind of failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The input is malformed (a selector that does not parse, a bad tag, a bad plan).
    Invalid,
    /// What the input names does not exist.
    NotFound,
    /// The request is well-formed but the fleet's state does not allow it now.
    Conflict,
    /// The content is well-formed but not acceptable (a bundle the trust root refuses).
    Unacceptable,
    /// The caller may not do this.
    Forbidden,
    /// Something the server needs is not configured (no fleet CA, no trust root).
    Unavailable,
    /// A failure of the server itself (the store, the disk).
    Internal,
}

#[derive(Debug)]
pub struct Error {
    pub kind: Kind,
    pub code: &'static str,
    pub message: String,
    pub hint: Option<String>,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, code: &'static str, message: impl Into<String>) -> Error {
        Error { kind, code, message: message.into(), hint: None }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Error {
        self.hint = Some(hint.into());
        self
    }

    pub fn invalid(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(Kind::Invalid, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(Kind::NotFound, code, message)
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(Kind::Conflict, code, message)
    }

    pub fn unacceptable(code: &'static str, message: impl Into<String>) -> Error {
        Error::new(Kind::Unacceptable, code, message)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)?;
        match &self.hint {
            Some(h) => write!(f, " ({h})"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for Error {}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::new(Kind::Internal, "internal", format!("{e:#}"))
    }
}
