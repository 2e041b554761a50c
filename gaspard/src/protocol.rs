//! gaspar's wire protocol, as pure functions: a request is a 4-byte unsigned
//! big-endian length followed by that many bytes; the reply is raw bytes
//! followed by a clean close. See `docs/protocol.md`.
//!
//! A connection's first frame may instead be the persistent extension's
//! preamble ([`Decoded::Extension`]).
//!
//! Nothing here does I/O, so the decoder can be tested and fuzzed on its own.

// The wire format itself is gaspar-protocol's, shared with the client and
// the load generator; this module adds the daemon's incremental decoder.
#[cfg(test)]
pub use gaspar_protocol::request as pack;
pub use gaspar_protocol::{
    handshake, reply_header, Status, EXTENSION_MARK, HEADER_LEN, PREAMBLE, REPLY_HEADER_LEN,
};

/// Bytes read into a request body per step, so that memory grows with the
/// bytes actually received rather than with the length a client announces.
const BODY_STEP: usize = 64 * 1024;

/// Why a request cannot be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "announced a request of {announced} bytes, over the limit of {limit} (--max-request-size)"
    )]
    TooLarge { announced: u32, limit: u32 },
    #[error("sent 0xFFFFFFFF but not the extension preamble")]
    BadPreamble,
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
            let announced = u32::from_be_bytes(self.header);
            if announced == EXTENSION_MARK && self.extension {
                self.in_preamble = true;
                self.body = Some((Vec::with_capacity(4), 4));
            } else if announced > self.limit {
                return Err(FrameError::TooLarge {
                    announced,
                    limit: self.limit,
                });
            }
            if announced == 0 {
                return Ok(Decoded::Empty);
            }
            if self.body.is_none() {
                let len = announced as usize;
                self.body = Some((Vec::with_capacity(len.min(BODY_STEP)), len));
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

    /// The body so far, with room reserved for at most `BODY_STEP` more
    /// bytes, and that step: append to it (without zeroing it first), then
    /// call [`Self::take_body`].
    pub fn body_to_fill(&mut self) -> (&mut Vec<u8>, usize) {
        let (body, len) = self.body.as_mut().expect("header is complete");
        let start = body.len();
        let step = (*len - start).min(BODY_STEP);
        // Grow by doubling, so memory follows the bytes that arrive, but
        // never past the announced length.
        if start + step > body.capacity() {
            let capacity = (body.capacity() * 2).max(start + step).min(*len);
            body.reserve_exact(capacity - start);
        }
        (body, step)
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
        let mut stream = pack(b"hello world");
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
    fn the_preamble_opens_the_extension_only_as_a_first_frame() {
        let mut stream = PREAMBLE.to_vec();
        stream.extend_from_slice(&pack(b"next"));
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
            decoder.feed(&pack(&payload)[..10]).unwrap(),
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
                match decode(&pack(&payload), &cuts, 4096).unwrap() {
                    Decoded::Request { payload: got, .. } => prop_assert_eq!(got, payload),
                    other => prop_assert!(false, "{:?}", other),
                }
            }

            #[test]
            fn garbage_never_panics_and_never_exceeds_the_limit(
                bytes in proptest::collection::vec(any::<u8>(), 0..2000),
                cuts in proptest::collection::vec(1usize..300, 1..10),
                limit in 0u32..1500,
            ) {
                match decode(&bytes, &cuts, limit) {
                    Ok(Decoded::Request { payload, .. }) => {
                        let announced = u32::from_be_bytes(bytes[..4].try_into().unwrap());
                        prop_assert!(announced <= limit);
                        prop_assert_eq!(payload.len(), announced as usize);
                        prop_assert_eq!(&payload[..], &bytes[4..4 + announced as usize]);
                    }
                    Ok(Decoded::Empty) => prop_assert_eq!(&bytes[..4], &[0u8; 4][..]),
                    Ok(Decoded::Incomplete) => {}
                    Err(FrameError::TooLarge { announced, limit: l }) => {
                        prop_assert!(announced > l);
                        prop_assert_eq!(l, limit);
                    }
                    other @ (Ok(Decoded::Extension { .. }) | Err(FrameError::BadPreamble)) => {
                        prop_assert!(false, "only a connection's first frame may open the extension: {:?}", other);
                    }
                }
            }
        }
    }
}
