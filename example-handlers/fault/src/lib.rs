//! `libfault.so`: a handler that misbehaves on command, for gaspard's tests.
//!
//! The request is a command, `name` or `name:argument`:
//!
//! | command        | what the worker does                                   |
//! | -------------- | ------------------------------------------------------ |
//! | `pid`          | replies with its process id, in ASCII decimal           |
//! | `echo:BYTES`   | replies with BYTES                                      |
//! | `big:N`        | replies with N bytes of a repeating `0123456789` pattern |
//! | `late:MS:N`    | sleeps MS milliseconds, then replies as `big:N`         |
//! | `sleep:MS`     | sleeps MS milliseconds, then replies `slept`            |
//! | `error:TEXT`   | returns an error with message TEXT                      |
//! | `panic:TEXT`   | panics with message TEXT                                |
//! | `segv`         | dereferences a null pointer (SIGSEGV)                   |
//! | `abort`        | calls `abort()` (SIGABRT)                               |
//! | `exit:CODE`    | calls `exit(CODE)`                                      |
//! | `alloc:MIB`    | allocates and touches MIB MiB, then replies `allocated` |
//!
//! `--handler-config` chooses how `init` behaves: empty for success, or
//! `fail` (init returns an error), `panic`, `segv`, `exit:CODE`, `sleep:MS`,
//! `mark-shutdown:PATH` (succeeds, and shutdown appends `shutdown PID` to
//! PATH, so that tests can tell whether it ran), or `shutdown-exit:CODE`
//! (succeeds, and shutdown calls `exit(CODE)`).

use gaspard_handler_abi::Handler;
use std::io::Write;
use std::time::Duration;

struct Fault {
    /// Where shutdown leaves its mark, if anywhere.
    shutdown_mark: Option<String>,
    /// The status shutdown exits with, if it does.
    shutdown_exit: Option<i32>,
}

const FAULT: Fault = Fault {
    shutdown_mark: None,
    shutdown_exit: None,
};

impl Drop for Fault {
    // The handler's shutdown: gaspard drops the state.
    fn drop(&mut self) {
        if let Some(path) = &self.shutdown_mark {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("the shutdown mark's file opens");
            writeln!(file, "shutdown {}", std::process::id()).expect("the mark is written");
        }
        if let Some(code) = self.shutdown_exit {
            std::process::exit(code);
        }
    }
}

fn repeating(len: usize) -> Vec<u8> {
    b"0123456789".iter().copied().cycle().take(len).collect()
}

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
            ("", _) => Ok(FAULT),
            ("fail", _) => Err("init refused by configuration (fail)".to_string()),
            ("panic", _) => panic!("init panicked by configuration"),
            ("segv", _) => segfault(),
            ("exit", code) => std::process::exit(number(code)? as i32),
            ("sleep", ms) => {
                std::thread::sleep(Duration::from_millis(number(ms)?));
                Ok(FAULT)
            }
            ("mark-shutdown", path) => Ok(Fault {
                shutdown_mark: Some(path.to_string()),
                shutdown_exit: None,
            }),
            ("shutdown-exit", code) => Ok(Fault {
                shutdown_mark: None,
                shutdown_exit: Some(number(code)? as i32),
            }),
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
            b"big" => Ok(repeating(number(&text())? as usize)),
            b"late" => {
                let text = text();
                let (ms, len) = split(&text);
                std::thread::sleep(Duration::from_millis(number(ms)?));
                Ok(repeating(number(len)? as usize))
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
