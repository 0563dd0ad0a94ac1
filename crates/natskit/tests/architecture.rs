//! The library's modules depend on each other in one direction: a pure core
//! (no I/O), the connection, features, typed subjects on top. This test
//! reads every `crate::<module>` reference in `src/` and fails on an import
//! cycle or an edge that points up a layer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Each module's layer; a module may use its own layer and those below.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "core",
        &[
            "error", "backoff", "breaker", "header", "subject", "trace", "status", "metrics",
        ],
    ),
    ("connection", &["registry", "handler", "client"]),
    (
        "features",
        &[
            "pubsub",
            "request",
            "jetstream",
            "consumer",
            "kv",
            "temporal",
            "service",
            "monitor",
            "outbox",
            "outbox_store",
        ],
    ),
    ("typed subjects", &["typed"]),
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS
        .iter()
        .position(|(_, modules)| modules.contains(&module))
}

/// `crate::x` references of one file, comments and doc comments excluded.
fn references(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
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
    }
    found
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/") {
        let path = entry.expect("entry").path();
        assert!(
            path.extension().is_some_and(|e| e == "rs"),
            "modules are flat files in src/: {}",
            path.display()
        );
        let module = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name")
            .to_owned();
        if module == "lib" {
            continue;
        }
        let source = std::fs::read_to_string(&path).expect("readable");
        let mut deps = references(&source);
        deps.remove(&module);
        graph.insert(module, deps);
    }
    graph
}

#[test]
fn every_module_has_a_layer_and_edges_point_down() {
    let graph = graph();
    let mut upward = Vec::new();
    for (module, deps) in &graph {
        let Some(own) = layer_of(module) else {
            panic!("module {module} has no layer in tests/architecture.rs");
        };
        for dep in deps {
            let Some(theirs) = layer_of(dep) else {
                panic!("{module} uses crate::{dep}, which has no layer");
            };
            if theirs > own {
                upward.push(format!(
                    "{module} ({}) -> {dep} ({})",
                    LAYERS[own].0, LAYERS[theirs].0
                ));
            }
        }
    }
    assert!(upward.is_empty(), "edges pointing up: {upward:#?}");
}

#[test]
fn there_is_no_import_cycle() {
    let graph = graph();
    // Kahn's algorithm: whatever cannot be ordered sits on a cycle.
    let mut indegree: BTreeMap<&str, usize> = graph.keys().map(|m| (m.as_str(), 0)).collect();
    for deps in graph.values() {
        for dep in deps {
            if let Some(n) = indegree.get_mut(dep.as_str()) {
                *n += 1;
            }
        }
    }
    let mut ready: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n == 0)
        .map(|(m, _)| *m)
        .collect();
    let mut ordered = 0;
    while let Some(module) = ready.pop() {
        ordered += 1;
        for dep in &graph[module] {
            if let Some(n) = indegree.get_mut(dep.as_str()) {
                *n -= 1;
                if *n == 0 {
                    ready.push(dep.as_str());
                }
            }
        }
    }
    let cyclic: Vec<&str> = indegree
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(m, _)| *m)
        .collect();
    assert_eq!(ordered, graph.len(), "modules on a cycle: {cyclic:?}");
}

#[test]
fn the_reader_finds_references() {
    let refs =
        references("use crate::client::Client; // crate::kv\nlet x = crate::error::Error::Closed;");
    assert_eq!(
        refs.into_iter().collect::<Vec<_>>(),
        vec!["client".to_owned(), "error".to_owned()]
    );
}
