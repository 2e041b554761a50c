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
//!
//! The decoders of bytes from the other side, [`RequestDecoder`] and
//! [`ReplyDecoder`], take any split of the stream and never panic on what
//! they are fed: a bad request is a [`FrameError`].

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

/// A GSP2 reply's status and payload length, from its header.
pub fn parse_reply_header(bytes: &[u8; REPLY_HEADER_LEN]) -> (Status, u32) {
    let [status, len @ ..] = *bytes;
    (Status::from(status), u32::from_be_bytes(len))
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
                let (status, len) = parse_reply_header(&self.header);
                self.body_left = Some(len);
                Some(Piece::Head { status, len })
            }
        }
    }
}

/// Bytes read into a request body per step, so that memory grows with the
/// bytes actually received rather than with the length a client announces.
const BODY_STEP: usize = 64 * 1024;

/// Why a request cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The header announces more than the decoder's limit.
    TooLarge { announced: u32, limit: u32 },
    /// A connection's first frame opened with [`EXTENSION_MARK`] and went on
    /// with something other than the magic.
    BadPreamble,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLarge { announced, limit } => write!(
                f,
                "announced a request of {announced} bytes, over the limit of {limit} (--max-request-size)"
            ),
            FrameError::BadPreamble => {
                f.write_str("sent 0xFFFFFFFF but not the extension preamble")
            }
        }
    }
}

impl std::error::Error for FrameError {}

/// What a request's length header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// A zero length: in v1 the client asks for nothing, in GSP2 it has no
    /// more requests.
    Empty,
    /// A payload of this many bytes, within the limit.
    Payload(u32),
    /// [`EXTENSION_MARK`] as a connection's first frame: the rest of
    /// [`PREAMBLE`] should follow.
    Extension,
}

impl Header {
    /// Reads a length header against the largest request accepted. Only a
    /// connection's `first` frame may open the extension; anywhere else its
    /// mark is a length like any other.
    #[inline] // read per request by the load generator's baseline server
    pub fn read(bytes: [u8; HEADER_LEN], limit: u32, first: bool) -> Result<Header, FrameError> {
        let announced = u32::from_be_bytes(bytes);
        if announced == EXTENSION_MARK && first {
            Ok(Header::Extension)
        } else if announced > limit {
            Err(FrameError::TooLarge { announced, limit })
        } else if announced == 0 {
            Ok(Header::Empty)
        } else {
            Ok(Header::Payload(announced))
        }
    }

    /// [`Header::read`] on the start of `input`, for a server that keeps
    /// its input in one buffer; `None` until the whole header is there.
    #[inline] // read per request by the load generator's baseline server
    pub fn peek(input: &[u8], limit: u32, first: bool) -> Option<Result<Header, FrameError>> {
        let bytes = input.get(..HEADER_LEN)?.try_into().ok()?;
        Some(Header::read(bytes, limit, first))
    }
}

/// What the decoder has after being fed.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// More bytes are needed.
    Incomplete,
    /// The client asked for nothing: gaspar closes such a connection without a reply.
    Empty,
    /// A whole request. `consumed` says how much of the last input it used;
    /// anything after it is not part of this request.
    Request { payload: Vec<u8>, consumed: usize },
    /// The persistent extension's preamble (only as a connection's first
    /// bytes); `consumed` as above.
    Extension { consumed: usize },
}

/// Decodes one request from bytes as they arrive.
#[derive(Debug)]
pub struct RequestDecoder {
    limit: u32,
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// Set once the header is complete: the body so far and its full length.
    body: Option<(Vec<u8>, usize)>,
    /// The extension preamble is still allowed (nothing decoded yet).
    extension: bool,
    /// The current "body" is the preamble's magic, not a request.
    in_preamble: bool,
}

impl RequestDecoder {
    /// A decoder for a frame that cannot be the extension's preamble.
    pub fn new(limit: u32) -> RequestDecoder {
        RequestDecoder {
            limit,
            header: [0; HEADER_LEN],
            header_len: 0,
            body: None,
            extension: false,
            in_preamble: false,
        }
    }

    /// A decoder for a connection's first frame, which may be the
    /// persistent extension's preamble.
    pub fn first_on_connection(limit: u32) -> RequestDecoder {
        RequestDecoder {
            extension: true,
            ..RequestDecoder::new(limit)
        }
    }

    /// The largest request this decoder accepts.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Whether any byte of a request has arrived.
    pub fn started(&self) -> bool {
        self.header_len > 0
    }

    /// Feeds bytes that arrived; may be called with any split of the stream.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<Decoded, FrameError> {
        let total = input.len();
        if self.body.is_none() {
            let take = (HEADER_LEN - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            input = &input[take..];
            if self.header_len < HEADER_LEN {
                return Ok(Decoded::Incomplete);
            }
            match Header::read(self.header, self.limit, self.extension)? {
                Header::Empty => return Ok(Decoded::Empty),
                Header::Extension => {
                    self.in_preamble = true;
                    let magic = PREAMBLE.len() - HEADER_LEN;
                    self.body = Some((Vec::with_capacity(magic), magic));
                }
                Header::Payload(len) => {
                    let len = len as usize;
                    self.body = Some((Vec::with_capacity(len.min(BODY_STEP)), len));
                }
            }
            self.extension = false;
        }
        let (body, len) = self.body.as_mut().expect("set above");
        let take = (*len - body.len()).min(input.len());
        body.extend_from_slice(&input[..take]);
        if body.len() < *len {
            return Ok(Decoded::Incomplete);
        }
        let consumed = total - (input.len() - take);
        let (payload, _) = self.body.take().expect("set above");
        self.header_len = 0;
        if std::mem::take(&mut self.in_preamble) {
            return if payload[..] == PREAMBLE[4..] {
                Ok(Decoded::Extension { consumed })
            } else {
                Err(FrameError::BadPreamble)
            };
        }
        Ok(Decoded::Request { payload, consumed })
    }

    /// How many body bytes are still missing, once the header is known. A
    /// caller may read a large body straight into [`Self::body_to_fill`]
    /// instead of going through [`Self::feed`].
    pub fn body_missing(&self) -> Option<usize> {
        if self.in_preamble {
            return None; // four bytes: always through feed()
        }
        self.body.as_ref().map(|(body, len)| len - body.len())
    }

    /// Reserves room for the whole body at once, for a caller that has
    /// decided the announced length may take that memory (the daemon's
    /// budget admitted it): the body is then read without growing, copying
    /// or faulting in fresh memory along the way, and in larger reads.
    /// Without it, room grows with the bytes that arrive.
    pub fn reserve_body(&mut self) -> Result<(), std::collections::TryReserveError> {
        match self.body.as_mut() {
            Some((body, len)) if !self.in_preamble => body.try_reserve_exact(*len - body.len()),
            _ => Ok(()),
        }
    }

    /// The body so far, with room reserved for at most `BODY_STEP` more
    /// bytes (or all of it, after [`Self::reserve_body`]), and that step:
    /// append to it (without zeroing it first), then call
    /// [`Self::take_body`].
    pub fn body_to_fill(&mut self) -> (&mut Vec<u8>, usize) {
        let (body, len) = self.body.as_mut().expect("header is complete");
        let start = body.len();
        let room = body.capacity() - start;
        let step = (*len - start).min(BODY_STEP.max(room));
        // Grow by doubling, so memory follows the bytes that arrive, but
        // never past the announced length.
        if start + step > body.capacity() {
            let capacity = (body.capacity() * 2).max(start + step).min(*len);
            body.reserve_exact(capacity - start);
        }
        (body, step)
    }

    /// The whole body's length, once the header is known.
    pub fn body_len(&self) -> Option<usize> {
        if self.in_preamble {
            return None;
        }
        self.body.as_ref().map(|(_, len)| *len)
    }

    /// The body so far, for a caller that reads the rest into a place of
    /// its own: this decoder is then done with the request (it still counts
    /// as [`Self::started`], and decodes nothing more).
    pub fn hand_over_body(&mut self) -> Option<Vec<u8>> {
        if self.in_preamble {
            return None;
        }
        self.body.take().map(|(body, _)| body)
    }

    /// The request, once [`Self::body_to_fill`] has the whole body.
    pub fn take_body(&mut self) -> Option<Vec<u8>> {
        let (body, len) = self.body.as_ref()?;
        if body.len() < *len {
            return None;
        }
        self.header_len = 0;
        self.body.take().map(|(body, _)| body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn reply_headers_round_trip() {
        let header = reply_header(Status::WorkerLost, 0x0102_0304);
        assert_eq!(header, [4, 1, 2, 3, 4]);
        assert_eq!(
            parse_reply_header(&header),
            (Status::WorkerLost, 0x0102_0304)
        );
        assert_eq!(
            parse_reply_header(&[0xff; REPLY_HEADER_LEN]),
            (Status::Unknown(0xff), u32::MAX)
        );
    }

    #[test]
    fn handshakes_round_trip_and_others_are_refused() {
        assert_eq!(handshake(64), *b"GSP2\0\0\0\x40");
        assert_eq!(parse_handshake(&handshake(64)), Some(64));
        assert_eq!(parse_handshake(b"HTTP/1.1"), None);
    }

    /// The daemon's side: one request from bytes in any split.
    mod requests {
        use super::*;

        fn decode_in_pieces(stream: &[u8], piece: usize) -> Result<Decoded, FrameError> {
            let mut decoder = RequestDecoder::new(1 << 20);
            for chunk in stream.chunks(piece) {
                match decoder.feed(chunk)? {
                    Decoded::Incomplete => continue,
                    done => return Ok(done),
                }
            }
            Ok(Decoded::Incomplete)
        }

        #[test]
        fn any_split_of_the_stream_decodes_the_same_request() {
            let mut stream = request(b"hello world");
            stream.extend_from_slice(b"trailing");
            for piece in 1..stream.len() {
                match decode_in_pieces(&stream, piece).unwrap() {
                    Decoded::Request { payload, .. } => assert_eq!(payload, b"hello world"),
                    other => panic!("piece {piece}: {other:?}"),
                }
            }
            let mut decoder = RequestDecoder::new(100);
            assert_eq!(
                decoder.feed(&stream).unwrap(),
                Decoded::Request {
                    payload: b"hello world".to_vec(),
                    consumed: 15
                }
            );
        }

        #[test]
        fn zero_length_is_empty_and_oversize_is_refused_on_the_header() {
            assert_eq!(
                RequestDecoder::new(10).feed(&[0, 0, 0, 0]).unwrap(),
                Decoded::Empty
            );
            let err = RequestDecoder::new(10).feed(&[0, 0, 0, 11]).unwrap_err();
            assert_eq!(
                err,
                FrameError::TooLarge {
                    announced: 11,
                    limit: 10
                }
            );
            let err = RequestDecoder::new(u32::MAX - 1)
                .feed(&[0xff; 4])
                .unwrap_err();
            assert!(err.to_string().contains("4294967295 bytes"));
        }

        #[test]
        fn headers_say_what_a_length_announces() {
            assert_eq!(Header::peek(&[0, 0, 1], 10, false), None);
            assert_eq!(
                Header::peek(&[0, 0, 0, 0], 10, true),
                Some(Ok(Header::Empty))
            );
            assert_eq!(
                Header::peek(&[0, 0, 0, 10, b'x'], 10, false),
                Some(Ok(Header::Payload(10)))
            );
            assert_eq!(
                Header::read([0, 0, 0, 11], 10, true),
                Err(FrameError::TooLarge {
                    announced: 11,
                    limit: 10
                })
            );
            let mark = EXTENSION_MARK.to_be_bytes();
            assert_eq!(Header::read(mark, 10, true), Ok(Header::Extension));
            assert_eq!(
                Header::read(mark, 10, false),
                Err(FrameError::TooLarge {
                    announced: u32::MAX,
                    limit: 10
                })
            );
        }

        #[test]
        fn frame_errors_say_what_went_wrong() {
            let too_large = FrameError::TooLarge {
                announced: 11,
                limit: 10,
            };
            assert_eq!(
                too_large.to_string(),
                "announced a request of 11 bytes, over the limit of 10 (--max-request-size)"
            );
            assert_eq!(
                FrameError::BadPreamble.to_string(),
                "sent 0xFFFFFFFF but not the extension preamble"
            );
        }

        #[test]
        fn the_preamble_opens_the_extension_only_as_a_first_frame() {
            let mut stream = PREAMBLE.to_vec();
            stream.extend_from_slice(&request(b"next"));
            for piece in 1..=8 {
                let mut decoder = RequestDecoder::first_on_connection(1000);
                let mut fed = 0;
                let decoded = loop {
                    let chunk = &stream[fed..(fed + piece).min(stream.len())];
                    fed += chunk.len();
                    match decoder.feed(chunk).unwrap() {
                        Decoded::Incomplete => continue,
                        done => break (done, fed - chunk.len()),
                    }
                };
                let (Decoded::Extension { consumed }, before) = decoded else {
                    panic!("piece {piece}: {decoded:?}");
                };
                assert_eq!(before + consumed, 8, "the bytes after it are not consumed");
            }
            let err = RequestDecoder::first_on_connection(1000)
                .feed(&[0xff, 0xff, 0xff, 0xff, b'G', b'S', b'P', b'3']);
            assert_eq!(err.unwrap_err(), FrameError::BadPreamble);
            // Anywhere else, the escape is an oversized length like any other.
            let err = RequestDecoder::new(1000).feed(&PREAMBLE).unwrap_err();
            assert!(matches!(
                err,
                FrameError::TooLarge {
                    announced: u32::MAX,
                    ..
                }
            ));
        }

        #[test]
        fn large_bodies_can_be_read_in_place() {
            let payload: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
            let mut decoder = RequestDecoder::new(1 << 20);
            assert_eq!(
                decoder.feed(&request(&payload)[..10]).unwrap(),
                Decoded::Incomplete
            );
            let mut offset = 6;
            loop {
                let missing = decoder.body_missing().unwrap();
                assert_eq!(missing, payload.len() - offset);
                let (body, step) = decoder.body_to_fill();
                assert!(body.capacity() - body.len() >= step, "room is reserved");
                // Short reads, as a socket gives them.
                let n = step.min(1000);
                body.extend_from_slice(&payload[offset..offset + n]);
                offset += n;
                if let Some(done) = decoder.take_body() {
                    assert_eq!(done, payload);
                    break;
                }
            }
            assert!(!decoder.started());
        }

        #[test]
        fn a_reserved_body_is_read_without_growing() {
            let payload = vec![7u8; 300_000];
            let mut decoder = RequestDecoder::new(1 << 20);
            decoder.feed(&request(&payload)[..100]).unwrap();
            decoder.reserve_body().unwrap();
            let (body, step) = decoder.body_to_fill();
            let (capacity, pointer) = (body.capacity(), body.as_ptr());
            assert_eq!(
                (capacity, step),
                (300_000, 300_000 - 96),
                "all of it, at once"
            );
            body.extend_from_slice(&payload[96..]);
            let done = decoder.take_body().unwrap();
            assert_eq!(
                (done.capacity(), done.as_ptr()),
                (capacity, pointer),
                "never moved"
            );
            assert_eq!(done, payload);
        }

        /// What `properties` below does not do: in-place body reads
        /// (`body_to_fill`, as the daemon reads a large body) mixed with
        /// `feed`. Bad input is the model-checked property's.
        mod fuzz {
            use super::*;
            use proptest::prelude::*;

            /// Feeds `stream` to a decoder in the given chunk sizes, the way a
            /// socket hands out bytes, mixing `feed` and in-place body reads.
            fn decode(stream: &[u8], cuts: &[usize], limit: u32) -> Result<Decoded, FrameError> {
                let mut decoder = RequestDecoder::new(limit);
                let mut rest = stream;
                let mut cuts = cuts.iter().cycle();
                while !rest.is_empty() {
                    let n = (*cuts.next().unwrap()).clamp(1, rest.len());
                    let (chunk, tail) = rest.split_at(n);
                    rest = tail;
                    if decoder.body_missing().is_some_and(|missing| missing > 0) && n % 2 == 0 {
                        let (body, step) = decoder.body_to_fill();
                        let m = n.min(step);
                        body.extend_from_slice(&chunk[..m]);
                        rest = &stream[stream.len() - rest.len() - (n - m)..];
                        if let Some(payload) = decoder.take_body() {
                            return Ok(Decoded::Request {
                                payload,
                                consumed: m,
                            });
                        }
                        continue;
                    }
                    match decoder.feed(chunk)? {
                        Decoded::Incomplete => {}
                        done => return Ok(done),
                    }
                }
                Ok(Decoded::Incomplete)
            }

            proptest! {
                #[test]
                fn framed_payloads_decode_whole_under_any_split(
                    payload in proptest::collection::vec(any::<u8>(), 1..3000),
                    cuts in proptest::collection::vec(1usize..700, 1..20),
                ) {
                    match decode(&request(&payload), &cuts, 4096).unwrap() {
                        Decoded::Request { payload: got, .. } => prop_assert_eq!(got, payload),
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
            }
        }
    }

    /// Properties of every decoder of bytes from the other side: whatever
    /// they are fed, in whatever split, they do not panic, they refuse bad
    /// input with an error, and they decode a split stream as the whole.
    mod properties {
        use super::*;
        use proptest::collection::vec;
        use proptest::prelude::*;

        /// A request decoder's outcome, with where it ended counted from
        /// the start of the stream rather than of the last input.
        #[derive(Debug, PartialEq, Eq)]
        enum Outcome {
            Incomplete,
            /// Decoded::Empty says nothing of how much it consumed.
            Empty,
            Request {
                payload: Vec<u8>,
                end: usize,
            },
            Extension {
                end: usize,
            },
            Refused(FrameError),
        }

        /// Feeds `stream` to `decoder` through `feed` alone, in pieces of
        /// the sizes in `cuts` (cycled), until it has an answer.
        fn feed_in_pieces(mut decoder: RequestDecoder, stream: &[u8], cuts: &[usize]) -> Outcome {
            let mut fed = 0;
            let mut cuts = cuts.iter().cycle();
            while fed < stream.len() {
                let n = cuts
                    .next()
                    .copied()
                    .unwrap_or(1)
                    .clamp(1, stream.len() - fed);
                let chunk = &stream[fed..fed + n];
                let before = fed;
                fed += n;
                match decoder.feed(chunk) {
                    Ok(Decoded::Incomplete) => {}
                    Ok(Decoded::Empty) => return Outcome::Empty,
                    Ok(Decoded::Request { payload, consumed }) => {
                        assert!(consumed <= n, "consumed {consumed} of {n}");
                        return Outcome::Request {
                            payload,
                            end: before + consumed,
                        };
                    }
                    Ok(Decoded::Extension { consumed }) => {
                        assert!(consumed <= n, "consumed {consumed} of {n}");
                        return Outcome::Extension {
                            end: before + consumed,
                        };
                    }
                    Err(error) => return Outcome::Refused(error),
                }
            }
            Outcome::Incomplete
        }

        /// What the v1 rules say `stream` is, read directly from the bytes:
        /// the model the decoder is checked against.
        fn expected(stream: &[u8], limit: u32, first: bool) -> Outcome {
            let Some(header) = stream.get(..HEADER_LEN) else {
                return Outcome::Incomplete;
            };
            let announced = u32::from_be_bytes(header.try_into().unwrap());
            if announced == EXTENSION_MARK && first {
                return match stream.get(HEADER_LEN..PREAMBLE.len()) {
                    None => Outcome::Incomplete,
                    Some(magic) if magic == &PREAMBLE[HEADER_LEN..] => Outcome::Extension {
                        end: PREAMBLE.len(),
                    },
                    Some(_) => Outcome::Refused(FrameError::BadPreamble),
                };
            }
            if announced > limit {
                return Outcome::Refused(FrameError::TooLarge { announced, limit });
            }
            if announced == 0 {
                return Outcome::Empty;
            }
            let end = HEADER_LEN + announced as usize;
            match stream.get(HEADER_LEN..end) {
                Some(payload) => Outcome::Request {
                    payload: payload.to_vec(),
                    end,
                },
                None => Outcome::Incomplete,
            }
        }

        /// Bytes that are often, but not always, a well-formed start: a
        /// small length or the preamble, then arbitrary bytes.
        fn stream() -> impl Strategy<Value = Vec<u8>> {
            let start = prop_oneof![
                (0u32..600).prop_map(|len| len.to_be_bytes().to_vec()),
                Just(PREAMBLE.to_vec()),
                Just(vec![0; HEADER_LEN]),
                Just(PREAMBLE[..HEADER_LEN].to_vec()),
                vec(any::<u8>(), 0..8),
            ];
            (start, vec(any::<u8>(), 0..700)).prop_map(|(mut start, rest)| {
                start.extend(rest);
                start
            })
        }

        /// Eight bytes: the magic and a window, the magic with one byte
        /// changed, or anything.
        fn handshake_like() -> impl Strategy<Value = [u8; HANDSHAKE_LEN]> {
            (0usize..6, any::<[u8; HANDSHAKE_LEN]>()).prop_map(|(change, mut bytes)| {
                if change <= MAGIC.len() {
                    let noise = bytes[change % MAGIC.len()];
                    bytes[..MAGIC.len()].copy_from_slice(&MAGIC);
                    if change < MAGIC.len() {
                        bytes[change] = noise;
                    }
                }
                bytes
            })
        }

        proptest! {
            #[test]
            fn requests_decode_as_the_rules_say_under_any_split(
                stream in stream(),
                cuts in vec(1usize..64, 1..12),
                limit in 0u32..700,
                near in any::<bool>(),
                step in 0u32..3,
                first in any::<bool>(),
            ) {
                // Often a limit one under, at or one over the length.
                let limit = match stream.get(..HEADER_LEN) {
                    Some(header) if near => u32::from_be_bytes(header.try_into().unwrap())
                        .saturating_sub(1)
                        .saturating_add(step),
                    _ => limit,
                };
                let decoder = || if first {
                    RequestDecoder::first_on_connection(limit)
                } else {
                    RequestDecoder::new(limit)
                };
                let whole = feed_in_pieces(decoder(), &stream, &[stream.len().max(1)]);
                prop_assert_eq!(&whole, &expected(&stream, limit, first));
                let split = feed_in_pieces(decoder(), &stream, &cuts);
                prop_assert_eq!(split, whole);
            }

            #[test]
            fn requests_back_to_back_decode_one_after_another(
                payloads in vec(vec(any::<u8>(), 1..300), 1..6),
                cuts in vec(1usize..100, 1..12),
            ) {
                let stream: Vec<u8> = payloads.iter().flat_map(|p| request(p)).collect();
                let mut rest = &stream[..];
                for payload in &payloads {
                    match feed_in_pieces(RequestDecoder::new(300), rest, &cuts) {
                        Outcome::Request { payload: got, end } => {
                            prop_assert_eq!(&got, payload);
                            rest = &rest[end..];
                        }
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                prop_assert!(rest.is_empty());
            }

            #[test]
            fn handshakes_are_the_magic_then_the_window(
                bytes in handshake_like(),
                window in any::<u32>(),
            ) {
                prop_assert_eq!(parse_handshake(&handshake(window)), Some(window));
                let want = (bytes[..4] == MAGIC)
                    .then(|| u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]));
                prop_assert_eq!(parse_handshake(&bytes), want);
            }

            #[test]
            fn reply_headers_round_trip(code in any::<u8>(), len in any::<u32>()) {
                let header = reply_header(Status::from(code), len);
                prop_assert_eq!(header[0], code);
                prop_assert_eq!(parse_reply_header(&header), (Status::from(code), len));
            }

            #[test]
            fn replies_decode_the_same_under_any_split(
                replies in vec((any::<u8>(), vec(any::<u8>(), 0..200)), 0..8),
                tail in vec(any::<u8>(), 0..12),
                cuts in vec(1usize..64, 1..12),
            ) {
                let mut stream = Vec::new();
                for (code, payload) in &replies {
                    stream.extend_from_slice(&reply_header(Status::from(*code), payload.len() as u32));
                    stream.extend_from_slice(payload);
                }
                // Arbitrary bytes after the last reply: the start of one
                // more, or a header announcing more than follows.
                stream.extend_from_slice(&tail);
                let (whole, _) = decode_replies(&stream, &[stream.len().max(1)]);
                let (split, partial) = decode_replies(&stream, &cuts);
                prop_assert_eq!(&split, &whole);
                let want: Vec<_> = replies
                    .iter()
                    .map(|(code, payload)| (Status::from(*code), payload.clone()))
                    .collect();
                prop_assert_eq!(&split[..want.len()], &want[..]);
                // What follows the whole replies decodes as on its own.
                let (after, tail_partial) = decode_replies(&tail, &cuts);
                prop_assert_eq!(&split[want.len()..], &after[..]);
                prop_assert_eq!(partial, tail_partial);
            }

            #[test]
            fn arbitrary_reply_bytes_never_outrun_their_header(
                stream in vec(any::<u8>(), 0..600),
                cuts in vec(1usize..64, 1..12),
            ) {
                let (whole, _) = decode_replies(&stream, &[stream.len().max(1)]);
                let (split, _) = decode_replies(&stream, &cuts);
                prop_assert_eq!(split, whole);
            }
        }

        /// Decodes a reply stream fed in pieces of the sizes in `cuts`
        /// (cycled): the whole replies, and whether one was left begun.
        /// Checks as it goes that every byte is used once and that no reply
        /// carries more than its header announced.
        fn decode_replies(stream: &[u8], cuts: &[usize]) -> (Vec<(Status, Vec<u8>)>, bool) {
            let mut decoder = ReplyDecoder::default();
            let mut replies = Vec::new();
            let mut current: Option<(Status, u32, Vec<u8>)> = None;
            let mut used = 0;
            let mut cuts = cuts.iter().cycle();
            let mut rest = stream;
            loop {
                let n = cuts
                    .next()
                    .copied()
                    .unwrap_or(1)
                    .clamp(1, rest.len().max(1))
                    .min(rest.len());
                let (chunk, tail) = rest.split_at(n);
                rest = tail;
                let mut input = chunk;
                loop {
                    let before = input.len();
                    let piece = decoder.next(&mut input);
                    used += before - input.len();
                    let Some(piece) = piece else { break };
                    match piece {
                        Piece::Head { status, len } => {
                            assert!(current.is_none(), "a header inside a reply");
                            current = Some((status, len, Vec::new()));
                        }
                        Piece::Body(bytes) => {
                            let (_, len, body) = current.as_mut().expect("a body inside a reply");
                            assert!(!bytes.is_empty(), "an empty body piece");
                            body.extend_from_slice(bytes);
                            assert!(body.len() <= *len as usize, "more than announced");
                        }
                        Piece::End => {
                            let (status, len, body) =
                                current.take().expect("an end inside a reply");
                            assert_eq!(body.len(), len as usize);
                            replies.push((status, body));
                        }
                    }
                }
                // Without a piece, the decoder has taken all it was given.
                assert!(input.is_empty(), "input left over");
                if rest.is_empty() {
                    break;
                }
            }
            assert_eq!(used, stream.len());
            (replies, decoder.in_reply())
        }
    }
}
