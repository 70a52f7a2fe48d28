//! A TCP fault proxy for tests against a real broker, after Toxiproxy and
//! Jepsen's partition nemesis.
//!
//! [`FaultProxy::start`] listens on a free loopback port and forwards every
//! connection it accepts to an upstream address. Each direction of the link
//! (client to server, server to client) carries a [`Fault`] of its own that the
//! test changes at any moment with [`FaultProxy::set`]:
//!
//! - [`Fault::Pass`] forwards the bytes as they come.
//! - [`Fault::Latency`] holds every chunk read for the given time before it is
//!   written on.
//! - [`Fault::Blackhole`] lets nothing more through: the direction stops
//!   reading, bytes already read are held, the sockets stay open. This is a
//!   partition as a client sees it: no error, no answer. While the client to
//!   server direction is blackholed, a new connection is accepted and held
//!   without opening its upstream side.
//! - [`Fault::Reset`] closes every connection with a TCP reset (`RST`) to both
//!   its client and its server, and resets every new connection at once while it
//!   is set. A reset is a fault of the connection as a whole: set on either
//!   direction, it closes both.
//!
//! Once [`FaultProxy::set`] returns, no byte is written through a direction
//! whose fault forbids it: every write of the proxy checks the fault under the
//! same lock that `set` takes. Buffers are bounded: one fixed buffer per
//! direction of a connection; a direction that cannot write stops reading, so
//! the peer's own TCP window pushes back.
//!
//! Dropping the proxy closes its listener and every connection.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// Size of the one buffer each direction of a connection copies through.
const BUFFER: usize = 16 * 1024;

/// A direction of the proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Bytes the client sends to the server.
    ToServer,
    /// Bytes the server sends to the client.
    ToClient,
}

/// What a direction of the link does to the bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    /// Forward the bytes as they come.
    #[default]
    Pass,
    /// Hold each chunk for this long before writing it on.
    Latency(Duration),
    /// Let nothing more through: stop reading, hold what was read, keep the
    /// sockets open.
    Blackhole,
    /// Reset every connection, and every new one while set.
    Reset,
}

/// The faults in force, and how many times connections were reset.
#[derive(Debug, Clone, Copy, Default)]
struct Faults {
    to_server: Fault,
    to_client: Fault,
    /// Bumped on every reset: a connection started under an older count resets.
    resets: u64,
}

impl Faults {
    fn get(&self, direction: Direction) -> Fault {
        match direction {
            Direction::ToServer => self.to_server,
            Direction::ToClient => self.to_client,
        }
    }

    fn resetting(&self) -> bool {
        self.to_server == Fault::Reset || self.to_client == Fault::Reset
    }
}

/// Counts of the proxy's connections.
#[derive(Debug, Default)]
struct Counts {
    accepted: AtomicUsize,
    open: AtomicUsize,
    reset: AtomicUsize,
}

/// A TCP proxy on a loopback port whose two directions fail on demand; see the
/// [module documentation](self).
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    faults: watch::Sender<Faults>,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listen on a free loopback port and forward every connection to
    /// `upstream`, both directions passing.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), upstream).await
    }

    /// [`start`](Self::start), listening on `listen`: an address a broker was
    /// told to advertise before the proxy existed.
    pub async fn start_on(listen: SocketAddr, upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (faults, _) = watch::channel(Faults::default());
        let counts = Arc::new(Counts::default());
        let task = tokio::spawn(accept_loop(
            listener,
            upstream,
            faults.subscribe(),
            Arc::clone(&counts),
        ));
        Ok(Self {
            addr,
            upstream,
            faults,
            counts,
            task,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Set the fault of one direction. Setting [`Fault::Reset`] resets every
    /// open connection.
    pub fn set(&self, direction: Direction, fault: Fault) {
        self.faults.send_modify(|f| {
            match direction {
                Direction::ToServer => f.to_server = fault,
                Direction::ToClient => f.to_client = fault,
            }
            if fault == Fault::Reset {
                f.resets += 1;
            }
        });
    }

    /// Set the same fault on both directions.
    pub fn set_both(&self, fault: Fault) {
        self.faults.send_modify(|f| {
            f.to_server = fault;
            f.to_client = fault;
            if fault == Fault::Reset {
                f.resets += 1;
            }
        });
    }

    /// Cut the link both ways: [`Fault::Blackhole`] on both directions.
    pub fn blackhole(&self) {
        self.set_both(Fault::Blackhole);
    }

    /// Restore the link: [`Fault::Pass`] on both directions. Held bytes flow on.
    pub fn restore(&self) {
        self.set_both(Fault::Pass);
    }

    /// Reset every open connection once, leaving the faults as they are.
    pub fn reset_connections(&self) {
        self.faults.send_modify(|f| f.resets += 1);
    }

    /// The fault of one direction.
    pub fn fault(&self, direction: Direction) -> Fault {
        self.faults.borrow().get(direction)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }

    /// Connections open now (accepted and not yet closed or reset).
    pub fn open(&self) -> usize {
        self.counts.open.load(Ordering::SeqCst)
    }

    /// Connections closed with a reset so far.
    pub fn resets(&self) -> usize {
        self.counts.reset.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    faults: watch::Receiver<Faults>,
    counts: Arc<Counts>,
) {
    // Dropped with this task, which aborts every connection's task.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else { continue };
                counts.accepted.fetch_add(1, Ordering::SeqCst);
                counts.open.fetch_add(1, Ordering::SeqCst);
                let faults = faults.clone();
                let counts = Arc::clone(&counts);
                connections.spawn(async move {
                    let reset = connection(client, upstream, faults).await;
                    if reset {
                        counts.reset.fetch_add(1, Ordering::SeqCst);
                    }
                    counts.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Close a socket with a TCP reset.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Serve one connection; true when it ended with a reset.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut faults: watch::Receiver<Faults>,
) -> bool {
    let epoch = {
        let f = faults.borrow_and_update();
        if f.resetting() {
            drop(f);
            reset(client);
            return true;
        }
        f.resets
    };
    // A blackholed client-to-server direction: the connection request does not
    // reach the server either.
    loop {
        let f = *faults.borrow_and_update();
        if f.resets != epoch || f.resetting() {
            reset(client);
            return true;
        }
        if f.to_server != Fault::Blackhole {
            break;
        }
        if faults.changed().await.is_err() {
            return false;
        }
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return true;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let reset_both = {
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(
            client_read,
            server_write,
            Direction::ToServer,
            faults.clone(),
            epoch,
        );
        let down = pump(
            server_read,
            client_write,
            Direction::ToClient,
            faults.clone(),
            epoch,
        );
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                end = &mut up, if !up_done => match end {
                    End::Reset => break true,
                    End::Closed => up_done = true,
                },
                end = &mut down, if !down_done => match end {
                    End::Reset => break true,
                    End::Closed => down_done = true,
                },
            }
            if up_done && down_done {
                break false;
            }
        }
    };
    if reset_both {
        reset(client);
        reset(server);
    }
    reset_both
}

/// How a direction of a connection ended.
enum End {
    /// The reading side closed; the writing side was shut down after it.
    Closed,
    /// The connection must be reset (a fault, or an error on either socket).
    Reset,
}

/// What a direction may do now.
enum Now {
    Forward(Fault),
    Wait,
    Reset,
}

fn now(faults: &Faults, direction: Direction, epoch: u64) -> Now {
    if faults.resets != epoch || faults.resetting() {
        return Now::Reset;
    }
    match faults.get(direction) {
        Fault::Blackhole => Now::Wait,
        fault => Now::Forward(fault),
    }
}

/// Copy one direction through a fixed buffer, obeying its fault.
async fn pump(
    from: ReadHalf<'_>,
    mut to: WriteHalf<'_>,
    direction: Direction,
    mut faults: watch::Receiver<Faults>,
    epoch: u64,
) -> End {
    let mut buf = vec![0u8; BUFFER];
    loop {
        // Read, unless the direction is blackholed.
        let state = *faults.borrow_and_update();
        let fault = match now(&state, direction, epoch) {
            Now::Reset => return End::Reset,
            Now::Wait => {
                if faults.changed().await.is_err() {
                    return End::Reset;
                }
                continue;
            }
            Now::Forward(fault) => fault,
        };
        let read = tokio::select! {
            biased;
            changed = faults.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
                continue;
            }
            ready = from.readable() => {
                if ready.is_err() {
                    return End::Reset;
                }
                from.try_read(&mut buf)
            }
        };
        let n = match read {
            Ok(0) => {
                let _ = to.shutdown().await;
                return End::Closed;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return End::Reset,
        };
        let due = match fault {
            Fault::Latency(delay) => Some(Instant::now() + delay),
            _ => None,
        };
        // Write it all, holding it while the direction is blackholed.
        let mut written = 0;
        while written < n {
            let state = *faults.borrow_and_update();
            match now(&state, direction, epoch) {
                Now::Reset => return End::Reset,
                Now::Wait => {
                    if faults.changed().await.is_err() {
                        return End::Reset;
                    }
                    continue;
                }
                Now::Forward(_) => {}
            }
            if let Some(due) = due {
                if Instant::now() < due {
                    tokio::select! {
                        biased;
                        changed = faults.changed() => {
                            if changed.is_err() {
                                return End::Reset;
                            }
                        }
                        () = tokio::time::sleep_until(due) => {}
                    }
                    continue;
                }
            }
            tokio::select! {
                biased;
                changed = faults.changed() => {
                    if changed.is_err() {
                        return End::Reset;
                    }
                    continue;
                }
                ready = to.writable() => {
                    if ready.is_err() {
                        return End::Reset;
                    }
                }
            }
            // The fault is checked again under the lock `set` takes, so no byte
            // passes once a blackhole or reset is set.
            let wrote = {
                let f = faults.borrow_and_update();
                match now(&f, direction, epoch) {
                    Now::Forward(_) => Some(to.try_write(&buf[written..n])),
                    Now::Wait | Now::Reset => None,
                }
            };
            match wrote {
                None => continue,
                Some(Ok(k)) => written += k,
                Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Some(Err(_)) => return End::Reset,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const LIMIT: Duration = Duration::from_secs(10);

    /// A loopback echo server: every byte read is written back.
    async fn echo_server() -> (SocketAddr, JoinHandle<()>) {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                conns.spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, task)
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).await.unwrap();
        let mut back = vec![0u8; bytes.len()];
        tokio::time::timeout(LIMIT, stream.read_exact(&mut back))
            .await
            .expect("the echo came back through the proxy")
            .unwrap();
        back
    }

    /// Bytes readable from `stream` within `window`; none is expected.
    async fn nothing_within(stream: &mut TcpStream, window: Duration) -> bool {
        let mut byte = [0u8; 1];
        tokio::time::timeout(window, stream.read(&mut byte))
            .await
            .is_err()
    }

    async fn expect_reset(stream: &mut TcpStream) {
        let mut buf = [0u8; 64];
        let got = tokio::time::timeout(LIMIT, stream.read(&mut buf))
            .await
            .expect("the proxy closed the connection");
        let err = got.expect_err("the connection ends with an error, not data or EOF");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
    }

    #[tokio::test]
    async fn passes_bytes_both_ways() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        let (mut r, mut w) = c.split();
        let (_, back) = tokio::join!(async { w.write_all(&big).await.unwrap() }, async {
            let mut back = vec![0u8; big.len()];
            r.read_exact(&mut back).await.unwrap();
            back
        });
        assert_eq!(back, big, "200 KB echoed through 16 KB buffers unchanged");
        assert_eq!(proxy.accepted(), 1);
        assert_eq!(proxy.open(), 1);
        drop(c);
        crate::wait_until("the proxy closed its side", LIMIT, || proxy.open() == 0).await;
        assert_eq!(proxy.resets(), 0, "a clean close is not a reset");
    }

    #[tokio::test(start_paused = true)]
    async fn latency_holds_each_chunk() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.set(Direction::ToServer, Fault::Latency(Duration::from_secs(30)));
        c.write_all(b"slow").await.unwrap();
        // Paused time: the runtime advances the clock only when every task is
        // idle, so the echo cannot come back before the 30 s have passed.
        let start = Instant::now();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"slow");
        assert!(
            start.elapsed() >= Duration::from_secs(30),
            "the chunk was held for its latency, came after {:?}",
            start.elapsed()
        );
    }

    #[tokio::test]
    async fn blackhole_holds_bytes_and_restore_delivers_them() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"before").await, b"before");

        proxy.blackhole();
        c.write_all(b"during").await.unwrap();
        assert!(
            nothing_within(&mut c, Duration::from_millis(300)).await,
            "a byte came through a blackholed link"
        );
        assert_eq!(proxy.open(), 1, "a blackhole keeps the connection open");
        assert_eq!(proxy.resets(), 0);

        proxy.restore();
        let mut back = [0u8; 6];
        tokio::time::timeout(LIMIT, c.read_exact(&mut back))
            .await
            .expect("the held bytes flow on once the link is restored")
            .unwrap();
        assert_eq!(&back, b"during");
    }

    #[tokio::test]
    async fn one_direction_blackholed_the_other_passes() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        // The server's answers are held; the requests still reach it.
        proxy.set(Direction::ToClient, Fault::Blackhole);
        assert_eq!(proxy.fault(Direction::ToServer), Fault::Pass);
        c.write_all(b"ping").await.unwrap();
        assert!(
            nothing_within(&mut c, Duration::from_millis(300)).await,
            "an answer came through a blackholed server-to-client direction"
        );
        proxy.set(Direction::ToClient, Fault::Pass);
        let mut back = [0u8; 4];
        tokio::time::timeout(LIMIT, c.read_exact(&mut back))
            .await
            .expect("the held answer arrives once the direction passes")
            .unwrap();
        assert_eq!(&back, b"ping");
    }

    #[tokio::test]
    async fn new_connection_under_blackhole_is_held_not_forwarded() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let proxy = FaultProxy::start(listener.local_addr().unwrap())
            .await
            .unwrap();
        proxy.set(Direction::ToServer, Fault::Blackhole);
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        crate::wait_until("the proxy accepted the connection", LIMIT, || {
            proxy.accepted() == 1
        })
        .await;
        assert!(
            tokio::time::timeout(Duration::from_millis(300), listener.accept())
                .await
                .is_err(),
            "the upstream saw a connection opened through a blackhole"
        );
        proxy.restore();
        let (mut upstream_side, _) = tokio::time::timeout(LIMIT, listener.accept())
            .await
            .expect("the held connection reaches the upstream once restored")
            .unwrap();
        c.write_all(b"hi").await.unwrap();
        let mut got = [0u8; 2];
        upstream_side.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
    }

    #[tokio::test]
    async fn reset_closes_open_connections_and_refuses_new_ones() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"x").await, b"x");

        proxy.set(Direction::ToServer, Fault::Reset);
        expect_reset(&mut c).await;
        crate::wait_until("the proxy counted the reset", LIMIT, || {
            proxy.resets() == 1 && proxy.open() == 0
        })
        .await;

        // While set, a new connection is reset at once.
        let mut d = TcpStream::connect(proxy.addr()).await.unwrap();
        expect_reset(&mut d).await;

        proxy.restore();
        let mut e = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut e, b"back").await, b"back");
    }

    #[tokio::test]
    async fn reset_connections_resets_once_and_leaves_the_link_up() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"x").await, b"x");
        proxy.reset_connections();
        expect_reset(&mut c).await;
        let mut d = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut d, b"y").await, b"y");
    }

    #[tokio::test]
    async fn reset_while_blackholed_drops_the_held_bytes() {
        let (upstream, _echo) = echo_server().await;
        let proxy = FaultProxy::start(upstream).await.unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut c, b"x").await, b"x");
        proxy.blackhole();
        c.write_all(b"held").await.unwrap();
        proxy.set_both(Fault::Reset);
        expect_reset(&mut c).await;
    }

    #[tokio::test]
    async fn upstream_closing_is_passed_on_as_eof() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let proxy = FaultProxy::start(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut c = TcpStream::connect(proxy.addr()).await.unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"bye").await.unwrap();
        drop(s);
        let mut all = Vec::new();
        tokio::time::timeout(LIMIT, c.read_to_end(&mut all))
            .await
            .expect("EOF passed on")
            .unwrap();
        assert_eq!(all, b"bye");
    }
}
