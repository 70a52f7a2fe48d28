//! The user's handler: one small async trait, like a tower `Service`.

use futures::future::BoxFuture;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::envelope::Envelope;
use crate::error::BoxError;
use crate::message::Message;
use crate::raw::fence::Scope;

/// Whether retrying a failed handler call can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// Retry with backoff, up to the policy's `max_attempts`.
    Transient,
    /// Never retry: dead-letter at once (envelope subscriptions).
    Permanent,
}

/// The error a handler returns.
///
/// Any error converts into a transient `HandlerError` with `?`; use
/// [`HandlerError::permanent`] for input that will never succeed.
pub struct HandlerError {
    failure: Failure,
    source: BoxError,
}

impl HandlerError {
    /// A failure worth retrying.
    pub fn transient(source: impl Into<BoxError>) -> Self {
        Self {
            failure: Failure::Transient,
            source: source.into(),
        }
    }

    /// A failure that no retry can fix.
    pub fn permanent(source: impl Into<BoxError>) -> Self {
        Self {
            failure: Failure::Permanent,
            source: source.into(),
        }
    }

    /// Transient or permanent.
    pub fn failure(&self) -> Failure {
        self.failure
    }

    /// Whether this failure is permanent.
    pub fn is_permanent(&self) -> bool {
        self.failure == Failure::Permanent
    }

    /// The underlying error.
    pub fn source(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self.source.as_ref()
    }
}

impl<E: Into<BoxError>> From<E> for HandlerError {
    fn from(e: E) -> Self {
        Self::transient(e)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("failure", &self.failure)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.failure {
            Failure::Transient => "transient",
            Failure::Permanent => "permanent",
        };
        write!(f, "{kind} handler error: {}", self.source)
    }
}

/// What a handler returns.
pub type HandlerResult = Result<(), HandlerError>;

/// The input of an envelope handler: the decoded envelope, the message it came in,
/// and which attempt this is.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Event {
    /// The decoded, validated envelope.
    pub envelope: Arc<Envelope>,
    /// The message as consumed.
    pub message: Message,
    /// Attempt number within this delivery, 1 for the first call.
    pub attempt: u32,
    /// The scope of the work this event belongs to (see [`Event::cancellation`]).
    scope: Scope,
}

impl Event {
    /// Build an event (used by the dispatcher and by tests of handlers).
    pub fn new(envelope: Arc<Envelope>, message: Message, attempt: u32) -> Self {
        Self::scoped(envelope, message, attempt, Scope::new())
    }

    /// Build an event of the work of `scope`.
    pub(crate) fn scoped(
        envelope: Arc<Envelope>,
        message: Message,
        attempt: u32,
        scope: Scope,
    ) -> Self {
        Self {
            envelope,
            message,
            attempt,
            scope,
        }
    }

    /// Cancelled when the work this event belongs to is handed over (partition
    /// revoked, lease lost, unsubscribe, close): a long handler should stop soon
    /// after, returning an error; the message is then delivered again.
    pub fn cancellation(&self) -> &CancellationToken {
        self.scope.cancellation()
    }
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// The cancellation token of the handler running in this task, for plain handlers
/// (envelope handlers also have [`Event::cancellation`]): cancelled when its work
/// is handed over. `None` outside a handler the bus runs.
pub fn cancellation() -> Option<CancellationToken> {
    SCOPE.try_with(|s| s.cancellation().clone()).ok()
}

/// Run `fut` as a handler call of the work of `scope` (see [`cancellation`]).
pub(crate) async fn in_scope<F: Future>(scope: Scope, fut: F) -> F::Output {
    SCOPE.scope(scope, fut).await
}

/// [`in_scope`], also telling whether the scope was fenced when `fut` ended: read
/// from the task-local, so the caller needs no second handle of the scope.
pub(crate) async fn in_scope_fenced<F: Future>(scope: Scope, fut: F) -> (F::Output, bool) {
    SCOPE
        .scope(scope, async move {
            let output = fut.await;
            (output, SCOPE.with(Scope::is_closed))
        })
        .await
}

/// An async message handler.
///
/// Closures `Fn(T) -> impl Future<Output = HandlerResult>` and `Arc<H>` are handlers.
/// Plain subscriptions take `Handler<Message>`, envelope subscriptions `Handler<Event>`.
pub trait Handler<T>: Send + Sync + 'static {
    /// The future of one call.
    type Future: Future<Output = HandlerResult> + Send + 'static;

    /// Handle one input.
    fn call(&self, input: T) -> Self::Future;
}

impl<F, Fut, T> Handler<T> for F
where
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, input: T) -> Fut {
        self(input)
    }
}

impl<H, T> Handler<T> for Arc<H>
where
    H: Handler<T> + ?Sized,
{
    type Future = H::Future;

    fn call(&self, input: T) -> H::Future {
        (**self).call(input)
    }
}

/// Object-safe twin of [`Handler`], for storing handlers of different types together.
pub trait DynHandler<T>: Send + Sync + 'static {
    /// Handle one input.
    fn call_boxed(&self, input: T) -> BoxFuture<'static, HandlerResult>;
}

impl<H, T> DynHandler<T> for H
where
    H: Handler<T>,
{
    fn call_boxed(&self, input: T) -> BoxFuture<'static, HandlerResult> {
        Box::pin(self.call(input))
    }
}

/// A shared, type-erased handler.
pub type BoxHandler<T> = Arc<dyn DynHandler<T>>;

/// Erase a handler's type.
pub fn boxed<T, H: Handler<T>>(handler: H) -> BoxHandler<T> {
    Arc::new(handler)
}

/// Make a handler from a closure, helping type inference of the closure's argument
/// and of the future's error type.
pub fn handler_fn<T, F, Fut>(f: F) -> impl Handler<T>
where
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    f
}
