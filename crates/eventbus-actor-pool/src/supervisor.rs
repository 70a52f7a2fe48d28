//! The supervisor actor: links the workers, restarts a failed one within the
//! restart limit, takes it out of service past the limit, and stops them all on close.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ractor::concurrency::JoinHandle;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};
use tokio::sync::oneshot;

use crate::pool::Shared;
use crate::worker::{Worker, WorkerMsg, WorkerState};

/// What the supervisor receives (besides supervision events).
#[derive(Debug)]
pub(crate) enum SupervisorMsg {
    /// Stop every worker: gracefully until `deadline`, then by force. Replies once
    /// all of them have exited; the supervisor then stops.
    Shutdown {
        deadline: Instant,
        reply: oneshot::Sender<()>,
    },
}

/// The supervisor actor.
#[derive(Debug)]
pub(crate) struct Supervisor;

struct Running {
    actor: ActorRef<WorkerMsg>,
    join: JoinHandle<()>,
}

/// The supervisor's state.
pub(crate) struct SupervisorState {
    shared: Arc<Shared>,
    workers: Vec<Option<Running>>,
    by_id: HashMap<ActorId, usize>,
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
        myself: ActorRef<SupervisorMsg>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let size = shared.slots.len();
        let mut workers = Vec::with_capacity(size);
        let mut by_id = HashMap::with_capacity(size);
        for index in 0..size {
            match spawn_worker(&shared, index, myself.get_cell()).await {
                Ok(running) => {
                    by_id.insert(running.actor.get_id(), index);
                    workers.push(Some(running));
                }
                Err(e) => {
                    for running in workers.into_iter().flatten() {
                        running.actor.kill();
                        let _ = running.join.await;
                    }
                    return Err(format!("actor {index} failed to start: {e}").into());
                }
            }
        }
        Ok(SupervisorState {
            shared,
            workers,
            by_id,
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
            shared.take_out_of_service(slot);
            tracing::error!(
                actor = index,
                max_restarts = config.max_restarts,
                restart_window = ?config.restart_window,
                reason = why,
                queued = slot.queued(),
                "actor failed past its restart limit; it is out of service and its queued jobs stay unacknowledged"
            );
            return;
        }
        match spawn_worker(&shared, index, myself.get_cell()).await {
            Ok(running) => {
                shared.restarted();
                tracing::warn!(actor = index, reason = why, "actor failed; restarted");
                self.by_id.insert(running.actor.get_id(), index);
                self.workers[index] = Some(running);
            }
            Err(e) => {
                shared.take_out_of_service(slot);
                tracing::error!(actor = index, reason = why, error = %e,
                    "actor failed and could not be restarted; it is out of service");
            }
        }
    }

    /// Stop every worker, gracefully until `deadline`, then by force, and wait for
    /// their tasks to end.
    async fn shutdown(&mut self, deadline: Instant) {
        self.shutting_down = true;
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
