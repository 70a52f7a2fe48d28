//! How topics map to NATS subjects, stream names and durable consumer names.

use eventbus_core::{Error, ErrorKind, Result};

use eventbus_core::raw::validate_topic;

/// Check a topic for NATS: the common rules of [`validate_topic`], plus no empty
/// subject token (`a..b`, `.a`, `a.` are refused).
pub(crate) fn validate_nats_topic(topic: &str) -> Result<()> {
    validate_topic(topic)?;
    if topic.split('.').any(str::is_empty) {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "topic `{topic}` is invalid for NATS: a subject token is empty \
                 (no leading, trailing or doubled `.`)"
            ),
        ));
    }
    Ok(())
}

/// Check a subject prefix: dot-separated tokens of `A-Z a-z 0-9 _ -`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    let ok = !prefix.is_empty()
        && prefix.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::config(format!(
            "subject_prefix `{}` is invalid: use dot-separated tokens of A-Z a-z 0-9 _ -",
            prefix.escape_debug()
        )))
    }
}

/// The subject of `topic`.
pub(crate) fn subject(prefix: Option<&str>, topic: &str) -> String {
    match prefix {
        Some(p) => format!("{p}.{topic}"),
        None => topic.to_owned(),
    }
}

/// Replace characters not allowed in stream and consumer names.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '.' | '*' | '>' | '/' | '\\' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

/// The stream of `topic`: the subject with `.` replaced by `_`.
pub(crate) fn stream_name(prefix: Option<&str>, topic: &str) -> String {
    sanitize(&subject(prefix, topic))
}

/// The durable consumer of `group` on `topic`.
pub(crate) fn durable_name(group: &str, topic: &str) -> String {
    sanitize(&format!("{group}-{topic}"))
}

/// The durable consumer of partition `n` of a partitioned topic whose
/// unpartitioned durable would be `base`.
pub(crate) fn partition_durable(base: &str, n: u32) -> String {
    format!("{base}-p{n}")
}

/// The key-value key prefix of a partitioned (group, topic): `<stream>.<base
/// durable>`, escaped as in [`lease_key`]. Partition `n`'s lease is `<prefix>.<n>`;
/// each member's heartbeat is `<prefix>.members.<member>`.
pub(crate) fn group_prefix(stream: &str, base_durable: &str) -> String {
    lease_key(stream, base_durable)
}

/// The lease key of partition `n` under `prefix` ([`group_prefix`]).
pub(crate) fn partition_lease_key(prefix: &str, n: u32) -> String {
    format!("{prefix}.{n}")
}

/// The heartbeat key of `member` under `prefix` ([`group_prefix`]).
pub(crate) fn member_key(prefix: &str, member: &str) -> String {
    let mut key = format!("{prefix}.members.");
    escape_key(member, &mut key);
    key
}

fn escape_key(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
}

/// The lease key of a durable consumer: `<stream>.<durable>`, each part with every
/// byte outside `A-Z a-z 0-9 _ -` written as `=XX` (key-value keys allow few
/// characters; `=` itself is escaped, so distinct names stay distinct).
pub(crate) fn lease_key(stream: &str, durable: &str) -> String {
    let mut key = String::with_capacity(stream.len() + durable.len() + 1);
    escape_key(stream, &mut key);
    key.push('.');
    escape_key(durable, &mut key);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(subject(None, "orders.v1"), "orders.v1");
        assert_eq!(subject(Some("app"), "orders.v1"), "app.orders.v1");
        assert_eq!(stream_name(Some("app"), "orders.v1"), "app_orders_v1");
        assert_eq!(durable_name("svc a", "orders.v1"), "svc_a-orders_v1");
        assert_eq!(lease_key("app_orders", "svc:a=b"), "app_orders.svc=3Aa=3Db");
        assert_eq!(partition_durable("svc-orders", 3), "svc-orders-p3");
        let prefix = group_prefix("orders", "svc-orders");
        assert_eq!(partition_lease_key(&prefix, 11), "orders.svc-orders.11");
        assert_eq!(
            member_key(&prefix, "api-1.x"),
            "orders.svc-orders.members.api-1=2Ex"
        );
    }

    #[test]
    fn rejects_empty_tokens() {
        for bad in ["a..b", ".a", "a.", "a b"] {
            let e = validate_nats_topic(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidInput);
            assert!(e.to_string().contains("topic"), "{e}");
        }
        assert!(validate_nats_topic("a.b-c_d").is_ok());
        assert!(validate_prefix("app.v1").is_ok());
        for bad in ["", "a.", "a.*", "a b", "a.>"] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }
}
