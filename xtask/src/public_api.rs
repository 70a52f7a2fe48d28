//! `cargo xtask public-api [--check]`: the public items of every crate a user
//! depends on (the facade `eventbus` with every feature on, `eventbus-core`, the
//! two pools and the three backends), read from rustdoc's "List of all items"
//! page (stable toolchain), written to `docs/public-api.md`. With `--check` the
//! file must already say what the code exports.

use crate::{cargo, project_root, run, target_dir, Result};
use std::collections::BTreeMap;
use std::fs;

/// The facade, documented with every feature on.
const FACADE: (&str, &str) = ("eventbus", "full");

/// The crates listed, with the features their docs are built with: the facade,
/// then every crate of the workspace it depends on, core first, the others in
/// its manifest's order (a backend or pool added to the facade is listed
/// without a change here). Kafka's features only choose how librdkafka is built
/// (TLS, SASL, zstd): they add no item.
fn crates() -> Result<Vec<(String, &'static str)>> {
    let manifest = project_root().join("crates/eventbus/Cargo.toml");
    let text = fs::read_to_string(&manifest)
        .map_err(|e| format!("cannot read {}: {e}", manifest.display()))?;
    let mut listed = vec![(FACADE.0.to_owned(), FACADE.1)];
    let mut in_dependencies = false;
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_dependencies = line == "[dependencies]";
            continue;
        }
        let name = line.split(['=', '.', ' ']).next().unwrap_or_default();
        if in_dependencies && name.starts_with("eventbus-") {
            listed.push((name.to_owned(), ""));
        }
    }
    // Core first: everything else builds on it.
    listed[1..].sort_by_key(|(name, _)| name != "eventbus-core");
    if listed.len() < 2 {
        return Err(format!(
            "{} names no eventbus crate under [dependencies]",
            manifest.display()
        ));
    }
    Ok(listed)
}

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
    for (krate, features) in crates()? {
        let krate = krate.as_str();
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
