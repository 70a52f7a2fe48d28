//! Keep panics raised on purpose by tests out of the test output.

use std::sync::Once;

/// The message of a panic a test raises on purpose.
pub const INDUCED_PANIC: &str = "induced panic";

fn deliberate(text: &str) -> bool {
    text == INDUCED_PANIC
        || text == "boom in a job"
        || text == "plain panic"
        || text.starts_with("random panic in message ")
}

/// Install (once per process) a panic hook that stays silent for the panics this
/// kit's checks and [`INDUCED_PANIC`] raise on purpose; every other panic is
/// reported by the default hook.
pub fn quiet_deliberate_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            if !deliberate(&text) {
                default(info);
            }
        }));
    });
}
