//! The Prometheus exporter: the `metrics` recorder the bus's metrics go to, served
//! over HTTP (`metrics.prometheus_listen`) or rendered by the application.
//!
//! Installing it is always an explicit step, never a side effect of building a bus:
//! [`install_prometheus`] (its own listener), [`install_from_config`] (the listener
//! `metrics.prometheus_listen` names), [`install_prometheus_recorder`] (no listener:
//! the application renders), or the operations server (feature `ops-server`), which
//! installs the recorder and serves it at its own `/metrics`.
//!
//! One recorder serves the whole process. Installing it again with the same address
//! returns the same handle; a second, different address is a configuration error.

use eventbus_core::{Error, MetricsConfig};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::Mutex;

pub use metrics_exporter_prometheus::PrometheusHandle as Handle;

/// Histogram buckets in seconds, for handler and publish durations (1 ms handlers
/// and 10 s stuck calls both land in a bucket of their own).
pub const BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// What is installed: the listen address (none when the application serves
/// `/metrics` itself) and the handle.
static INSTALLED: Mutex<Option<(Option<SocketAddr>, PrometheusHandle)>> = Mutex::new(None);

fn builder() -> Result<PrometheusBuilder, Error> {
    PrometheusBuilder::new()
        .set_buckets(BUCKETS)
        .map_err(|e| Error::config(format!("prometheus exporter buckets: {e}")))
}

fn install(listen: Option<SocketAddr>) -> Result<PrometheusHandle, Error> {
    let mut installed = INSTALLED.lock().expect("exporter slot poisoned");
    if let Some((addr, handle)) = &*installed {
        return if *addr == listen || listen.is_none() {
            Ok(handle.clone())
        } else {
            Err(Error::config(format!(
                "metrics.prometheus_listen = {}: this process already exports metrics{}",
                listen.map_or_else(String::new, |a| a.to_string()),
                addr.map_or_else(
                    || " through a recorder without a listener".to_owned(),
                    |a| format!(" on {a}")
                ),
            )))
        };
    }
    let already = || {
        Error::config(
            "cannot install the Prometheus exporter: another metrics recorder is installed \
             in this process",
        )
    };
    let handle = match listen {
        None => builder()?.install_recorder().map_err(|_| already())?,
        Some(addr) => {
            let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
                Error::config(format!(
                    "metrics.prometheus_listen = {addr}: the exporter needs a tokio runtime"
                ))
            })?;
            let _entered = runtime.enter();
            let (recorder, exporter) =
                builder()?.with_http_listener(addr).build().map_err(|e| {
                    Error::config(format!(
                        "metrics.prometheus_listen = {addr}: cannot serve metrics: {e}"
                    ))
                })?;
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|_| already())?;
            runtime.spawn(async move {
                if let Err(e) = exporter.await {
                    tracing::error!(error = ?e, "the Prometheus exporter stopped");
                }
            });
            tracing::info!(%addr, "serving Prometheus metrics on http://{addr}/metrics");
            handle
        }
    };
    *installed = Some((listen, handle.clone()));
    Ok(handle)
}

/// Serve every metric of this process at `http://<addr>/metrics`. Bind to a
/// loopback address unless the port is meant to be reachable from outside.
pub fn install_prometheus(addr: SocketAddr) -> Result<PrometheusHandle, Error> {
    install(Some(addr))
}

/// Install the Prometheus recorder without a listener: the application serves
/// [`PrometheusHandle::render`] itself, or the operations server does. When a
/// recorder of this module is installed already (with or without a listener), its
/// handle is returned.
pub fn install_prometheus_recorder() -> Result<PrometheusHandle, Error> {
    install(None)
}

/// Install what `config` asks for: the exporter listening on
/// `metrics.prometheus_listen` when it is set (returning its handle), nothing
/// otherwise.
pub fn install_from_config(config: &MetricsConfig) -> Result<Option<PrometheusHandle>, Error> {
    config.prometheus_listen.map(install_prometheus).transpose()
}

/// The handle of the recorder this module installed, if any.
pub fn installed() -> Option<PrometheusHandle> {
    INSTALLED
        .lock()
        .expect("exporter slot poisoned")
        .as_ref()
        .map(|(_, handle)| handle.clone())
}

/// `build()` installs nothing; a listen address in the configuration with no
/// exporter on it is named in a warning, so it is not ignored silently.
pub(crate) fn warn_if_not_installed(config: &MetricsConfig) {
    let Some(addr) = config.prometheus_listen else {
        return;
    };
    let on = INSTALLED
        .lock()
        .expect("exporter slot poisoned")
        .as_ref()
        .map(|(listen, _)| *listen);
    if on != Some(Some(addr)) {
        tracing::warn!(
            %addr,
            "metrics.prometheus_listen = {addr} is set but no exporter listens there: \
             building a bus installs none; call eventbus::prometheus::install_from_config \
             (or eventbus::install_prometheus) first, or serve /metrics through the \
             operations server"
        );
    }
}
