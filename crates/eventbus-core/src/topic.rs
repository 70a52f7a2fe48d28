//! Topic names: what every backend accepts.

use crate::error::{Error, ErrorKind, Result};

/// Longest accepted topic name (Kafka's limit).
pub const MAX_TOPIC_LEN: usize = 249;

/// Check a topic name: 1 to 249 characters of `A-Z a-z 0-9 . _ -`, and not `.` or `..`.
pub fn validate_topic(topic: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("topic `{}` is invalid: {why}", topic.escape_debug()),
        ))
    };
    if topic.is_empty() {
        return bad("empty name");
    }
    if topic.len() > MAX_TOPIC_LEN {
        return bad("longer than 249 characters");
    }
    if topic == "." || topic == ".." {
        return bad("`.` and `..` are reserved");
    }
    if let Some(c) = topic
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(&format!(
            "character `{}` is not allowed (use A-Z a-z 0-9 . _ -)",
            c.escape_debug()
        ));
    }
    Ok(())
}
