//! One consumer process of a chaos run (Kafka or NATS); see
//! [`eventbus_chaos::consumer`]. The `chaos` binary runs the same code as
//! `chaos consumer [args]`.
//!
//! ```text
//! chaos-consumer --backend kafka|nats --target <brokers|url> --envelope-topic T
//!     [--plain-topic P] [--partitions N] --group G [--pool keyed|actor] [--worker NAME]
//!     [--error-rate F] [--panic-rate F] [--stuck-key K --stuck-ms MS --stuck-every N]
//!     [--slow-prefix PREFIX --slow-ms MS] [--drain-ms MS] [--handover-ms MS]
//! ```

use std::process::ExitCode;

fn main() -> ExitCode {
    eventbus_chaos::init_process();
    eventbus_chaos::consumer::main(std::env::args().skip(1))
}
