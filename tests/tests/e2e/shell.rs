//! The README's shell recipe: a request sent from a shell with printf.

use gaspard_tests::start;
use std::process::Command;

#[test]
fn a_shell_script_can_send_a_request_with_printf() {
    let daemon = start("upper", &["--workers", "1"]);
    // bash's /dev/tcp stands in for nc, which a fresh machine may not have;
    // the bytes on the wire are the same.
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port}; printf '\\0\\0\\0\\5hello' >&3; cat <&3",
        port = daemon.addr.port()
    );
    let output = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(output.stdout, b"HELLO");

    if Command::new("nc").arg("-h").output().is_ok() {
        let script = format!(
            "printf '\\0\\0\\0\\5hello' | nc -N 127.0.0.1 {} || printf '\\0\\0\\0\\5hello' | nc -q 1 127.0.0.1 {}",
            daemon.addr.port(),
            daemon.addr.port()
        );
        let output = Command::new("sh").arg("-c").arg(&script).output().unwrap();
        assert_eq!(output.stdout, b"HELLO", "{output:?}");
    }
}
