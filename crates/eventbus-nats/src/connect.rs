//! The connection to NATS: the client's options from [`NatsConfig`] (auth,
//! TLS, reconnects, timeouts), and the connect itself.
//!
//! Each (re)connection is counted on a watch the consume loops read: a pull
//! request does not survive a reconnect, so a loop re-reads from the ack floor
//! when the count moves. The watch's sender lives in the client's event
//! callback; once the client is gone for good, the watch is closed.

use async_nats::{Client, ConnectOptions, Event as ClientEvent};
use tokio::sync::watch;

use eventbus_core::{Error, ErrorKind, Result};

use crate::config::{NatsAuth, NatsConfig};

/// Connect to the servers of `config` (the consumer group `group` and the
/// `pool` kind only name the connection in the log): the client, and the
/// count of its connections so far.
pub(crate) async fn connect(
    config: &NatsConfig,
    group: &str,
    pool: &str,
) -> Result<(Client, watch::Receiver<u64>)> {
    let (tx, reconnects) = watch::channel(0u64);
    let opts = connect_options(config, tx).await?;
    tracing::info!(urls = ?config.urls, auth = config.auth.kind(), tls = config.tls.required,
        group = %group, pool = pool, "connecting to NATS");
    let client = opts.connect(config.urls.clone()).await.map_err(|e| {
        Error::new(
            ErrorKind::Broker,
            format!("cannot connect to NATS at {:?}", config.urls),
        )
        .with_source(e)
    })?;
    Ok((client, reconnects))
}

/// The client's options: auth, name, timeouts, reconnects (counted on `tx`),
/// TLS.
async fn connect_options(cfg: &NatsConfig, tx: watch::Sender<u64>) -> Result<ConnectOptions> {
    let opts = match &cfg.auth {
        NatsAuth::None => ConnectOptions::new(),
        NatsAuth::Token { token } => ConnectOptions::new().token(token.clone()),
        NatsAuth::UserPassword { user, password } => {
            ConnectOptions::new().user_and_password(user.clone(), password.clone())
        }
        NatsAuth::CredentialsFile { path } => ConnectOptions::new()
            .credentials_file(path)
            .await
            .map_err(|e| {
                Error::config(format!(
                    "auth.path: cannot read credentials file `{}`",
                    path.display()
                ))
                .with_source(e)
            })?,
        NatsAuth::NKey { seed } => ConnectOptions::new().nkey(seed.clone()),
    };
    let reconnect = cfg.reconnect.clone();
    let mut opts = opts
        .name(&cfg.name)
        .connection_timeout(cfg.reconnect.connection_timeout)
        .request_timeout(Some(cfg.request_timeout))
        .ping_interval(cfg.ping_interval)
        .max_reconnects(cfg.reconnect.max_reconnects)
        .reconnect_delay_callback(move |attempt| reconnect.delay_for(attempt))
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                match event {
                    ClientEvent::Connected => {
                        tracing::info!("connected to NATS");
                        tx.send_modify(|n| *n += 1);
                    }
                    ClientEvent::Disconnected => {
                        tracing::warn!("disconnected from NATS; reconnecting")
                    }
                    ClientEvent::SlowConsumer(sid) => {
                        tracing::warn!(sid, "slow consumer: core NATS messages were dropped")
                    }
                    other => tracing::info!(event = %other, "NATS connection event"),
                }
            }
        });
    if cfg.reconnect.retry_on_initial_connect {
        opts = opts.retry_on_initial_connect();
    }
    let tls = &cfg.tls;
    if tls.required {
        opts = opts.require_tls(true);
    }
    if tls.first {
        opts = opts.tls_first();
    }
    if let Some(ca) = &tls.ca_file {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(opts)
}
