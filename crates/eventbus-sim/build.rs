//! Declares the `tokio_unstable` cfg, under which the simulation seeds tokio's
//! own generator (`cargo xtask sim` builds with it).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tokio_unstable)");
}
