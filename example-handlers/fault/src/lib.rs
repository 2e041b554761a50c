//! `libfault.so`: a handler that misbehaves on command, for gaspard's tests.
//!
//! The request is a command, `name` or `name:argument`:
//!
//! | command        | what the worker does                                   |
//! | -------------- | ------------------------------------------------------ |
//! | `pid`          | replies with its process id, in ASCII decimal           |
//! | `echo:BYTES`   | replies with BYTES                                      |
//! | `big:N`        | replies with N bytes of a repeating `0123456789` pattern |
//! | `sleep:MS`     | sleeps MS milliseconds, then replies `slept`            |
//! | `error:TEXT`   | returns an error with message TEXT                      |
//! | `panic:TEXT`   | panics with message TEXT                                |
//! | `segv`         | dereferences a null pointer (SIGSEGV)                   |
//! | `abort`        | calls `abort()` (SIGABRT)                               |
//! | `exit:CODE`    | calls `exit(CODE)`                                      |
//! | `alloc:MIB`    | allocates and touches MIB MiB, then replies `allocated` |
//!
//! `--handler-config` chooses how `init` behaves: empty for success, or
//! `fail` (init returns an error), `panic`, `segv`, `exit:CODE`, `sleep:MS`.

use gaspard_handler_abi::Handler;
use std::time::Duration;

struct Fault;

fn split(text: &str) -> (&str, &str) {
    text.split_once(':').unwrap_or((text, ""))
}

fn number(arg: &str) -> Result<u64, String> {
    arg.trim()
        .parse()
        .map_err(|_| format!("{arg:?} is not a number"))
}

fn segfault() -> ! {
    // SAFETY: deliberately unsound: this handler exists to crash its worker.
    unsafe {
        let null: *mut u8 = std::ptr::null_mut();
        std::ptr::write_volatile(null, 1);
    }
    unreachable!("writing through a null pointer returned")
}

impl Handler for Fault {
    type Error = String;

    fn init(config: &str) -> Result<Self, String> {
        match split(config) {
            ("", _) => Ok(Fault),
            ("fail", _) => Err("init refused by configuration (fail)".to_string()),
            ("panic", _) => panic!("init panicked by configuration"),
            ("segv", _) => segfault(),
            ("exit", code) => std::process::exit(number(code)? as i32),
            ("sleep", ms) => {
                std::thread::sleep(Duration::from_millis(number(ms)?));
                Ok(Fault)
            }
            (other, _) => Err(format!("unknown init behaviour {other:?}")),
        }
    }

    fn handle(&mut self, request: &[u8]) -> Result<Vec<u8>, String> {
        let (command, arg) = match request.iter().position(|&b| b == b':') {
            Some(at) => (&request[..at], &request[at + 1..]),
            None => (request, &[][..]),
        };
        let text = || String::from_utf8_lossy(arg).into_owned();
        match command {
            b"pid" => Ok(std::process::id().to_string().into_bytes()),
            b"echo" => Ok(arg.to_vec()),
            b"big" => {
                let len = number(&text())? as usize;
                Ok(b"0123456789".iter().copied().cycle().take(len).collect())
            }
            b"sleep" => {
                std::thread::sleep(Duration::from_millis(number(&text())?));
                Ok(b"slept".to_vec())
            }
            b"error" => Err(text()),
            b"panic" => panic!("{}", text()),
            b"segv" => segfault(),
            b"abort" => std::process::abort(),
            b"exit" => std::process::exit(number(&text())? as i32),
            b"alloc" => {
                let mib = number(&text())? as usize;
                let block = vec![1u8; mib << 20];
                Ok(format!("allocated {}", block.iter().step_by(4096).count()).into_bytes())
            }
            _ => Err(format!(
                "unknown command {:?}",
                String::from_utf8_lossy(command)
            )),
        }
    }
}

gaspard_handler_abi::export_handler!(state = Fault);
