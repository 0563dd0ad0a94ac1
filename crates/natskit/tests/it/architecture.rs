//! The library's folders are its layers, and dependencies point one way:
//!
//! - `core/`: pure decisions and checks (no I/O, no clock reads, no tasks);
//! - `client/`: the connection, its breaker shell, status task and the
//!   pieces every feature shares;
//! - feature folders (`messaging/`, `jetstream/`, `kv/`, `outbox/`): each
//!   uses its own files, the client layer and the core, never another
//!   feature;
//! - `typed/`: typed subjects on top of the features.
//!
//! This test reads every `crate::<folder>` reference in `src/` (comments and
//! doc comments excluded) and fails on a file outside the layer folders, an
//! edge that points up or sideways, or I/O in the core.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layer folders, bottom up; folders in one layer never use each other.
const LAYERS: &[(&str, &[&str])] = &[
    ("core", &["core"]),
    ("client", &["client"]),
    ("features", &["messaging", "jetstream", "kv", "outbox"]),
    ("typed subjects", &["typed"]),
];

/// Pure cores that live beside their shells in a feature folder: the same
/// rule as `core/`, but they may use the client layer's classifications.
const PURE_FILES: &[&str] = &[
    "kv/write.rs",
    "outbox/window.rs",
    "jetstream/consumer/acks.rs",
];

/// What the core may not contain outside its unit tests: I/O, tasks and
/// clock reads belong to the shells above it.
const NOT_IN_CORE: &[&str] = &[
    "tokio::",
    "async_nats::Client",
    "std::fs",
    "std::net",
    "Instant::now",
    "SystemTime::now",
    "async fn",
    "crate::client",
];

fn layer_of(folder: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, folders)| folders.contains(&folder))
}

/// A file's code without comments and without its `#[cfg(test)]` module
/// (the last item of a file, by convention here).
fn code_of(source: &str) -> String {
    let mut out = String::new();
    for line in source.lines() {
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        out.push_str(line.split("//").next().unwrap_or(""));
        out.push('\n');
    }
    out
}

/// The folders named by `crate::x` references in `code`.
fn references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("a readable src/ folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every source file below `src/` but `lib.rs`, with its top folder.
fn files() -> Vec<(String, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    rust_files(&src, &mut paths);
    let mut files = Vec::new();
    for path in paths {
        let relative = path.strip_prefix(&src).expect("below src/");
        let mut parts = relative.components();
        let first = parts
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a name")
            .to_owned();
        if parts.next().is_none() {
            assert_eq!(
                first,
                "lib.rs",
                "every module lives in a layer folder: {}",
                relative.display()
            );
            continue;
        }
        files.push((first, path));
    }
    assert!(files.len() > 20, "the reader found the sources");
    files
}

#[test]
fn every_folder_is_a_layer_and_edges_point_down() {
    let mut wrong = Vec::new();
    for (folder, path) in files() {
        let Some(own) = layer_of(&folder) else {
            panic!("folder {folder}/ has no layer in tests/architecture.rs");
        };
        let code = code_of(&std::fs::read_to_string(&path).expect("readable"));
        for dep in references(&code) {
            if dep == folder {
                continue;
            }
            let Some(theirs) = layer_of(&dep) else {
                panic!(
                    "{} uses crate::{dep}, which is no layer folder",
                    path.display()
                );
            };
            if theirs >= own {
                wrong.push(format!(
                    "{} ({}) -> {dep} ({})",
                    path.display(),
                    LAYERS[own].0,
                    LAYERS[theirs].0
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "edges pointing up or sideways: {wrong:#?}"
    );
}

#[test]
fn the_core_does_no_io_and_reads_no_clock() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut found = Vec::new();
    let mut pure_seen = 0;
    for (folder, path) in files() {
        let relative = path.strip_prefix(&src).expect("below src/");
        let pure_file = PURE_FILES.iter().any(|p| relative == Path::new(p));
        pure_seen += usize::from(pure_file);
        if folder != "core" && !pure_file {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(&path).expect("readable"));
        for banned in NOT_IN_CORE {
            if pure_file && *banned == "crate::client" {
                continue;
            }
            if code.contains(banned) {
                found.push(format!("{}: {banned}", path.display()));
            }
        }
    }
    assert_eq!(pure_seen, PURE_FILES.len(), "every pure file exists");
    assert!(
        found.is_empty(),
        "I/O or clock reads in a pure core: {found:#?}"
    );
}

#[test]
fn the_reader_finds_references_and_skips_comments_and_tests() {
    let code = code_of(
        "use crate::client::Client; // crate::kv\nlet x = crate::core::error::Error::Closed;\n\
         #[cfg(test)]\nmod tests { use crate::outbox::X; }",
    );
    assert_eq!(
        references(&code).into_iter().collect::<Vec<_>>(),
        vec!["client".to_owned(), "core".to_owned()]
    );
    assert_eq!(layer_of("kv"), layer_of("outbox"));
    assert!(layer_of("core") < layer_of("client"));
    assert_eq!(layer_of("src"), None);
}
