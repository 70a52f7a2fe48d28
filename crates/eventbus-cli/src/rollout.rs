//! `eventbus rollout get | set`: the operations server's `/rollout` routes, over
//! HTTP.
//!
//! The server is `--url`, else `http://` + the configuration's `ops_server.listen`
//! (an unspecified address, `0.0.0.0` or `[::]`, is asked on loopback). `PUT` sends
//! `{"actor_percent": P}` with `Authorization: Bearer` the token the server reads
//! too: `EVENTBUS_ADMIN_TOKEN`, else `ops_server.admin_token`; with neither the
//! request goes without one, and the server says why it refuses. Every refusal
//! (400, 401, 403, 404, 409) is printed as one line with the server's reason.

use crate::cli::{Global, OpsTarget, RolloutCommand};
use crate::error::CliError;
use crate::settings::file_config;
use eventbus::FileConfig;
use serde_json::{json, Value};
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

/// The variable the operations server reads its admin token from.
const ADMIN_TOKEN_VARIABLE: &str = "EVENTBUS_ADMIN_TOKEN";

/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn run(global: &Global, cmd: RolloutCommand) -> Result<(), CliError> {
    let (_, file) = file_config(global.config.as_deref(), |v| std::env::var_os(v))?;
    match cmd {
        RolloutCommand::Get { target, json } => {
            let url = url(&target, &file)?;
            let client = client()?;
            let answer = client
                .get(&url)
                .send()
                .await
                .map_err(|e| unreachable(&url, e))?;
            let body = answer_body(&url, "GET", answer).await?;
            print(json, &body, describe(&body))
        }
        RolloutCommand::Set {
            percent,
            target,
            json,
        } => {
            let url = url(&target, &file)?;
            let client = client()?;
            let mut request = client.put(&url).json(&json!({ "actor_percent": percent }));
            if let Some(token) = token(&file)? {
                request = request.bearer_auth(token);
            }
            let answer = request.send().await.map_err(|e| unreachable(&url, e))?;
            let body = answer_body(&url, "PUT", answer).await?;
            let line = format!(
                "{}: actor share {}% -> {}%",
                text(&body, "name"),
                text(&body, "previous_actor_percent"),
                text(&body, "actor_percent"),
            );
            print(json, &body, line)
        }
    }
}

fn client() -> Result<reqwest::Client, CliError> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| CliError::new("rollout: cannot build the HTTP client").with_source(e))
}

/// The `/rollout` URL of `target`.
fn url(target: &OpsTarget, file: &FileConfig) -> Result<String, CliError> {
    let base = base_url(target.url.as_deref(), file)?;
    Ok(match &target.switch {
        Some(name) => {
            let ok = !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !ok {
                return Err(CliError::new(format!(
                    "--switch {name:?} is invalid: a switch name is letters, digits, '-', '_' \
                     and '.'"
                )));
            }
            format!("{base}/rollout/{name}")
        }
        None => format!("{base}/rollout"),
    })
}

/// The operations server's address: `--url`, else the configuration's
/// `ops_server.listen` (on loopback when it listens everywhere).
pub(crate) fn base_url(url: Option<&str>, file: &FileConfig) -> Result<String, CliError> {
    Ok(match url {
        Some(u) => {
            let u = u.trim().trim_end_matches('/');
            // The operations server speaks plain HTTP (this client has no TLS).
            if !u.starts_with("http://") || u.len() == "http://".len() {
                return Err(CliError::new(format!(
                    "--url {u:?} is invalid: expected http://host:port, the operations \
                     server's address"
                )));
            }
            u.to_owned()
        }
        None => format!("http://{}", loopback(file.ops_server.listen)),
    })
}

/// `addr`, with an unspecified IP (listening everywhere) replaced by loopback.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// The token the server reads: the variable, else the file's.
fn token(file: &FileConfig) -> Result<Option<String>, CliError> {
    match std::env::var_os(ADMIN_TOKEN_VARIABLE) {
        Some(raw) => match raw.to_str() {
            Some(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_owned())),
            Some(_) => Err(CliError::new(format!(
                "environment variable {ADMIN_TOKEN_VARIABLE} is set but empty: set the \
                 operations server's admin token, or leave it unset"
            ))),
            None => Err(CliError::new(format!(
                "environment variable {ADMIN_TOKEN_VARIABLE} is not valid UTF-8"
            ))),
        },
        None => Ok(file.ops_server.admin_token.clone()),
    }
}

fn unreachable(url: &str, e: reqwest::Error) -> CliError {
    CliError::new(format!(
        "rollout: no answer from the operations server at {url}"
    ))
    .with_source(e)
}

/// The JSON body of a 200 answer; any other status is an error with the server's
/// reason.
async fn answer_body(
    url: &str,
    method: &str,
    answer: reqwest::Response,
) -> Result<Value, CliError> {
    let status = answer.status();
    let bytes = answer.bytes().await.map_err(|e| {
        CliError::new(format!("rollout: {method} {url}: cannot read the answer")).with_source(e)
    })?;
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();
    if status.is_success() {
        return body.ok_or_else(|| {
            CliError::new(format!(
                "rollout: {method} {url}: the answer is not JSON: {}",
                String::from_utf8_lossy(&bytes)
            ))
        });
    }
    let reason = error_reason(body.as_ref(), &bytes);
    let hint = match status.as_u16() {
        401 => format!(
            " (the token is {ADMIN_TOKEN_VARIABLE}, else ops_server.admin_token in --config)"
        ),
        409 => body
            .as_ref()
            .and_then(|b| b.get("variable"))
            .and_then(Value::as_str)
            .map(|v| format!(" (held by {v}=false at the service's start-up)"))
            .unwrap_or_default(),
        _ => String::new(),
    };
    Err(CliError::new(format!(
        "rollout: {method} {url}: {status}: {reason}{hint}"
    )))
}

/// Why the operations server refused a request: its JSON `error`, else the
/// answer's text.
pub(crate) fn error_reason(body: Option<&Value>, bytes: &[u8]) -> String {
    body.and_then(|b| b.get("error"))
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(bytes).trim().to_owned())
}

fn text(body: &Value, key: &str) -> String {
    match body.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(v) => v.to_string(),
    }
}

/// One readable line for a switch's state.
fn describe(body: &Value) -> String {
    let pinned = body.get("pinned_routes");
    let floor = match body.get("floor") {
        Some(Value::Null) | None => "none".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    format!(
        "{}: actor share {}%, pool in force {}, pinned routes keyed {} / actor {}, floor {}",
        text(body, "name"),
        text(body, "actor_percent"),
        text(body, "pool_in_force"),
        pinned.map_or("-".to_owned(), |p| text(p, "keyed")),
        pinned.map_or("-".to_owned(), |p| text(p, "actor")),
        floor,
    )
}

fn print(json: bool, body: &Value, line: String) -> Result<(), CliError> {
    let out = if json { body.to_string() } else { line };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{out}")
        .map_err(|e| CliError::new("cannot write to standard output").with_source(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let mut file = FileConfig::default();
        file.ops_server.listen = "0.0.0.0:9100".parse().unwrap();
        let target = OpsTarget {
            url: None,
            switch: None,
        };
        assert_eq!(
            url(&target, &file).unwrap(),
            "http://127.0.0.1:9100/rollout"
        );
        let target = OpsTarget {
            url: Some("http://ops:1/".into()),
            switch: Some("orders".into()),
        };
        assert_eq!(url(&target, &file).unwrap(), "http://ops:1/rollout/orders");
        for bad in ["ops:1", "https://ops:1", "http://"] {
            let target = OpsTarget {
                url: Some(bad.into()),
                switch: None,
            };
            let e = url(&target, &file).unwrap_err().to_string();
            assert!(e.contains("--url") && e.contains(bad), "{e}");
        }
        let target = OpsTarget {
            url: None,
            switch: Some("a/b".into()),
        };
        assert!(url(&target, &file)
            .unwrap_err()
            .to_string()
            .contains("--switch"));
    }
}
