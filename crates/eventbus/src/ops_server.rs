//! The operations server (feature `ops-server`): one HTTP listener, on axum, for
//! what Prometheus, the kubelet and an operator need of a running process.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | every metric of the process, Prometheus text format |
//! | `GET /livez`, `GET /readyz` | the health of every registered bus, JSON; 503 only when one is `unhealthy` (`degraded`, e.g. recovery mode, is still live and ready) |
//! | `GET /rollout`, `GET /rollout/{name}` | a pool switch: actor share, pool in force, routes pinned on each side, the floor |
//! | `PUT /rollout`, `PUT /rollout/{name}` | change the actor share: a JSON body with exactly one of `actor_percent` (0..=100) or `use_actor_pool` (bool); needs `Authorization: Bearer <token>` |
//! | `GET /stuck` | what holds each partition's commit point (NATS: each durable's oldest unacknowledged message) on every registered bus, the longest held first, at most `limit` entries (default 20, at most 1000); `?topic=` keeps one topic. See `docs/operations.md`, "What holds each commit point" |
//!
//! `PUT` answers: 403 when no admin token is configured (the endpoint is disabled),
//! 401 with a missing or wrong token (nothing changes), 400 naming the field for a
//! malformed body, 409 naming the variable when `KAFKA_USE_ACTOR_POOL=false` held
//! the switch at 0 at start-up and the body asks for more, 404 for an unknown
//! switch; 200 with the old and new share otherwise. Every change is logged
//! (`tracing`, `info`) with the switch's name and the old and new values; every
//! refused attempt at `warn`.
//!
//! A change lasts until the process restarts: then the configuration file and the
//! environment rule again (the fleet-wide rollout is the deploy's environment; the
//! endpoint steers one process live).
//!
//! Start the server before building the buses: it installs the process's
//! Prometheus recorder (unless one is given with [`OpsServer::metrics`]), and a
//! metric created before any recorder is installed records nothing. Then register
//! each bus and its switch under a name.
//!
//! ```no_run
//! # async fn run() -> Result<(), eventbus::Error> {
//! use eventbus::{EventBusBuilder, MemoryBroker, OpsServer, OpsServerConfig};
//! let server = OpsServer::new(OpsServerConfig::default()).start().await?;
//! let (bus, switch) = EventBusBuilder::new()
//!     .memory(MemoryBroker::default())
//!     .build_with_switch()
//!     .await?;
//! server.add_bus("default", bus.clone())?;
//! server.add_switch("default", switch)?;
//! # Ok(()) }
//! ```

use crate::config::OpsServerConfig;
use crate::PoolSwitch;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use eventbus_core::{Error, ErrorKind, HealthStatus, Pool, SharedBus};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The environment variable that holds the bearer token of `PUT /rollout`; it
/// overrides `ops_server.admin_token`.
pub const ADMIN_TOKEN_VARIABLE: &str = "EVENTBUS_ADMIN_TOKEN";

/// The name `/rollout` (without a name) serves, and [`OpsServer::bus`] with it.
pub const DEFAULT_NAME: &str = "default";

type EnvLookup = Arc<dyn Fn(&str) -> Option<OsString> + Send + Sync>;

/// The operations server, before it starts: register buses and pool switches, then
/// [`start`](Self::start).
pub struct OpsServer {
    config: OpsServerConfig,
    buses: Vec<(String, SharedBus)>,
    switches: Vec<(String, Arc<PoolSwitch>)>,
    metrics: Option<PrometheusHandle>,
    env: Option<EnvLookup>,
}

impl fmt::Debug for OpsServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsServer")
            .field("config", &self.config)
            .field(
                "buses",
                &self.buses.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field(
                "switches",
                &self.switches.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl OpsServer {
    /// A server with `config`'s listen address and token, nothing registered yet.
    pub fn new(config: OpsServerConfig) -> Self {
        Self {
            config,
            buses: Vec::new(),
            switches: Vec::new(),
            metrics: None,
            env: None,
        }
    }

    /// Report `bus`'s health under `name` in `/livez` and `/readyz`.
    #[must_use]
    pub fn bus(mut self, name: impl Into<String>, bus: SharedBus) -> Self {
        self.buses.push((name.into(), bus));
        self
    }

    /// Serve `switch` at `/rollout/{name}`; the one named [`DEFAULT_NAME`], or the
    /// only one registered, is also `/rollout`.
    #[must_use]
    pub fn switch(mut self, name: impl Into<String>, switch: Arc<PoolSwitch>) -> Self {
        self.switches.push((name.into(), switch));
        self
    }

    /// Serve this recorder at `/metrics` instead of installing (or reusing) the
    /// process's Prometheus recorder ([`crate::install_prometheus_recorder`]).
    #[must_use]
    pub fn metrics(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = Some(handle);
        self
    }

    /// Read `EVENTBUS_ADMIN_TOKEN` through `lookup` instead of the process
    /// environment (for tests, or a service that keeps its secrets elsewhere).
    #[must_use]
    pub fn env_from(
        mut self,
        lookup: impl Fn(&str) -> Option<OsString> + Send + Sync + 'static,
    ) -> Self {
        self.env = Some(Arc::new(lookup));
        self
    }

    /// The admin token in force: the variable, else the configuration.
    fn token(&self) -> Result<Option<String>, Error> {
        let raw = match &self.env {
            Some(lookup) => lookup(ADMIN_TOKEN_VARIABLE),
            None => std::env::var_os(OsStr::new(ADMIN_TOKEN_VARIABLE)),
        };
        match raw {
            None => Ok(self.config.admin_token.clone()),
            Some(raw) => match raw.to_str() {
                None => Err(Error::config(format!(
                    "environment variable {ADMIN_TOKEN_VARIABLE} is not valid UTF-8"
                ))),
                Some(t) if t.trim().is_empty() => Err(Error::config(format!(
                    "environment variable {ADMIN_TOKEN_VARIABLE} is set but empty: set a \
                     token, or leave it unset to disable PUT /rollout"
                ))),
                Some(t) => Ok(Some(t.trim().to_owned())),
            },
        }
        .and_then(|t| match t {
            Some(t) if t.trim().is_empty() => Err(Error::config(
                "ops_server.admin_token is empty: set a token, or leave it out to disable \
                 PUT /rollout",
            )),
            t => Ok(t),
        })
    }

    /// Bind the listen address and serve until the returned handle is shut down or
    /// dropped.
    pub async fn start(self) -> Result<OpsServerHandle, Error> {
        let token = self.token()?;
        let mut registry = Registry::default();
        for (name, bus) in self.buses {
            registry.add_bus(name, bus)?;
        }
        for (name, switch) in self.switches {
            registry.add_switch(name, switch)?;
        }
        let metrics = match self.metrics {
            Some(handle) => handle,
            None => crate::prometheus::install_prometheus_recorder()?,
        };
        let listen = self.config.listen;
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            Error::config(format!(
                "ops_server.listen = {listen}: cannot listen there: {e}"
            ))
            .with_source(e)
        })?;
        let addr = listener.local_addr().map_err(|e| {
            Error::config(format!("ops_server.listen = {listen}: no local address")).with_source(e)
        })?;
        let (buses, switches) = (registry.buses.len(), registry.switches.len());
        let state = Arc::new(Shared {
            registry: RwLock::new(registry),
            metrics,
            token,
        });
        tracing::info!(
            %addr,
            buses,
            switches,
            rollout_changes = if state.token.is_some() { "enabled" } else { "disabled (no admin token)" },
            "operations server listening"
        );
        let app = router(state.clone());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                let _ = stopped.await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "operations server stopped");
            }
        });
        Ok(OpsServerHandle {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }
}

fn check_name(name: &str) -> Result<(), Error> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::config(format!(
            "operations server: name {name:?} is not usable in a URL path: use letters, \
             digits, '-', '_' and '.'"
        )));
    }
    Ok(())
}

/// The running operations server. Dropping it stops the server too.
pub struct OpsServerHandle {
    addr: SocketAddr,
    state: AppState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for OpsServerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpsServerHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl OpsServerHandle {
    /// The address it listens on (the port chosen when the configuration said 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Report `bus`'s health under `name` from now on. A name taken already is a
    /// configuration error naming it.
    pub fn add_bus(&self, name: impl Into<String>, bus: SharedBus) -> Result<(), Error> {
        self.state.write().add_bus(name.into(), bus)
    }

    /// Serve `switch` at `/rollout/{name}` from now on (see [`OpsServer::switch`]).
    /// A name taken already is a configuration error naming it.
    pub fn add_switch(
        &self,
        name: impl Into<String>,
        switch: Arc<PoolSwitch>,
    ) -> Result<(), Error> {
        self.state.write().add_switch(name.into(), switch)
    }

    /// Stop accepting, let requests in progress finish, and wait for the server's
    /// task to end.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                tracing::error!(error = %e, "operations server task failed");
            }
        }
    }
}

impl Drop for OpsServerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[derive(Default)]
struct Registry {
    buses: Vec<(String, SharedBus)>,
    switches: BTreeMap<String, Arc<PoolSwitch>>,
}

impl Registry {
    fn add_bus(&mut self, name: String, bus: SharedBus) -> Result<(), Error> {
        check_name(&name)?;
        if self.buses.iter().any(|(n, _)| *n == name) {
            return Err(Error::config(format!(
                "operations server: a bus is registered as {name:?} already"
            )));
        }
        self.buses.push((name, bus));
        Ok(())
    }

    fn add_switch(&mut self, name: String, switch: Arc<PoolSwitch>) -> Result<(), Error> {
        check_name(&name)?;
        if self.switches.contains_key(&name) {
            return Err(Error::config(format!(
                "operations server: a pool switch is registered as {name:?} already"
            )));
        }
        self.switches.insert(name, switch);
        Ok(())
    }
}

struct Shared {
    registry: RwLock<Registry>,
    metrics: PrometheusHandle,
    token: Option<String>,
}

impl Shared {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Registry> {
        self.registry.read().expect("operations registry poisoned")
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Registry> {
        self.registry.write().expect("operations registry poisoned")
    }
}

type AppState = Arc<Shared>;

fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(health))
        .route("/readyz", get(health))
        .route(
            "/rollout",
            get(get_default_rollout).put(put_default_rollout),
        )
        .route("/rollout/{name}", get(get_rollout).put(put_rollout))
        .route("/stuck", get(stuck))
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn health(State(state): State<AppState>) -> Response {
    let registered = state.read().buses.clone();
    let mut worst = HealthStatus::Healthy;
    let mut buses = Vec::with_capacity(registered.len());
    for (name, bus) in &registered {
        let report = bus.health().await;
        worst = worst.max(report.status);
        let components: Vec<Value> = report
            .components
            .iter()
            .map(|c| json!({ "name": c.name, "status": c.status.to_string(), "reason": c.reason }))
            .collect();
        buses.push(json!({
            "name": name,
            "backend": bus.backend(),
            "status": report.status.to_string(),
            "recovering": bus.recovery().is_recovering(),
            "components": components,
        }));
    }
    // Only Unhealthy fails the probe: a degraded bus (recovery mode, a stuck key,
    // restarts) is working, and restarting it would only lose its progress.
    let code = if worst == HealthStatus::Unhealthy {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(json!({ "status": worst.to_string(), "buses": buses })),
    )
        .into_response()
}

/// Entries `GET /stuck` lists unless `limit` says otherwise.
const STUCK_DEFAULT_LIMIT: usize = 20;
/// The most entries `GET /stuck` lists.
const STUCK_MAX_LIMIT: usize = 1000;

/// What `GET /stuck` is asked for.
#[derive(Debug, PartialEq, Eq)]
struct StuckQuery {
    topic: Option<String>,
    limit: usize,
}

/// Parse `GET /stuck`'s query; the error names the parameter.
fn parse_stuck_query(query: Option<&str>) -> Result<StuckQuery, String> {
    let mut q = StuckQuery {
        topic: None,
        limit: STUCK_DEFAULT_LIMIT,
    };
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "topic" if !value.is_empty() => q.topic = Some(value.to_owned()),
            "topic" => return Err("parameter `topic` must not be empty".to_owned()),
            "limit" => {
                q.limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=STUCK_MAX_LIMIT).contains(n))
                    .ok_or_else(|| {
                        format!(
                            "parameter `limit` must be a whole number from 1 to {STUCK_MAX_LIMIT}, not {value:?}"
                        )
                    })?;
            }
            other => {
                return Err(format!(
                    "unknown parameter `{other}`; known: `topic`, `limit`"
                ))
            }
        }
    }
    Ok(q)
}

async fn stuck(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let q = match parse_stuck_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e, json!({})),
    };
    let registered = state.read().buses.clone();
    let mut holds: Vec<(String, &'static str, eventbus_core::CommitHold)> = Vec::new();
    for (name, bus) in &registered {
        holds.extend(
            bus.commit_holds()
                .into_iter()
                .filter(|h| q.topic.as_deref().is_none_or(|t| h.topic == t))
                .map(|h| (name.clone(), bus.backend(), h)),
        );
    }
    holds.sort_by_key(|h| std::cmp::Reverse(h.2.held_for));
    let total = holds.len();
    let stalled = holds.iter().filter(|(_, _, h)| h.stalled).count();
    let listed: Vec<Value> = holds
        .into_iter()
        .take(q.limit)
        .map(|(name, backend, h)| {
            let mut v = serde_json::to_value(&h).unwrap_or(Value::Null);
            if let Value::Object(o) = &mut v {
                o.insert("bus".to_owned(), json!(name));
                o.insert("backend".to_owned(), json!(backend));
            }
            v
        })
        .collect();
    Json(json!({
        "total": total,
        "stalled": stalled,
        "truncated": total > listed.len(),
        "holds": listed,
    }))
    .into_response()
}

fn error(code: StatusCode, message: impl Into<String>, extra: Value) -> Response {
    let mut body = json!({ "error": message.into() });
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    (code, Json(body)).into_response()
}

/// No switch of the name asked for: the names there are.
struct NotFound {
    name: String,
    names: Vec<String>,
}

impl IntoResponse for NotFound {
    fn into_response(self) -> Response {
        let NotFound { name, names } = self;
        error(
            StatusCode::NOT_FOUND,
            format!("no pool switch named {name:?} is registered; registered: {names:?}"),
            json!({ "switches": names }),
        )
    }
}

type Found = Result<(String, Arc<PoolSwitch>), NotFound>;

/// The switch `/rollout` serves: the one named `default`, or the only one.
fn default_switch(state: &Shared) -> Found {
    let registry = state.read();
    if let Some(s) = registry.switches.get(DEFAULT_NAME) {
        return Ok((DEFAULT_NAME.to_owned(), s.clone()));
    }
    let mut all = registry.switches.iter();
    match (all.next(), all.next()) {
        (Some((name, s)), None) => Ok((name.clone(), s.clone())),
        _ => Err(unknown(&registry, DEFAULT_NAME)),
    }
}

fn named_switch(state: &Shared, name: &str) -> Found {
    let registry = state.read();
    registry
        .switches
        .get(name)
        .map(|s| (name.to_owned(), s.clone()))
        .ok_or_else(|| unknown(&registry, name))
}

fn unknown(registry: &Registry, name: &str) -> NotFound {
    NotFound {
        name: name.to_owned(),
        names: registry.switches.keys().cloned().collect(),
    }
}

fn rollout_state(name: &str, switch: &PoolSwitch) -> Value {
    let (keyed, actor) = switch.pinned();
    json!({
        "name": name,
        "actor_percent": switch.actor_percent(),
        "pool_in_force": switch.kind(),
        "pinned_routes": { "keyed": keyed, "actor": actor },
        "counts_jobs": switch.counts_jobs(),
        "floor": switch.floor(),
    })
}

async fn get_default_rollout(State(state): State<AppState>) -> Response {
    match default_switch(&state) {
        Ok((name, switch)) => Json(rollout_state(&name, &switch)).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn get_rollout(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match named_switch(&state, &name) {
        Ok((name, switch)) => Json(rollout_state(&name, &switch)).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn put_default_rollout(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match default_switch(&state) {
        Ok((name, switch)) => change(&state, &name, &switch, &headers, &body),
        Err(r) => r.into_response(),
    }
}

async fn put_rollout(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match named_switch(&state, &name) {
        Ok((name, switch)) => change(&state, &name, &switch, &headers, &body),
        Err(r) => r.into_response(),
    }
}

/// Whether the two tokens are equal, in time that does not depend on where they
/// differ (`subtle`).
fn same(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// What a `PUT /rollout` body asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Percent(u8),
    UseActorPool(bool),
}

impl Request {
    fn percent(self) -> u8 {
        match self {
            Request::Percent(p) => p,
            Request::UseActorPool(true) => 100,
            Request::UseActorPool(false) => 0,
        }
    }
}

/// Parse a `PUT /rollout` body; the error names the field.
fn parse_body(body: &[u8]) -> Result<Request, (String, String)> {
    const FIELDS: &str =
        "exactly one of `actor_percent` (an integer 0..=100) or `use_actor_pool` (true or false)";
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        (
            format!("body: not valid JSON ({e}): expected {FIELDS}"),
            "body".into(),
        )
    })?;
    let Value::Object(fields) = value else {
        return Err((
            format!("body: expected a JSON object with {FIELDS}"),
            "body".into(),
        ));
    };
    if let Some(unknown) = fields
        .keys()
        .find(|k| !matches!(k.as_str(), "actor_percent" | "use_actor_pool"))
    {
        return Err((
            format!("unknown field `{unknown}`: expected {FIELDS}"),
            unknown.clone(),
        ));
    }
    match (fields.get("actor_percent"), fields.get("use_actor_pool")) {
        (Some(_), Some(_)) => Err((
            format!("both `actor_percent` and `use_actor_pool` given: expected {FIELDS}"),
            "actor_percent,use_actor_pool".into(),
        )),
        (None, None) => Err((format!("no field given: expected {FIELDS}"), "body".into())),
        (Some(p), None) => match p.as_u64() {
            Some(p) if p <= 100 => Ok(Request::Percent(p as u8)),
            _ => Err((
                format!("`actor_percent` must be an integer within 0..=100, got {p}"),
                "actor_percent".into(),
            )),
        },
        (None, Some(u)) => match u.as_bool() {
            Some(b) => Ok(Request::UseActorPool(b)),
            None => Err((
                format!("`use_actor_pool` must be true or false, got {u}"),
                "use_actor_pool".into(),
            )),
        },
    }
}

fn change(
    state: &Shared,
    name: &str,
    switch: &PoolSwitch,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let Some(token) = &state.token else {
        tracing::warn!(
            switch = name,
            "PUT /rollout refused: no admin token is configured"
        );
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "changing the rollout is disabled: no admin token is configured \
                 (set {ADMIN_TOKEN_VARIABLE} or ops_server.admin_token)"
            ),
            json!({}),
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if !given.is_some_and(|g| same(g.as_bytes(), token.as_bytes())) {
        tracing::warn!(
            switch = name,
            token_given = given.is_some(),
            "PUT /rollout refused: missing or wrong bearer token"
        );
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "a valid bearer token is needed: Authorization: Bearer <token>",
            json!({}),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let request = match parse_body(body) {
        Ok(r) => r,
        Err((message, field)) => {
            tracing::warn!(switch = name, field = %field, "PUT /rollout refused: {message}");
            return error(StatusCode::BAD_REQUEST, message, json!({ "field": field }));
        }
    };
    let new = request.percent();
    match switch.replace_actor_percent(new) {
        Ok(old) => {
            tracing::info!(
                switch = name,
                old_actor_percent = old,
                new_actor_percent = new,
                "rollout changed through the operations server: actor share {old}% -> {new}%"
            );
            let mut body = rollout_state(name, switch);
            body["previous_actor_percent"] = json!(old);
            Json(body).into_response()
        }
        Err(e) if e.kind() == ErrorKind::Conflict => {
            tracing::warn!(
                switch = name,
                asked = new,
                "PUT /rollout refused: {}",
                e.message()
            );
            error(
                StatusCode::CONFLICT,
                e.message(),
                json!({
                    "variable": crate::env::ROLLBACK_VARIABLE,
                    "floor": switch.floor(),
                }),
            )
        }
        Err(e) => error(StatusCode::BAD_REQUEST, e.message(), json!({})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies() {
        assert_eq!(
            parse_body(br#"{"actor_percent": 10}"#),
            Ok(Request::Percent(10))
        );
        assert_eq!(
            parse_body(br#"{"use_actor_pool": false}"#),
            Ok(Request::UseActorPool(false))
        );
        for (body, field) in [
            (
                &br#"{"actor_percent": 10, "use_actor_pool": true}"#[..],
                "actor_percent,use_actor_pool",
            ),
            (br#"{"actor_percent": 101}"#, "actor_percent"),
            (br#"{"actor_percent": -1}"#, "actor_percent"),
            (br#"{"actor_percent": 2.5}"#, "actor_percent"),
            (br#"{"actor_percent": "10"}"#, "actor_percent"),
            (br#"{"use_actor_pool": "yes"}"#, "use_actor_pool"),
            (br#"{"actor_pct": 10}"#, "actor_pct"),
            (br#"{}"#, "body"),
            (br#"[10]"#, "body"),
            (b"actor_percent=10", "body"),
        ] {
            let (message, f) = parse_body(body).unwrap_err();
            assert_eq!(f, field, "{}: {message}", String::from_utf8_lossy(body));
        }
        let (message, _) = parse_body(br#"{"actor_pct": 10}"#).unwrap_err();
        assert!(message.contains("actor_pct"), "{message}");
    }

    #[test]
    fn stuck_queries() {
        assert_eq!(
            parse_stuck_query(None),
            Ok(StuckQuery {
                topic: None,
                limit: STUCK_DEFAULT_LIMIT
            })
        );
        assert_eq!(
            parse_stuck_query(Some("topic=orders&limit=5")),
            Ok(StuckQuery {
                topic: Some("orders".to_owned()),
                limit: 5
            })
        );
        for (query, names) in [
            ("limit=0", "`limit`"),
            ("limit=1001", "`limit`"),
            ("limit=many", "`limit`"),
            ("topic=", "`topic`"),
            ("partition=3", "`partition`"),
        ] {
            let e = parse_stuck_query(Some(query)).unwrap_err();
            assert!(e.contains(names), "{query}: {e}");
        }
    }

    #[test]
    fn token_comparison() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
        assert!(!same(b"ab", b"abc"));
        assert!(!same(b"", b"a"));
        assert!(same(b"", b""));
    }
}
