//! A nats-server with two users, `full` and `member`, whose publish permissions
//! the tests change by rewriting the configuration and reloading it (`SIGHUP`):
//! a way to make the server refuse chosen JetStream API requests of one member.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{topic, WAIT};

pub(crate) struct AuthServer {
    child: Child,
    dir: PathBuf,
    port: u16,
}

impl AuthServer {
    /// Start a server on a free port with a temporary store, every request
    /// allowed.
    pub(crate) fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let dir = std::env::temp_dir().join(topic("nats-auth"));
        std::fs::create_dir_all(&dir).expect("server dir");
        write_config(&dir, port, &[]);
        let binary =
            std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "/usr/sbin/nats-server".into());
        let child = Command::new(&binary)
            .arg("-c")
            .arg(dir.join("server.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{binary}` (set NATS_SERVER_BIN): {e}"));
        let server = Self { child, dir, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < WAIT,
                "nats-server did not accept connections on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Deny user `member` publishing to `subjects` (none: allow everything),
    /// and return once the server has reloaded its configuration. The reload
    /// runs after the signal, on the server's own time, and while it re-creates
    /// the accounts a JetStream request is answered "JetStream not enabled for
    /// account": a test that went on at once would meet that, or the old
    /// permissions.
    pub(crate) fn deny(&self, subjects: &[&str]) {
        let reloads = self.reloads();
        write_config(&self.dir, self.port, subjects);
        let status = Command::new("kill")
            .arg("-HUP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill -HUP");
        assert!(status.success(), "reload nats-server");
        let started = Instant::now();
        while self.reloads() == reloads {
            assert!(
                started.elapsed() < WAIT,
                "nats-server did not log the reload of its configuration within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reloads of the configuration the server has finished, from its log.
    fn reloads(&self) -> usize {
        self.logged(|l| l.contains("Reloaded server configuration"))
    }

    /// Lines of the server's log so far that `line` matches.
    fn logged(&self, line: impl Fn(&str) -> bool) -> usize {
        std::fs::read_to_string(self.dir.join("server.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| line(l))
            .count()
    }

    /// Requests of user `member` to subjects containing `what` the server
    /// refused so far.
    pub(crate) fn refused(&self, what: &str) -> usize {
        self.logged(|l| l.contains("Publish Violation") && l.contains(what))
    }
}

fn write_config(dir: &Path, port: u16, deny: &[&str]) {
    let permissions = if deny.is_empty() {
        String::new()
    } else {
        let list: Vec<String> = deny.iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            ", permissions: {{ publish: {{ deny: [{}] }} }}",
            list.join(", ")
        )
    };
    let conf = format!(
        "listen: 127.0.0.1:{port}\nlog_file: \"{}\"\njetstream {{ store_dir: \"{}\" }}\n\
         authorization {{ users = [\n  {{ user: \"full\", password: \"full\" }}\n  \
         {{ user: \"member\", password: \"member\"{permissions} }}\n] }}\n",
        dir.join("server.log").display(),
        dir.join("js").display()
    );
    std::fs::write(dir.join("server.conf"), conf).expect("server config");
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
