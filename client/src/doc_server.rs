// The fake daemon the documentation's examples talk to, written once: each
// example includes it with a hidden
// `include!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/doc_server.rs"))`.
// Not a module of the library.

mod doc_server {
    use gaspar_protocol::{handshake, reply_header, Status, PREAMBLE};
    use std::io::{self, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    /// An echo server speaking v1 and the persistent extension, as gaspard
    /// does; on a persistent connection, "error:TEXT" fails with TEXT.
    pub fn gaspard() -> SocketAddr {
        serve(true)
    }

    /// An echo server speaking v1 only, as gaspar does: it closes a
    /// connection that opens with the extension's preamble.
    pub fn gaspar() -> SocketAddr {
        serve(false)
    }

    fn serve(extension: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let addr = listener.local_addr().expect("the bound address");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                // An error ends that connection only.
                let _ = stream.and_then(|stream| connection(stream, extension));
            }
        });
        addr
    }

    fn connection(stream: TcpStream, extension: bool) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let mut input = BufReader::new(stream.try_clone()?);
        let mut output = stream;
        let mut header = [0; 4];
        input.read_exact(&mut header)?;
        if header != PREAMBLE[..4] {
            // v1: one request, its reply, the close.
            let body = read_body(&mut input, header)?;
            return output.write_all(&body);
        }
        let mut magic = [0; 4];
        input.read_exact(&mut magic)?;
        if !extension || magic != PREAMBLE[4..] {
            return Ok(());
        }
        output.write_all(&handshake(16))?;
        loop {
            input.read_exact(&mut header)?;
            let body = read_body(&mut input, header)?;
            if body.is_empty() {
                return Ok(()); // goodbye
            }
            let (status, payload) = match body.strip_prefix(b"error:") {
                Some(text) => (Status::HandlerError, text),
                None => (Status::Ok, &body[..]),
            };
            let len = u32::try_from(payload.len()).expect("a request's length");
            let mut reply = reply_header(status, len).to_vec();
            reply.extend_from_slice(payload);
            output.write_all(&reply)?;
        }
    }

    fn read_body(input: &mut impl Read, header: [u8; 4]) -> io::Result<Vec<u8>> {
        let mut body = vec![0; u32::from_be_bytes(header) as usize];
        input.read_exact(&mut body)?;
        Ok(body)
    }
}
