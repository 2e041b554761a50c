//! What reading and writing a client socket shares between a one-shot
//! connection and a persistent session: the step a socket asks for next, and
//! the reads that go straight into a large body (its own buffer, or a
//! worker's request area).

use crate::buffers::read_appending;
use crate::protocol::RequestDecoder;
use crate::workers::{AreaBody, RequestBody};
use mio::net::TcpStream;
use std::io::{self, Read};

/// What the event loop should do after a connection made progress.
#[derive(Debug)]
pub(crate) enum Next {
    /// Nothing yet: wait for the next readiness event.
    Wait,
    /// A whole request arrived (one-shot connections only: a session keeps
    /// what arrives until the loop takes it).
    Request(RequestBody),
    /// Close cleanly: the reply is written, or the request was empty.
    Close,
    /// A body is to be read and the budget of bytes in flight
    /// (--max-buffered) has no room: read nothing more until it has.
    Parked,
    /// A framing violation or a limit: close with a reset, logging why.
    Reset(String),
    /// The client went away; there is nobody to tell.
    Gone(io::Error),
}

/// What one read did for a decoder.
pub(crate) enum ReadStep {
    /// Nothing to read now.
    WouldBlock,
    /// The client closed its sending side.
    Eof,
    /// Bytes went straight into a large body; the request, if now complete.
    Direct(Option<Vec<u8>>),
    /// This many bytes are in the scratch buffer, to be fed to the decoder.
    Scratch(usize),
}

/// One read for `decoder`: a large body is read straight into place without
/// the scratch copy (nor zeroing it first, see `read_appending`); anything
/// else goes to `scratch`,
/// which saves a syscall per small request (header and body in one read).
pub(crate) fn read_step(
    stream: &mut TcpStream,
    decoder: &mut RequestDecoder,
    scratch: &mut [u8],
) -> io::Result<ReadStep> {
    let direct = decoder
        .body_missing()
        .is_some_and(|missing| missing >= scratch.len());
    if direct {
        let (body, step) = decoder.body_to_fill();
        // Appends what is there, even when it then hits WouldBlock.
        let mut read = 0;
        let ended = loop {
            match read_appending(stream, body, step - read) {
                Ok(0) => break Ok(true),
                Ok(n) => {
                    read += n;
                    if read == step {
                        break Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(e) => break Err(e),
            }
        };
        return match ended {
            Ok(true) if read == 0 => Ok(ReadStep::Eof),
            Ok(_) if read == 0 => Ok(ReadStep::WouldBlock),
            Ok(_) => Ok(ReadStep::Direct(decoder.take_body())),
            Err(e) => Err(e),
        };
    }
    loop {
        return match stream.read(scratch) {
            Ok(0) => Ok(ReadStep::Eof),
            Ok(n) => Ok(ReadStep::Scratch(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadStep::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}

/// One read straight into a body read in place (a one-shot connection's,
/// see [`AreaBody`]): [`ReadStep::Direct`] with nothing once bytes came
/// (whether the body is whole, it says itself).
pub(crate) fn read_in_place(stream: &mut TcpStream, body: &mut AreaBody) -> io::Result<ReadStep> {
    loop {
        return match stream.read(body.unfilled()) {
            Ok(0) => Ok(ReadStep::Eof),
            Ok(n) => {
                body.filled(n);
                Ok(ReadStep::Direct(None))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(ReadStep::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}
