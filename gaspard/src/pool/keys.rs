//! CURVE keys for worker pools: `gaspard keygen PREFIX` writes a key pair,
//! and the daemon and worker hosts read them back.
//!
//! Files are text, keys in Z85 (40 characters for 32 bytes):
//! - `PREFIX.key`, the secret file (mode 0600, refused if others can read
//!   it): `public-key = …` and `secret-key = …` lines;
//! - `PREFIX.pub`: the public key and a comment on one line, so that
//!   `cat host.pub >> authorized` adds a host to `--pool-authorized`.
//!
//! An authorized-keys file has one public key per line, optionally followed
//! by a comment; blank lines and lines starting with `#` are skipped.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A CURVE key: 32 bytes.
pub(crate) type Key = [u8; 32];

/// The argument that selects `gaspard keygen`.
pub const KEYGEN_ARG: &str = "keygen";

/// A key pair read from a secret file.
#[derive(Clone)]
pub(crate) struct KeyPair {
    pub(crate) public: Key,
    pub(crate) secret: Key,
}

/// Shows the public half only.
impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyPair {{ public: {} }}", encode(&self.public))
    }
}

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: others can read this secret key (mode {mode:o}); chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path}, line {line}: {what}")]
    Bad {
        path: PathBuf,
        line: usize,
        what: String,
    },
    #[error("{path}: no {what} in it")]
    Missing { path: PathBuf, what: &'static str },
    #[error("this gaspard's libzmq has no CURVE (see gaspard --version)")]
    NoCurve,
    #[error("cannot make a key pair: {0}")]
    Generate(zmq::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A key in Z85, checked.
fn decode(text: &str) -> Result<Key, String> {
    if text.len() != 40 {
        return Err(format!("a key is 40 Z85 characters, not {}", text.len()));
    }
    let bytes = zmq::z85_decode(text).map_err(|e| format!("not Z85: {e}"))?;
    Key::try_from(bytes.as_slice()).map_err(|_| "not a 32-byte key".to_string())
}

/// A key as Z85 text.
pub(crate) fn encode(key: &Key) -> String {
    zmq::z85_encode(key).expect("32 bytes are a multiple of 4")
}

/// Writes `PREFIX.key` (0600) and `PREFIX.pub`, refusing to overwrite
/// either. Returns their paths.
pub fn generate(prefix: &Path) -> Result<(PathBuf, PathBuf), KeyError> {
    if zmq::has("curve") != Some(true) {
        return Err(KeyError::NoCurve);
    }
    let pair = zmq::CurveKeyPair::new().map_err(KeyError::Generate)?;
    let (public, secret) = (encode(&pair.public_key), encode(&pair.secret_key));
    let with = |extension: &str| {
        let mut name = prefix.as_os_str().to_owned();
        name.push(extension);
        PathBuf::from(name)
    };
    let (secret_path, public_path) = (with(".key"), with(".pub"));
    let comment = prefix
        .file_name()
        .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
    write_new(
        &secret_path,
        0o600,
        &format!(
            "# gaspard CURVE key pair ({comment}), written by gaspard keygen: keep it private\n\
             public-key = {public}\nsecret-key = {secret}\n"
        ),
    )?;
    write_new(&public_path, 0o644, &format!("{public} {comment}\n"))?;
    Ok((secret_path, public_path))
}

fn write_new(path: &Path, mode: u32, text: &str) -> Result<(), KeyError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_error(path))?;
    file.write_all(text.as_bytes()).map_err(io_error(path))
}

/// The meaningful lines of a key file: (line number, text), without
/// comments and blank lines.
fn lines(path: &Path) -> Result<Vec<(usize, String)>, KeyError> {
    let text = fs::read_to_string(path).map_err(io_error(path))?;
    Ok(text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim().to_string()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'))
        .collect())
}

fn bad(path: &Path, line: usize, what: impl Into<String>) -> KeyError {
    KeyError::Bad {
        path: path.to_path_buf(),
        line,
        what: what.into(),
    }
}

/// Reads a secret file that `gaspard keygen` wrote.
pub(crate) fn read_pair(path: &Path) -> Result<KeyPair, KeyError> {
    let mode = fs::metadata(path)
        .map_err(io_error(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let (mut public, mut secret) = (None, None);
    for (line, text) in lines(path)? {
        let Some((name, value)) = text.split_once('=') else {
            return Err(bad(path, line, "expected `name = key`"));
        };
        let key = decode(value.trim()).map_err(|what| bad(path, line, what))?;
        match name.trim() {
            "public-key" => public = Some(key),
            "secret-key" => secret = Some(key),
            other => return Err(bad(path, line, format!("unknown entry {other:?}"))),
        }
    }
    let missing = |what| KeyError::Missing {
        path: path.to_path_buf(),
        what,
    };
    Ok(KeyPair {
        public: public.ok_or_else(|| missing("public-key"))?,
        secret: secret.ok_or_else(|| missing("secret-key"))?,
    })
}

/// Reads the public keys of a file: a `.pub` file, or an authorized-keys
/// file (several).
pub(crate) fn read_public(path: &Path) -> Result<Vec<Key>, KeyError> {
    lines(path)?
        .into_iter()
        .map(|(line, text)| {
            let key = text.split_whitespace().next().unwrap_or_default();
            decode(key).map_err(|what| bad(path, line, what))
        })
        .collect()
}

/// Reads the one public key of a `.pub` file.
pub(crate) fn read_one_public(path: &Path) -> Result<Key, KeyError> {
    let keys = read_public(path)?;
    match keys.as_slice() {
        [key] => Ok(*key),
        [] => Err(KeyError::Missing {
            path: path.to_path_buf(),
            what: "public key",
        }),
        _ => Err(bad(path, 0, "more than one key where one was expected")),
    }
}

/// `gaspard keygen PREFIX`.
pub fn run_keygen(mut args: impl Iterator<Item = std::ffi::OsString>) -> std::process::ExitCode {
    use std::process::ExitCode;
    let (Some(prefix), None) = (args.next(), args.next()) else {
        eprintln!(
            "usage: gaspard {KEYGEN_ARG} PREFIX\n  writes PREFIX.key (the secret key, mode 0600) \
             and PREFIX.pub (its public key)"
        );
        return ExitCode::from(2);
    };
    match generate(Path::new(&prefix)) {
        Ok((secret, public)) => {
            println!("{}\n{}", secret.display(), public.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gaspard: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_reads_back_and_its_public_half_is_authorizable() {
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("daemon");
        let (secret, public) = generate(&prefix).unwrap();
        let pair = read_pair(&secret).unwrap();
        assert_eq!(read_one_public(&public).unwrap(), pair.public);
        let mode = fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(generate(&prefix).is_err(), "never overwrites a key");

        let authorized = dir.path().join("authorized");
        let line = fs::read_to_string(&public).unwrap();
        fs::write(&authorized, format!("# workers\n\n{line}  {line}")).unwrap();
        assert_eq!(
            read_public(&authorized).unwrap(),
            vec![pair.public, pair.public]
        );
    }

    #[test]
    fn a_secret_file_others_can_read_or_a_bad_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (secret, _) = generate(&dir.path().join("k")).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(read_pair(&secret), Err(KeyError::Exposed { .. })));

        let bad_file = dir.path().join("bad.pub");
        fs::write(&bad_file, "not-a-key comment\n").unwrap();
        let error = read_public(&bad_file).unwrap_err().to_string();
        assert!(error.contains("line 1"), "{error}");
    }
}
