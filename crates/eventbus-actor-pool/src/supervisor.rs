//! The supervisor actor: starts each slot's first worker when the slot's first job
//! arrives, links the workers, restarts a failed one within the restart limit, past
//! the limit takes its slot out of service for a cool-down and then starts a fresh
//! actor on it, and stops them all on close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use crate::messages::{SupervisorMsg, WorkerMsg};
use crate::shared::Shared;
use crate::worker::{Worker, WorkerState};

/// The supervisor actor.
#[derive(Debug)]
pub(crate) struct Supervisor;

struct Running {
    actor: ActorRef<WorkerMsg>,
    join: JoinHandle<()>,
}

/// A pending message to the supervisor (the end of a cool-down).
type Timer = JoinHandle<Result<(), ractor::MessagingErr<SupervisorMsg>>>;

/// The supervisor's state.
pub(crate) struct SupervisorState {
    shared: Arc<Shared>,
    workers: Vec<Option<Running>>,
    by_id: HashMap<ActorId, usize>,
    /// The pending end of each slot's cool-down; aborted on close.
    timers: Vec<Option<Timer>>,
    shutting_down: bool,
}

async fn spawn_worker(
    shared: &Arc<Shared>,
    index: usize,
    supervisor: ActorCell,
) -> Result<Running, SpawnErr> {
    let args = WorkerState {
        shared: shared.clone(),
        index,
    };
    let (actor, join) = Actor::spawn_linked(None, Worker, args, supervisor).await?;
    Ok(Running { actor, join })
}

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        // No worker yet: each slot's first actor starts with the first job routed
        // to it (`SupervisorMsg::Start`).
        let size = shared.slots.len();
        Ok(SupervisorState {
            shared,
            workers: (0..size).map(|_| None).collect(),
            by_id: HashMap::new(),
            timers: (0..size).map(|_| None).collect(),
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Shutdown { deadline, reply } => {
                state.shutdown(deadline).await;
                let _ = reply.send(());
                myself.stop(Some("actor pool closed".to_owned()));
            }
            SupervisorMsg::Revive { index, epoch } => state.revive(&myself, index, epoch).await,
            SupervisorMsg::Start { index } => state.start(&myself, index).await,
            SupervisorMsg::ReviveAll => {
                for index in 0..state.workers.len() {
                    if state.shared.slots[index].is_unavailable() {
                        state.revive(&myself, index, None).await;
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                state
                    .worker_exited(&myself, cell.get_id(), &error.to_string())
                    .await;
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let reason = format!(
                    "stopped unexpectedly ({})",
                    reason.as_deref().unwrap_or("no reason")
                );
                state.worker_exited(&myself, cell.get_id(), &reason).await;
            }
            _ => {}
        }
        Ok(())
    }
}

impl SupervisorState {
    /// A worker died outside shutdown: restart it if the limit allows, otherwise
    /// take its slot out of service (its queue stays as it is).
    async fn worker_exited(&mut self, myself: &ActorRef<SupervisorMsg>, id: ActorId, why: &str) {
        if self.shutting_down {
            return;
        }
        let Some(index) = self.by_id.remove(&id) else {
            return;
        };
        if let Some(old) = self.workers[index].take() {
            // The old actor's task is finishing; wait so none is left behind.
            let _ = old.join.await;
        }
        let shared = self.shared.clone();
        let config = &shared.config;
        let slot = &shared.slots[index];
        if !slot.try_restart(Instant::now(), config.max_restarts, config.restart_window) {
            let cool_down = self.cool_down(myself, index, true);
            tracing::error!(
                actor = index,
                max_restarts = config.max_restarts,
                restart_window = ?config.restart_window,
                reason = why,
                queued = slot.queued(),
                ?cool_down,
                "actor failed past its restart limit; out of service until a fresh actor takes over after the cool-down (its queued jobs wait for it, in order)"
            );
            return;
        }
        match spawn_worker(&shared, index, myself.get_cell()).await {
            Ok(running) => {
                shared.restarted();
                tracing::warn!(actor = index, reason = why, "actor failed; restarted");
                self.serve_with(index, running);
            }
            Err(e) => {
                let cool_down = self.cool_down(myself, index, false);
                tracing::error!(actor = index, reason = why, error = %e, ?cool_down,
                    "actor failed and could not be restarted; out of service until the cool-down ends");
            }
        }
    }

    /// Take slot `index` out of service and schedule its fresh actor at the end of
    /// the cool-down, or at once while held jobs are released when `may_skip` (an
    /// actor past its limit: each of its lives runs a job; not a failed spawn, which
    /// would be retried in a busy loop). Returns the cool-down.
    fn cool_down(
        &mut self,
        myself: &ActorRef<SupervisorMsg>,
        index: usize,
        may_skip: bool,
    ) -> Duration {
        let shared = &self.shared;
        let slot = &shared.slots[index];
        let (mut wait, epoch) = slot.begin_cool_down(
            Instant::now(),
            shared.config.restart_window,
            &shared.cool_down,
        );
        shared.take_out_of_service(slot);
        if may_skip && shared.is_releasing() {
            wait = Duration::ZERO;
        }
        if let Some(old) = self.timers[index].take() {
            old.abort();
        }
        let revive = SupervisorMsg::Revive {
            index,
            epoch: Some(epoch),
        };
        if wait.is_zero() {
            // An error means the supervisor is stopping; nothing to revive then.
            let _ = myself.send_message(revive);
        } else {
            self.timers[index] = Some(myself.send_after(wait, move || revive));
        }
        wait
    }

    /// Start a fresh actor on slot `index` if it is still out of service (and, for a
    /// timer, still in the cool-down that set it). It gets the whole restart limit.
    async fn revive(&mut self, myself: &ActorRef<SupervisorMsg>, index: usize, epoch: Option<u64>) {
        let shared = self.shared.clone();
        let slot = &shared.slots[index];
        if self.shutting_down || self.workers[index].is_some() || !slot.is_unavailable() {
            return;
        }
        if epoch.is_some_and(|e| e != slot.cool_down_epoch()) {
            return;
        }
        if let Some(timer) = self.timers[index].take() {
            timer.abort();
        }
        slot.clear_restarts();
        match spawn_worker(&shared, index, myself.get_cell()).await {
            Ok(running) => {
                slot.end_cool_down(Instant::now());
                shared.back_in_service(slot);
                tracing::warn!(
                    actor = index,
                    queued = slot.queued(),
                    "fresh actor took over after the cool-down"
                );
                self.serve_with(index, running);
            }
            Err(e) => {
                let cool_down = self.cool_down(myself, index, false);
                tracing::error!(actor = index, error = %e, ?cool_down,
                    "fresh actor could not be started; trying again after the cool-down");
            }
        }
    }

    /// Start the first actor of slot `index`. A spawn that fails takes the slot out
    /// of service, as a failed restart does: its jobs wait, in order, for the fresh
    /// actor at the end of the cool-down.
    async fn start(&mut self, myself: &ActorRef<SupervisorMsg>, index: usize) {
        let shared = self.shared.clone();
        let slot = &shared.slots[index];
        if self.shutting_down || self.workers[index].is_some() || slot.is_unavailable() {
            return;
        }
        match spawn_worker(&shared, index, myself.get_cell()).await {
            Ok(running) => {
                self.serve_with(index, running);
            }
            Err(e) => {
                let cool_down = self.cool_down(myself, index, false);
                tracing::error!(actor = index, error = %e, ?cool_down,
                    "actor could not be started; out of service until the cool-down ends (its queued jobs wait for it, in order)");
            }
        }
    }

    /// `running` now serves slot `index`.
    fn serve_with(&mut self, index: usize, running: Running) {
        self.by_id.insert(running.actor.get_id(), index);
        self.workers[index] = Some(running);
    }

    /// Stop every worker, gracefully until `deadline`, then by force, and wait for
    /// their tasks to end.
    async fn shutdown(&mut self, deadline: Instant) {
        self.shutting_down = true;
        for timer in self.timers.iter_mut().filter_map(Option::take) {
            timer.abort();
        }
        let workers: Vec<Running> = self.workers.iter_mut().filter_map(Option::take).collect();
        self.by_id.clear();
        for w in &workers {
            w.actor.stop(None);
        }
        for w in workers {
            let left = deadline.saturating_duration_since(Instant::now());
            if w.actor.wait(Some(left)).await.is_err() {
                tracing::debug!(actor = ?w.actor.get_id(), "actor still busy at the close deadline; killing it");
                w.actor.kill();
            }
            let _ = w.join.await;
        }
    }
}
