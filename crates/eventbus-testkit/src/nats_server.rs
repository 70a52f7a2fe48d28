//! A real `nats-server` for tests, benchmarks and fault runs: started on a free port
//! with a temporary store directory (JetStream, file storage), killed on drop.
//!
//! The binary is `$NATS_SERVER_BIN`, else `nats-server` on the `PATH`, else
//! `/usr/sbin/nats-server` (where Debian's package puts it).

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server gets to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A running `nats-server` with JetStream.
#[derive(Debug)]
pub struct NatsServer {
    child: Option<Child>,
    binary: String,
    port: u16,
    store: tempfile::TempDir,
    log: PathBuf,
}

fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free local port: {e}"))
}

fn candidates() -> Vec<String> {
    match std::env::var("NATS_SERVER_BIN") {
        Ok(bin) if !bin.trim().is_empty() => vec![bin],
        _ => vec!["nats-server".to_owned(), "/usr/sbin/nats-server".to_owned()],
    }
}

impl NatsServer {
    /// Start a server, or panic saying why (for tests).
    pub fn start() -> Self {
        Self::try_start().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Start a server, or say why it could not be started.
    pub fn try_start() -> Result<Self, String> {
        let mut store =
            tempfile::tempdir().map_err(|e| format!("temporary store directory: {e}"))?;
        let mut log = store.path().join("server.log");
        let mut tried = Vec::new();
        for binary in candidates() {
            let mut server = Self {
                child: None,
                binary,
                port: free_port()?,
                store,
                log,
            };
            match server.spawn() {
                Ok(()) => return Ok(server),
                Err(SpawnError::NotFound(e)) => {
                    tried.push(format!("`{}`: {e}", server.binary));
                    store = server.take_store();
                    log = server.log.clone();
                }
                Err(SpawnError::Failed(e)) => return Err(e),
            }
        }
        Err(format!(
            "cannot start nats-server (tried {}): the NATS tests and benchmarks need a real \
             nats-server; install it with `apt-get install -y nats-server` or set NATS_SERVER_BIN",
            tried.join(", ")
        ))
    }

    fn take_store(&mut self) -> tempfile::TempDir {
        std::mem::replace(
            &mut self.store,
            tempfile::tempdir().expect("temporary store directory"),
        )
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the binary says of its version (`nats-server: v2.9.10`), or empty.
    pub fn version(&self) -> String {
        Command::new(&self.binary)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) -> Result<(), SpawnError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| SpawnError::Failed(format!("server log file: {e}")))?;
        let store = self.store.path().join("js");
        let child = Command::new(&self.binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(&store)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| SpawnError::NotFound(e.to_string()))?;
        self.child = Some(child);
        self.wait_ready().map_err(SpawnError::Failed)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(format!(
                    "nats-server exited with {status} before accepting connections on port {}; log:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(format!(
                    "nats-server did not accept connections on port {} within {START_TIMEOUT:?}; log:\n{}",
                    self.port,
                    self.log_text()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kill the server at once (`SIGKILL`), keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the server again on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn() {
            match e {
                SpawnError::NotFound(e) | SpawnError::Failed(e) => {
                    panic!("restart nats-server: {e}")
                }
            }
        }
    }

    /// Freeze the server (`SIGSTOP`): connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, sig: &str) {
        let pid = self.pid().expect("nats-server is not running");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} {pid} failed: {status}");
    }
}

enum SpawnError {
    /// The binary could not be run; the next candidate is tried.
    NotFound(String),
    /// It ran but did not come up.
    Failed(String),
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
