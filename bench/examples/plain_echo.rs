//! A plain echo server for gaspar's protocol (v1 only), written the obvious
//! way: one mio thread; per connection, the 4-byte header, then the body read
//! straight into a buffer allocated from the header's length, written back,
//! close. It has none of serve-baseline's tricks and no GSP2; it is here so
//! that serve-baseline can be checked against it:
//!
//! ```sh
//! cargo run --release -p gaspar-bench --example plain_echo -- 10125
//! ```

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::{self, Read, Write};

const LISTENER: Token = Token(usize::MAX);

struct Conn {
    stream: TcpStream,
    header: [u8; 4],
    got: usize,
    body: Option<Vec<u8>>,
    sent: usize,
}

enum Step {
    Wait,
    Close,
}

impl Conn {
    fn drive(&mut self) -> Step {
        loop {
            if self.body.is_none() {
                match self.stream.read(&mut self.header[self.got..]) {
                    Ok(0) => return Step::Close,
                    Ok(n) => {
                        self.got += n;
                        if self.got == 4 {
                            let len = u32::from_be_bytes(self.header) as usize;
                            if len > 64 << 20 {
                                return Step::Close;
                            }
                            self.body = Some(vec![0; len]);
                            self.got = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
                continue;
            }
            let body = self.body.as_mut().expect("checked above");
            if self.got < body.len() {
                match self.stream.read(&mut body[self.got..]) {
                    Ok(0) => return Step::Close,
                    Ok(n) => self.got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return Step::Close,
                }
                continue;
            }
            if self.sent == body.len() {
                return Step::Close;
            }
            match self.stream.write(&body[self.sent..]) {
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Step::Wait,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
    }
}

fn main() -> io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(10125);
    let mut listener = TcpListener::bind(([127, 0, 0, 1], port).into())?;
    eprintln!("listening on {}", listener.local_addr()?);
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut conns: Slab<Conn> = Slab::new();
    loop {
        match poll.poll(&mut events, None) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => result?,
        }
        for event in &events {
            if event.token() == LISTENER {
                while let Ok((mut stream, _)) = listener.accept() {
                    let entry = conns.vacant_entry();
                    let token = Token(entry.key());
                    poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    entry.insert(Conn {
                        stream,
                        header: [0; 4],
                        got: 0,
                        body: None,
                        sent: 0,
                    });
                }
                continue;
            }
            let key = event.token().0;
            if let Some(conn) = conns.get_mut(key) {
                if let Step::Close = conn.drive() {
                    conns.remove(key);
                }
            }
        }
    }
}
