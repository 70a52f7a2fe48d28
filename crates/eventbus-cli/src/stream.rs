//! `eventbus publish` and `eventbus tail`: a bus of the command's own on the
//! service's broker.
//!
//! Both build a bus from the service's configuration with a keyed pool of one
//! worker (one line at a time, in arrival order) and no metrics exporter.
//!
//! `tail` never joins the service's group: it consumes with a group of its own,
//! `eventbus-tail-<random>`, through a plain subscription (a message is
//! acknowledged once printed, and nothing is ever dead-lettered, whatever it
//! holds), starting at the next message published, or at the oldest kept with
//! `--from-beginning`. A payload that is not an envelope is printed with the
//! reason. On NATS its durable consumer is deleted when it stops; on Kafka the
//! group's offsets are left to the broker's retention. Printing is fed through
//! a bounded channel: a slow terminal slows consumption.

use crate::cli::{PublishArgs, TailArgs};
use crate::error::{memory_backend, CliError};
use crate::settings::Settings;
use chrono::SecondsFormat;
use eventbus::core::inspect::{Access, Inspect};
use eventbus::BackendKind;
use eventbus::{
    Envelope, EventBusBuilder, EventBusConfig, EventBusExt, HandlerError, KeyedPoolConfig, Message,
    MetricsConfig, OffsetReset, PoolKind, SharedBus, DLQ_ATTEMPTS_HEADER, DLQ_ERROR_HEADER,
    DLQ_OFFSET_HEADER, DLQ_PARTITION_HEADER, DLQ_TOPIC_HEADER,
};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;
use tokio::sync::mpsc;

/// Lines waiting to be printed.
const PRINT_BUFFER: usize = 256;

/// The service's configuration, for a bus of the command's own: one worker, no
/// exporter, short waits on close.
pub(crate) fn own_config(settings: &Settings) -> EventBusConfig {
    let mut config = settings.bus_config().clone();
    config.pool = PoolKind::Keyed;
    config.actor_pool.rollout_percent = 0;
    config.keyed_pool = KeyedPoolConfig::default()
        .workers(1)
        .queue_size(PRINT_BUFFER)
        .wait_timeout(Duration::from_secs(5));
    config.metrics = MetricsConfig::default();
    config.consumer.drain_timeout = Duration::from_secs(2);
    config.consumer.handover_timeout = Duration::from_secs(2);
    config
}

pub(crate) async fn build(
    what: &str,
    settings: &Settings,
    config: EventBusConfig,
) -> Result<SharedBus, CliError> {
    EventBusBuilder::new()
        .config(config)
        .backend(settings.backend())
        .ignore_env()
        .build()
        .await
        .map_err(|e| CliError::new(what).with_source(e))
}

pub(crate) fn out(line: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|e| CliError::new("cannot write to standard output").with_source(e))
}

pub(crate) fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// `eventbus publish`.
pub(crate) async fn publish(settings: &Settings, args: &PublishArgs) -> Result<(), CliError> {
    if settings.kind() == BackendKind::Memory {
        return Err(memory_backend("publish"));
    }
    let payload: Value = serde_json::from_str(&args.payload)
        .map_err(|e| CliError::new(format!("--payload is not valid JSON: {e}")))?;
    let mut envelope = Envelope::new(args.aggregate.clone(), args.event_type.clone(), payload)
        .with_version(args.event_version);
    if let Some(id) = &args.correlation_id {
        envelope = envelope.with_correlation_id(id.clone());
    }
    if let Some(id) = &args.trace_id {
        envelope = envelope.with_trace_id(id.clone());
    }
    envelope.validate().map_err(|e| {
        CliError::new("the envelope is invalid (--aggregate, --type)").with_source(e)
    })?;
    crate::check::broker(settings, "publish", Some(&args.topic), Access::Publish).await?;
    let bus = build("publish", settings, own_config(settings)).await?;
    let sent = bus.publish_envelope(&args.topic, &envelope).await;
    let closed = bus.close().await;
    let receipt = sent.map_err(|e| {
        CliError::new(format!("publish to topic {:?} failed", args.topic)).with_source(e)
    })?;
    if let Err(e) = closed {
        note(&format!("warning: closing the bus: {e}"));
    }
    if args.json {
        out(&json!({
            "topic": args.topic,
            "partition": receipt.partition,
            "offset": receipt.offset,
        })
        .to_string())
    } else {
        out(&format!(
            "published {} {} to {} partition {} offset {}",
            envelope.aggregate_id,
            envelope.event_type,
            args.topic,
            receipt.partition,
            receipt.offset
        ))
    }
}

/// One consumed message as a line: the envelope, or the reason it is not one.
fn render(m: &Message, json: bool) -> String {
    let decoded = Envelope::decode(&m.payload);
    if json {
        let mut line = json!({
            "topic": &*m.topic,
            "partition": m.partition,
            "offset": m.offset,
        });
        if !m.headers.is_empty() {
            let headers: serde_json::Map<String, Value> = m
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), json!(String::from_utf8_lossy(v))))
                .collect();
            line["headers"] = Value::Object(headers);
        }
        match decoded {
            Ok(e) => line["envelope"] = serde_json::to_value(&e).unwrap_or(Value::Null),
            Err(e) => {
                line["error"] = json!(format!("not an envelope: {e}"));
                line["payload"] = json!(String::from_utf8_lossy(&m.payload));
            }
        }
        return line.to_string();
    }
    let place = format!("{}[{}]@{}", m.topic, m.partition, m.offset);
    // A dead letter says where it came from and why.
    let origin = match (
        m.headers.get_str(DLQ_TOPIC_HEADER),
        m.headers.get_str(DLQ_ERROR_HEADER),
    ) {
        (Some(topic), error) => format!(
            " [dead letter of {topic}[{}]@{} after {} attempt(s): {}]",
            m.headers.get_str(DLQ_PARTITION_HEADER).unwrap_or("?"),
            m.headers.get_str(DLQ_OFFSET_HEADER).unwrap_or("?"),
            m.headers.get_str(DLQ_ATTEMPTS_HEADER).unwrap_or("?"),
            error.unwrap_or("no error given"),
        ),
        (None, _) => String::new(),
    };
    let line = match decoded {
        Ok(e) => format!(
            "{place} {} {} v{}{} {}",
            e.aggregate_id,
            e.event_type,
            e.event_version,
            e.occurred_at
                .map(|t| format!(" {}", t.to_rfc3339_opts(SecondsFormat::Millis, true)))
                .unwrap_or_default(),
            serde_json::to_string(&e.payload).unwrap_or_default(),
        ),
        Err(e) => format!(
            "{place} not an envelope ({e}): {}",
            String::from_utf8_lossy(&m.payload)
        ),
    };
    line + &origin
}

/// `eventbus tail`.
pub(crate) async fn tail(settings: &Settings, args: &TailArgs) -> Result<(), CliError> {
    let mut config = own_config(settings);
    config.consumer.group_id = format!("eventbus-tail-{:016x}", random());
    config.consumer.auto_offset_reset = if args.from_beginning {
        OffsetReset::Earliest
    } else {
        OffsetReset::Latest
    };
    config.dead_letter.enabled = false;
    if settings.kind() == BackendKind::Memory {
        return Err(memory_backend("tail"));
    }
    crate::check::broker(settings, "tail", Some(&args.topic), Access::Read).await?;
    let group = config.consumer.group_id.clone();
    let bus = build("tail", settings, config).await?;
    let result = consume(&bus, args).await;
    let _ = bus.unsubscribe(&args.topic).await;
    if let Err(e) = bus.close().await {
        note(&format!("warning: closing the bus: {e}"));
    }
    // What the tail's own group left on the broker (a NATS durable consumer).
    if let Err(e) = settings
        .backend()
        .forget(&group, &args.topic, settings.timeout)
        .await
    {
        note(&format!(
            "warning: cannot remove the tail's group {group} from the broker: {e}"
        ));
    }
    result
}

async fn consume(bus: &SharedBus, args: &TailArgs) -> Result<(), CliError> {
    let (tx, mut rx) = mpsc::channel::<String>(PRINT_BUFFER);
    let json = args.json;
    bus.subscribe(&args.topic, move |m: Message| {
        let tx = tx.clone();
        async move {
            tx.send(render(&m, json))
                .await
                .map_err(|_| HandlerError::permanent("tail stopped"))
        }
    })
    .await
    .map_err(|e| CliError::new(format!("tail {:?}", args.topic)).with_source(e))?;
    note(&format!(
        "tailing {} ({}); Ctrl-C to stop",
        args.topic,
        match (args.from_beginning, args.max) {
            (true, Some(n)) => format!("from the beginning, at most {n} message(s)"),
            (true, None) => "from the beginning".to_owned(),
            (false, Some(n)) => format!("new messages, at most {n}"),
            (false, None) => "new messages".to_owned(),
        }
    ));
    if args.max == Some(0) {
        return Ok(());
    }
    let mut printed = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            biased;
            _ = &mut ctrl_c => return Ok(()),
            line = rx.recv() => {
                let Some(line) = line else { return Ok(()) };
                out(&line)?;
                printed += 1;
                if args.max.is_some_and(|max| printed >= max) {
                    return Ok(());
                }
            }
        }
    }
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        let e = Envelope::new("order-1", "order.placed", json!({"n": 1}));
        let m = Message::new("orders", 0, 7, e.encode().unwrap());
        let line = render(&m, false);
        assert!(
            line.starts_with("orders[0]@7 order-1 order.placed v1 "),
            "{line}"
        );
        assert!(line.ends_with(r#"{"n":1}"#), "{line}");
        let v: Value = serde_json::from_str(&render(&m, true)).unwrap();
        assert_eq!(v["envelope"]["aggregate_id"], "order-1");
        assert_eq!(v["offset"], 7);
        let dead = Message::new("orders.dlq", 0, 3, e.encode().unwrap()).with_headers(
            eventbus::Headers::new()
                .with(DLQ_TOPIC_HEADER, "orders")
                .with(DLQ_PARTITION_HEADER, "1")
                .with(DLQ_OFFSET_HEADER, "41")
                .with(DLQ_ATTEMPTS_HEADER, "5")
                .with(DLQ_ERROR_HEADER, "boom"),
        );
        let line = render(&dead, false);
        assert!(
            line.ends_with(" [dead letter of orders[1]@41 after 5 attempt(s): boom]"),
            "{line}"
        );
        let v: Value = serde_json::from_str(&render(&dead, true)).unwrap();
        assert_eq!(v["headers"][DLQ_ERROR_HEADER], "boom");
        let bad = Message::new("orders", 0, 8, &b"not json"[..]);
        assert!(render(&bad, false).contains("not an envelope"));
        let v: Value = serde_json::from_str(&render(&bad, true)).unwrap();
        assert_eq!(v["payload"], "not json");
    }
}
