//! The bytes on the wire, with no I/O and no dependencies: gaspar's request
//! framing and the persistent, pipelined extension (GSP2). The daemon, the
//! client library and the load generator all speak it through this crate,
//! so there is one definition of the format (docs/protocol.md).
//!
//! v1: a request is a 4-byte unsigned big-endian length and that many bytes;
//! the reply is raw bytes ended by a clean close.
//!
//! GSP2, opt-in: the client opens with [`PREAMBLE`]; the server answers
//! "GSP2" and a u32 BE window (the most requests the client may have
//! outstanding). Requests are then framed as in v1, back to back; a
//! zero-length request means "no more". Each reply is a `u8` status, a u32 BE
//! length and the payload, in request order.

use std::fmt;

/// Bytes in a request's length header.
pub const HEADER_LEN: usize = 4;

/// What a GSP2 client sends first: a length no gaspard accepts (its
/// `--max-request-size` is capped below it), then the magic.
pub const PREAMBLE: [u8; 8] = [0xFF, 0xFF, 0xFF, 0xFF, b'G', b'S', b'P', b'2'];

/// The first four bytes of the server's answer to the preamble.
pub const MAGIC: [u8; 4] = *b"GSP2";

/// Bytes in the server's answer to the preamble: the magic and the window.
pub const HANDSHAKE_LEN: usize = 8;

/// The length that opens a preamble, so never a v1 request's length.
pub const EXTENSION_MARK: u32 = u32::MAX;

/// The largest payload a request can announce.
pub const MAX_PAYLOAD: u64 = EXTENSION_MARK as u64 - 1;

/// In GSP2, a zero-length request: "no more requests".
pub const END_OF_REQUESTS: [u8; HEADER_LEN] = [0; HEADER_LEN];

/// Bytes in a GSP2 reply's header: the status, then the length.
pub const REPLY_HEADER_LEN: usize = 5;

/// A request on the wire: the length header, then the payload.
pub fn request(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&len| len != EXTENSION_MARK)
        .expect("payload sizes are checked against MAX_PAYLOAD");
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// The server's answer to the preamble.
pub fn handshake(window: u32) -> [u8; HANDSHAKE_LEN] {
    let mut bytes = [0; HANDSHAKE_LEN];
    bytes[..4].copy_from_slice(&MAGIC);
    bytes[4..].copy_from_slice(&window.to_be_bytes());
    bytes
}

/// The window announced in the server's answer to the preamble, or `None`
/// if the answer is not GSP2's.
pub fn parse_handshake(bytes: &[u8; HANDSHAKE_LEN]) -> Option<u32> {
    (bytes[..4] == MAGIC).then(|| u32::from_be_bytes(bytes[4..].try_into().expect("4 bytes")))
}

/// A GSP2 reply's header.
pub fn reply_header(status: Status, len: u32) -> [u8; REPLY_HEADER_LEN] {
    let mut bytes = [0; REPLY_HEADER_LEN];
    bytes[0] = status.code();
    bytes[1..].copy_from_slice(&len.to_be_bytes());
    bytes
}

/// A GSP2 reply's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The payload is the reply.
    Ok,
    /// The handler failed; the payload is its message.
    HandlerError,
    /// The request ran past the server's --timeout.
    Timeout,
    /// Refused at once: the queue is full or no worker can run it.
    Overloaded,
    /// The worker running it died.
    WorkerLost,
    /// Not in the spec: clients treat it as an error.
    Unknown(u8),
}

impl Status {
    /// The status byte on the wire.
    pub fn code(self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::HandlerError => 1,
            Status::Timeout => 2,
            Status::Overloaded => 3,
            Status::WorkerLost => 4,
            Status::Unknown(code) => code,
        }
    }
}

impl Status {
    /// The status a byte on the wire stands for.
    pub fn from_code(code: u8) -> Status {
        Status::from(code)
    }
}

impl From<u8> for Status {
    fn from(code: u8) -> Status {
        match code {
            0 => Status::Ok,
            1 => Status::HandlerError,
            2 => Status::Timeout,
            3 => Status::Overloaded,
            4 => Status::WorkerLost,
            other => Status::Unknown(other),
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("ok"),
            Status::HandlerError => f.write_str("handler error"),
            Status::Timeout => f.write_str("ran past the daemon's --timeout"),
            Status::Overloaded => f.write_str("the daemon is overloaded"),
            Status::WorkerLost => f.write_str("worker lost"),
            Status::Unknown(code) => write!(f, "unknown status {code}"),
        }
    }
}

/// Parses `1024`, `64K`, `16M`, `1G` (binary multiples), as gaspard's
/// `--max-request-size` and gaspar-bench's `--size` take them.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'k' | 'K')) => (&text[..at], 10),
        Some((at, 'm' | 'M')) => (&text[..at], 20),
        Some((at, 'g' | 'G')) => (&text[..at], 30),
        _ => (text, 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size such as 4096, 64K or 16M"))?;
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// A piece of a GSP2 reply stream, borrowed from the input where it can be.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// A reply begins.
    Head { status: Status, len: u32 },
    /// Some of its payload, in order.
    Body(&'a [u8]),
    /// The reply is complete.
    End,
}

/// Splits a GSP2 reply stream into pieces as the bytes arrive, in any split,
/// without copying payloads.
#[derive(Debug, Default)]
pub struct ReplyDecoder {
    header: [u8; REPLY_HEADER_LEN],
    header_len: usize,
    /// Payload bytes still to come, once the header is complete.
    body_left: Option<u32>,
}

impl ReplyDecoder {
    /// Whether a reply has begun and not ended.
    pub fn in_reply(&self) -> bool {
        self.header_len > 0 || self.body_left.is_some()
    }

    /// The next piece from `input`, which is advanced past it; `None` once
    /// `input` is used up with no piece complete.
    pub fn next<'a>(&mut self, input: &mut &'a [u8]) -> Option<Piece<'a>> {
        match self.body_left {
            Some(0) => {
                self.body_left = None;
                Some(Piece::End)
            }
            Some(left) => {
                if input.is_empty() {
                    return None;
                }
                let take = input.len().min(left as usize);
                let (body, rest) = input.split_at(take);
                *input = rest;
                // take <= left, a u32.
                self.body_left = Some(left - take as u32);
                Some(Piece::Body(body))
            }
            None => {
                let take = (REPLY_HEADER_LEN - self.header_len).min(input.len());
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&input[..take]);
                self.header_len += take;
                *input = &input[take..];
                if self.header_len < REPLY_HEADER_LEN {
                    return None;
                }
                self.header_len = 0;
                let len = u32::from_be_bytes(self.header[1..].try_into().expect("4 bytes"));
                self.body_left = Some(len);
                Some(Piece::Head {
                    status: Status::from(self.header[0]),
                    len,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `stream` fed in pieces of `size` bytes, gathering each reply.
    fn decode_in_pieces(stream: &[u8], size: usize) -> Vec<(Status, Vec<u8>)> {
        let mut decoder = ReplyDecoder::default();
        let mut replies = Vec::new();
        let mut current = None;
        for mut chunk in stream.chunks(size) {
            while let Some(piece) = decoder.next(&mut chunk) {
                match piece {
                    Piece::Head { status, len } => {
                        assert!(current.is_none());
                        current = Some((status, Vec::with_capacity(len as usize)));
                    }
                    Piece::Body(bytes) => current.as_mut().unwrap().1.extend_from_slice(bytes),
                    Piece::End => replies.push(current.take().unwrap()),
                }
            }
        }
        // A zero-length reply at the very end ends without more input.
        if let Some(Piece::End) = decoder.next(&mut &[][..]) {
            replies.push(current.take().unwrap());
        }
        assert!(!decoder.in_reply());
        replies
    }

    #[test]
    fn replies_decode_the_same_under_any_split() {
        let mut stream = Vec::new();
        let replies: [(Status, &[u8]); 4] = [
            (Status::Ok, b"hello"),
            (Status::HandlerError, b"boom"),
            (Status::Ok, b""),
            (Status::Unknown(9), b"?"),
        ];
        for (status, payload) in replies {
            stream.extend_from_slice(&reply_header(status, payload.len() as u32));
            stream.extend_from_slice(payload);
        }
        for size in 1..=stream.len() {
            let got = decode_in_pieces(&stream, size);
            let want: Vec<_> = replies.iter().map(|(s, p)| (*s, p.to_vec())).collect();
            assert_eq!(got, want, "pieces of {size}");
        }
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("16m"), Ok(16 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }

    #[test]
    fn status_codes_round_trip() {
        for code in 0..=255u8 {
            assert_eq!(Status::from(code).code(), code);
        }
        assert_eq!(Status::from(3), Status::Overloaded);
        assert_eq!(Status::from(5), Status::Unknown(5));
    }

    #[test]
    fn the_preamble_is_a_length_no_request_can_have() {
        assert_eq!(
            u32::from_be_bytes(PREAMBLE[..4].try_into().unwrap()),
            EXTENSION_MARK
        );
        assert_eq!(&PREAMBLE[4..], b"GSP2");
        assert_eq!(request(b"hello"), b"\0\0\0\x05hello");
    }

    #[test]
    fn handshakes_round_trip_and_others_are_refused() {
        assert_eq!(handshake(64), *b"GSP2\0\0\0\x40");
        assert_eq!(parse_handshake(&handshake(64)), Some(64));
        assert_eq!(parse_handshake(b"HTTP/1.1"), None);
    }
}
