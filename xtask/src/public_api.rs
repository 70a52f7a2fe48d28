//! `cargo xtask public-api [--check]`: the public items of every crate a user
//! depends on (the facade `eventbus` with every feature on, `eventbus-core`, the
//! two pools and the three backends), read from rustdoc's "List of all items"
//! page (stable toolchain), written to `docs/public-api.md`. With `--check` the
//! file must already say what the code exports.

use crate::{cargo, project_root, run, target_dir, Result};
use std::collections::BTreeMap;
use std::fs;

/// The crates listed, with the features their docs are built with.
/// Kafka's features only choose how librdkafka is built (TLS, SASL, zstd): they
/// add no item.
const CRATES: &[(&str, &str)] = &[
    ("eventbus", "full"),
    ("eventbus-core", ""),
    ("eventbus-keyed-pool", ""),
    ("eventbus-actor-pool", ""),
    ("eventbus-memory", ""),
    ("eventbus-kafka", ""),
    ("eventbus-nats", ""),
];

const OUT: &str = "docs/public-api.md";

pub(crate) fn public_api(args: &[String]) -> Result {
    let check = match args {
        [] => false,
        [flag] if flag == "--check" => true,
        other => {
            return Err(format!(
            "public-api: unexpected arguments {other:?}; usage: cargo xtask public-api [--check]"
        ))
        }
    };
    let mut text = String::from(
        "# Public API\n\n\
         Written by `cargo xtask public-api` from rustdoc's list of all items of every\n\
         crate a user depends on (the facade with every feature, core, the pools and\n\
         the backends); `cargo xtask test` checks it is current. Items under `raw` are\n\
         for backend and pool implementers; everything else is what a user of the bus\n\
         sees.\n",
    );
    for (krate, features) in CRATES {
        let mut doc = cargo();
        doc.args(["doc", "--no-deps", "-p", krate]);
        if !features.is_empty() {
            doc.args(["--features", features]);
        }
        run(doc, &format!("docs of {krate}"))?;
        let page = target_dir()
            .join("doc")
            .join(krate.replace('-', "_"))
            .join("all.html");
        let html = fs::read_to_string(&page)
            .map_err(|e| format!("cannot read {}: {e}", page.display()))?;
        let items = items(&html)?;
        let total: usize = items.values().map(Vec::len).sum();
        let raw: usize = items
            .values()
            .flatten()
            .filter(|path| path.starts_with("raw::"))
            .count();
        text.push_str(&format!(
            "\n## `{krate}`\n\n{total} items: {} for users, {raw} under `raw`.\n",
            total - raw
        ));
        for (kind, paths) in &items {
            text.push_str(&format!("\n### {kind} ({})\n\n", paths.len()));
            for path in paths {
                text.push_str(&format!("- `{path}`\n"));
            }
        }
    }
    let out = project_root().join(OUT);
    if check {
        let current = fs::read_to_string(&out).unwrap_or_default();
        if current != text {
            return Err(format!(
                "{OUT} is out of date with the code's public items: run `cargo xtask public-api` and commit it"
            ));
        }
        return Ok(());
    }
    fs::write(&out, text).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    eprintln!("xtask: wrote {OUT}");
    Ok(())
}

/// Item paths by kind (Structs, Enums, …) from rustdoc's `all.html`.
fn items(html: &str) -> Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let body = html
        .split_once("List of all items")
        .map(|(_, b)| b)
        .ok_or("rustdoc's all.html has no \"List of all items\"")?;
    for section in body.split("<h3 id=\"").skip(1) {
        let kind = section
            .split_once('>')
            .and_then(|(_, rest)| rest.split_once("</h3>"))
            .map(|(k, _)| k.to_owned())
            .ok_or("a section of all.html without a heading")?;
        let paths = out.entry(kind).or_default();
        for link in section.split("<li><a href=\"").skip(1) {
            let name = link
                .split_once("\">")
                .and_then(|(_, rest)| rest.split_once("</a>"))
                .map(|(n, _)| n)
                .ok_or("an item link of all.html without a name")?;
            paths.push(name.to_owned());
        }
        paths.sort();
    }
    Ok(out)
}
