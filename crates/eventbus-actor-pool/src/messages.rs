//! The messages the pool's actors receive: the supervisor's and a worker's. They
//! have a module of their own so that every part that sends one (the pool, the
//! shared state a worker hands routes through, the supervisor) depends on them
//! and not on the actor that receives them.

use tokio::sync::oneshot;
use tokio::time::Instant;

/// What the supervisor receives (besides supervision events).
#[derive(Debug)]
pub(crate) enum SupervisorMsg {
    /// Stop every worker: gracefully until `deadline`, then by force. Replies once
    /// all of them have exited; the supervisor then stops.
    Shutdown {
        deadline: Instant,
        reply: oneshot::Sender<()>,
    },
    /// Start a fresh actor on slot `index`, out of service: at the end of cool-down
    /// `epoch` (ignored when a later cool-down began since), or now when `None`.
    Revive { index: usize, epoch: Option<u64> },
    /// Start a fresh actor now on every slot out of service.
    ReviveAll,
    /// Start the first actor of slot `index`, asked for by the first job routed to it.
    Start { index: usize },
}

/// What a worker actor receives.
#[derive(Debug)]
pub(crate) enum WorkerMsg {
    /// Serve the slot's queue until it is closed and empty.
    Serve,
}
