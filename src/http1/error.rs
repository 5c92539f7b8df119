//! What can be wrong with a message, in terms its sender can be told.

use http::StatusCode;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    Malformed(&'static str),
    HeadTooLarge,
    /// The trailer section of a chunked body is over the head limit.
    TrailersTooLarge,
    /// A transfer coding other than `chunked`.
    UnsupportedCoding,
    /// The connection ended inside a message.
    Truncated,
}

impl WireError {
    /// The status for a client whose request had this fault.
    pub fn status(self) -> StatusCode {
        match self {
            WireError::HeadTooLarge | WireError::TrailersTooLarge => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            WireError::UnsupportedCoding => StatusCode::NOT_IMPLEMENTED,
            WireError::Malformed(_) | WireError::Truncated => StatusCode::BAD_REQUEST,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            WireError::Malformed(what) => what,
            WireError::HeadTooLarge => "request head too large",
            WireError::TrailersTooLarge => "trailer section too large",
            WireError::UnsupportedCoding => "unsupported transfer coding",
            WireError::Truncated => "connection closed mid-message",
        }
    }
}

impl std::error::Error for WireError {}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}
