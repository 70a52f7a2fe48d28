//! What the command prints besides its answer: the library's and librdkafka's
//! log, on standard error, only when `-v` (or `RUST_LOG`) asks for it.
//!
//! Without `-v` only the command's own answer or one-line error is printed:
//! librdkafka's log (connection retries, say) is off, and the library's shows
//! errors only. `-v` shows warnings and librdkafka's log; `-vv` everything down
//! to debug. `RUST_LOG`, when set, decides instead. Colour is used only on a
//! terminal, and never when `NO_COLOR` is set to a value (see no-color.org).

use std::ffi::OsString;

/// The log filter for `-v` given `verbose` times (`RUST_LOG` syntax).
pub fn filter(verbose: u8) -> &'static str {
    match verbose {
        0 => "error,librdkafka=off,rdkafka=off",
        1 => "warn,librdkafka=info,rdkafka=info",
        _ => "debug",
    }
}

/// Whether log lines are coloured: only on a terminal, and not when `NO_COLOR`
/// holds a value (`no_color` is its value, if set).
pub fn colour(stderr_is_terminal: bool, no_color: Option<OsString>) -> bool {
    let asked_off = match no_color {
        Some(v) => !v.is_empty(),
        None => false,
    };
    stderr_is_terminal && !asked_off
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsString::new())));
        assert!(!colour(true, Some(OsString::from("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsString::from("1"))));
    }

    #[test]
    fn librdkafka_only_when_asked() {
        assert!(filter(0).contains("librdkafka=off"));
        assert!(filter(1).contains("librdkafka=info"));
        assert_eq!(filter(3), "debug");
    }
}
