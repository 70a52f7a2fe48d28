//! The worker actor: serves one slot, running its jobs one at a time in order.
//!
//! Jobs never travel through the actor's (unbounded) ractor mailbox. They wait in the
//! slot's bounded queue, which the pool owns, and the actor pulls them from it. The
//! mailbox carries one message per actor life: the `Serve` it sends itself on start.

use std::sync::Arc;

use eventbus_core::raw::routes::victim;
use eventbus_core::raw::{JobClass, OutcomeKind};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};

use crate::messages::WorkerMsg;
use crate::shared::Shared;
use crate::slot::Slot;

/// The worker actor.
#[derive(Debug)]
pub(crate) struct Worker;

/// Start-up arguments and state of a worker.
pub(crate) struct WorkerState {
    pub(crate) shared: Arc<Shared>,
    pub(crate) index: usize,
}

impl WorkerState {
    fn slot(&self) -> &Slot {
        &self.shared.slots[self.index]
    }
}

impl Actor for Worker {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = WorkerState;

    async fn pre_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        args: WorkerState,
    ) -> Result<WorkerState, ActorProcessingErr> {
        args.slot().register(myself);
        Ok(args)
    }

    async fn post_start(
        &self,
        myself: ActorRef<WorkerMsg>,
        _state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        myself.send_message(WorkerMsg::Serve)?;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<WorkerMsg>,
        message: WorkerMsg,
        state: &mut WorkerState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            WorkerMsg::Serve => serve(state, myself.try_get_supervisor()).await,
        }
    }
}

/// Run the slot's jobs in queue order until the queue is closed and empty.
///
/// A plain job whose handler panicked makes the actor fail (its outcome is already
/// delivered); the supervisor restarts it and the successor takes over the queue,
/// which outlives the actor, with every job still in it. A kill (close past its
/// deadline) drops the running job, so its outcome never arrives.
async fn serve(
    state: &WorkerState,
    supervisor: Option<ActorCell>,
) -> Result<(), ActorProcessingErr> {
    let slot = state.slot();
    let _serving = slot.serve().await;
    let shared = &state.shared;
    let mut waited = false;
    loop {
        // Only from warm actors in service (the jobs held for one out of service
        // wait for its fresh actor), and only to actors serving already, or made
        // warm for it.
        if slot.queue().queued() == 0 {
            let in_service = |i: usize| !shared.slots[i].is_unavailable();
            let among = shared.steal_among(state.index);
            let victim = victim(among, state.index, in_service);
            shared
                .router
                .steal(state.index, victim, |i| shared.slots[i].queue());
        } else {
            shared.share(state.index, waited, supervisor.as_ref());
        }
        let Some(job) = slot.queue().pop().await else {
            break;
        };
        let class = job.class();
        let ran = shared
            .router
            .run(
                job,
                state.index,
                slot.queue(),
                || shared.pick_for_hand_back(state.index, supervisor.as_ref()),
                |i| shared.slots[i].queue(),
            )
            .await;
        let kind = ran.kind;
        waited = ran.waited;
        slot.ran(waited);
        shared.job_finished(slot, kind);
        if class == JobClass::Plain && kind == OutcomeKind::Panicked {
            return Err(format!("actor {}: plain handler panicked", slot.index).into());
        }
    }
    Ok(())
}
