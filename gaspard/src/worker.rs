//! The worker process: `gaspard` re-executed with the hidden `__worker`
//! argument. It loads the handler, tells the daemon it is ready, then serves
//! requests one at a time until it is killed or the daemon disappears.
//!
//! It knows nothing about TCP clients: requests come in on its own PULL
//! socket and replies go out on the daemon's shared PULL socket.

use crate::channel::{self, Kind};
use crate::plugin::Plugin;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The argument that selects worker mode.
pub const WORKER_ARG: &str = "__worker";

/// The handler config travels in the environment, which only the owner can
/// read, rather than on the command line, which `ps` shows to everyone.
pub const CONFIG_ENV: &str = "GASPARD_WORKER_HANDLER_CONFIG";

/// How often a worker waiting for a request re-checks whether it was asked to
/// stop: a SIGTERM that lands just before the wait must not be lost.
const STOP_CHECK: i32 = 250;

/// Exit code of a worker whose handler could not be loaded.
pub const EXIT_INIT_FAILED: u8 = 3;

/// What the daemon tells a worker on its command line.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub runtime_dir: PathBuf,
    pub incarnation: u64,
    pub daemon_pid: i32,
    /// The operator's handler file, as named in messages.
    pub handler: PathBuf,
    /// The snapshot of it that this worker loads.
    pub load_from: PathBuf,
    pub handler_config: String,
}

impl WorkerArgs {
    /// The command-line arguments after the program name.
    pub fn to_args(&self) -> Vec<std::ffi::OsString> {
        vec![
            WORKER_ARG.into(),
            self.runtime_dir.clone().into(),
            self.incarnation.to_string().into(),
            self.daemon_pid.to_string().into(),
            self.handler.clone().into(),
            self.load_from.clone().into(),
        ]
    }

    /// Parses what [`Self::to_args`] wrote (after `__worker`).
    pub fn parse(mut args: impl Iterator<Item = std::ffi::OsString>) -> Result<WorkerArgs, String> {
        let mut next = |what: &str| args.next().ok_or_else(|| format!("worker: missing {what}"));
        let runtime_dir = PathBuf::from(next("runtime dir")?);
        let number = |text: std::ffi::OsString, what: &str| {
            text.to_str()
                .and_then(|t| t.parse::<u64>().ok())
                .ok_or_else(|| format!("worker: bad {what}"))
        };
        let incarnation = number(next("incarnation")?, "incarnation")?;
        let daemon_pid = number(next("daemon pid")?, "daemon pid")? as i32;
        let handler = PathBuf::from(next("handler")?);
        let load_from = PathBuf::from(next("handler snapshot")?);
        let handler_config = std::env::var(CONFIG_ENV).unwrap_or_default();
        Ok(WorkerArgs {
            runtime_dir,
            incarnation,
            daemon_pid,
            handler,
            load_from,
            handler_config,
        })
    }
}

/// A reply buffer the handler writes into and zmq sends without a copy.
struct ReplyBuffer(zmq::Message);

impl AsMut<[u8]> for ReplyBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// A zmq message of `len` bytes for the handler to fill; `None` (NULL to the
/// handler) if it cannot be allocated, rather than a panic across the ABI.
fn reply_buffer(len: usize) -> Option<ReplyBuffer> {
    std::panic::catch_unwind(|| ReplyBuffer(zmq::Message::with_size(len))).ok()
}

/// The worker's main function.
pub fn run(args: WorkerArgs) -> ExitCode {
    // Die with the daemon, even on kill -9; if it is already gone, stop now.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        log::warn!("worker: cannot ask to die with the daemon: {e}");
    }
    if nix::unistd::getppid().as_raw() != args.daemon_pid {
        return ExitCode::FAILURE;
    }
    match serve(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("worker {}: {e:#}", args.incarnation);
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &WorkerArgs) -> anyhow::Result<()> {
    let ctx = zmq::Context::new();
    let replies = channel::socket(&ctx, zmq::PUSH)?;
    // Replies the daemon has not read yet are worth a short wait at exit.
    replies.set_linger(1000)?;
    replies.connect(&channel::replies_endpoint(&args.runtime_dir))?;

    let mut plugin = match Plugin::load_as(&args.load_from, &args.handler, &args.handler_config) {
        Ok(plugin) => plugin,
        Err(e) => {
            let reason = e.to_string();
            channel::try_send(
                &replies,
                &channel::header(Kind::InitFailed, args.incarnation),
                reason.as_bytes().into(),
            )?;
            drop(replies);
            drop(ctx);
            std::process::exit(EXIT_INIT_FAILED.into());
        }
    };
    let requests = channel::socket(&ctx, zmq::PULL)?;
    requests.set_rcvtimeo(STOP_CHECK)?;
    requests.bind(&channel::worker_endpoint(
        &args.runtime_dir,
        args.incarnation,
    ))?;
    log::debug!(
        "worker {} (pid {}): handler {:?} ready",
        args.incarnation,
        std::process::id(),
        plugin.name()
    );
    // SIGTERM asks for a graceful stop: finish the request at hand, then
    // call the handler's shutdown. Set up before Ready, so that a stop sent
    // as soon as the daemon knows this worker still calls shutdown; the
    // receive below wakes every STOP_CHECK to look at the flag.
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
    replies.send(
        &channel::header(Kind::Ready, args.incarnation)[..],
        zmq::SNDMORE,
    )?;
    replies.send(std::process::id().to_string().as_bytes(), 0)?;

    let mut id_frame = zmq::Message::new();
    let mut payload = zmq::Message::new();
    while !stop.load(Ordering::Relaxed) {
        match requests.recv(&mut id_frame, 0) {
            Ok(()) => {}
            Err(zmq::Error::EINTR | zmq::Error::EAGAIN) => continue,
            Err(e) => return Err(e.into()),
        }
        if !id_frame.get_more() {
            log::error!(
                "worker {}: dropped a request with no payload frame",
                args.incarnation
            );
            continue;
        }
        // The frames of a message arrive together; only a signal can delay this.
        while let Err(e) = requests.recv(&mut payload, 0) {
            if !matches!(e, zmq::Error::EINTR | zmq::Error::EAGAIN) {
                return Err(e.into());
            }
        }
        let Ok(id) = <[u8; 8]>::try_from(&id_frame[..]).map(u64::from_le_bytes) else {
            log::error!(
                "worker {}: dropped a request with a malformed id",
                args.incarnation
            );
            continue;
        };
        let outcome = plugin.handle(&payload, reply_buffer);
        let (kind, body) = match outcome {
            Ok(Some(reply)) => (Kind::Reply, reply.0),
            Ok(None) => (Kind::Reply, zmq::Message::new()),
            Err(error) => (Kind::Failed, zmq::Message::from(error.as_bytes())),
        };
        replies.send(&channel::header(kind, id)[..], zmq::SNDMORE)?;
        replies.send(body, 0)?;
    }
    log::debug!("worker {}: stopping on request", args.incarnation);
    drop(plugin);
    Ok(())
}
