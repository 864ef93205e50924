//! The module shape stays one-way (issue 13, `../shared/ARCHITECTURE.md`): no import cycle
//! among the top-level modules of `src/`, and no module imports one of a higher layer.
//!
//! "Import" means what the reviewers' layering check means: any text `crate::name` or
//! `crate::{a, b}` in a file under `src/<top>/` (or `src/<top>.rs`), also in comments and
//! doc comments, makes `<top>` depend on `name`. `main.rs` and `lib.rs` are the crate's
//! roots, not layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// The layers, lowest first. A module may import modules of lower layers only (and none of
/// its own layer: siblings stay independent). Every top-level module of `src/` must be
/// listed, so a new module gets a place on purpose.
const LAYERS: &[(&str, &[&str])] = &[
    // Leaves: the allocator, the sharded map, the telemetry handle every layer registers
    // its metrics on, and the helpers every layer's config section uses.
    (
        "leaves",
        &[
            "allocator",
            "config_section",
            "metrics",
            "overload",
            "pike",
            "shard",
        ],
    ),
    // Process support: the storage directory, logging.
    ("support", &["storage", "logging"]),
    // Cluster membership: node names and liveness leases in Redis (needs `[redis]`).
    ("cluster", &["cluster"]),
    // RFC 3261 section 7: the message model.
    ("sip", &["sip"]),
    // Section 18: transports, local addresses, name resolution, contact flows.
    ("transport", &["transport"]),
    // Simulated phones and trunks (`strowger test`): SIP over the memory network like a
    // real phone, so nothing of the engine above the transport is theirs to import.
    ("simulate", &["simulate"]),
    // Section 17: transactions; defines the observer trait `trace` implements.
    ("transaction", &["transaction"]),
    // Section 12: dialogs and the dialog table; message traces on the side.
    ("dialog", &["dialog", "trace"]),
    // Helpers the transaction users share.
    ("helpers", &["auth"]),
    // Transaction users' state that knows no SIP call: bindings, agent states, trunks
    // (their channels, health and registration).
    ("stores", &["registrar", "huntgroup", "trunk"]),
    // Transaction users: calls, presence. Each defines the hooks it runs as a port
    // (`b2bua::CallHooks`, `presence::PresenceHooks`) that the script engine implements.
    ("users", &["b2bua", "presence"]),
    // The hook engine: Lua VMs above the transaction users (registrar and hunt groups
    // below them too); it implements their ports and offers their Lua namespaces.
    ("script", &["script"]),
    // The UAS core: dispatches new requests to the users above.
    ("uas", &["uas"]),
    // The operator's control plane: calls the owning modules' APIs.
    ("admin", &["admin"]),
    // Loads the file and composes every layer's own section.
    ("config", &["config"]),
    // Wiring and the command line.
    ("server", &["server", "cli"]),
    // `strowger test`: starts servers like `run` does and talks SIP to them.
    ("testkit", &["testkit"]),
];

/// `crate::x` and `crate::{a, b}` references in `text`, as the before-stop hook finds them.
fn references(text: &str) -> BTreeSet<String> {
    let word = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name = word(rest);
        if !name.is_empty() {
            out.insert(name);
        } else if let Some(group) = rest.strip_prefix('{') {
            // Up to the first `}` (as the hook's `[^}]*` does); a name at the start or
            // after each comma.
            if let Some(end) = group.find('}') {
                for part in group[..end].split(',') {
                    let name = word(part.trim_start());
                    if !name.is_empty() {
                        out.insert(name);
                    }
                }
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Top-level module -> the top-level modules it imports (only modules that exist).
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut refs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for path in files {
        let rel = path.strip_prefix(src).expect("under src/");
        let first = rel
            .components()
            .next()
            .expect("a path under src/")
            .as_os_str()
            .to_string_lossy()
            .into_owned();
        let top = first.strip_suffix(".rs").unwrap_or(&first).to_owned();
        if top == "main" || top == "lib" {
            continue;
        }
        let text = String::from_utf8_lossy(&std::fs::read(&path).expect("readable")).into_owned();
        let entry = refs.entry(top.clone()).or_default();
        entry.extend(references(&text).into_iter().filter(|r| *r != top));
    }
    let modules: BTreeSet<String> = refs.keys().cloned().collect();
    refs.into_iter()
        .map(|(m, rs)| (m, rs.into_iter().filter(|r| modules.contains(r)).collect()))
        .collect()
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'g> {
        graph: &'g BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'g str, usize>,
        low: BTreeMap<&'g str, usize>,
        stack: Vec<&'g str>,
        on_stack: BTreeSet<&'g str>,
        out: Vec<Vec<String>>,
    }
    impl<'g> Walk<'g> {
        fn visit(&mut self, v: &'g str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in &self.graph[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut comp = Vec::new();
                loop {
                    let w = self.stack.pop().expect("v is on the stack");
                    self.on_stack.remove(w);
                    comp.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if comp.len() > 1 {
                    comp.sort();
                    self.out.push(comp);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.out
}

/// Imports that do not point to a strictly lower layer, and modules the table misses.
fn layering_faults(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let rank: BTreeMap<&str, (usize, &str)> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, (layer, mods))| mods.iter().map(move |m| (*m, (i, *layer))))
        .collect();
    let mut faults = Vec::new();
    for (m, imports) in graph {
        let Some(&(rm, lm)) = rank.get(m.as_str()) else {
            faults.push(format!("src/{m} is in no layer of tests/architecture.rs"));
            continue;
        };
        for i in imports {
            let Some(&(ri, li)) = rank.get(i.as_str()) else {
                continue; // reported as a module of its own
            };
            if ri >= rm {
                faults.push(format!(
                    "{m} (layer {lm}) imports {i} (layer {li}): only lower layers may be imported"
                ));
            }
        }
    }
    faults
}

fn src_graph() -> BTreeMap<String, BTreeSet<String>> {
    module_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
}

fn show(graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    graph
        .iter()
        .map(|(m, rs)| {
            format!(
                "  {m} -> {}",
                rs.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let graph = src_graph();
    assert!(graph.contains_key("transaction"), "read src/: {graph:?}");
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "top-level modules importing each other in a circle: {found:?}\nthe graph:\n{}",
        show(&graph)
    );
}

#[test]
fn every_import_points_to_a_lower_layer() {
    let graph = src_graph();
    let faults = layering_faults(&graph);
    assert!(
        faults.is_empty(),
        "{}\nthe graph:\n{}",
        faults.join("\n"),
        show(&graph)
    );
}

/// The checks themselves can fail: a made-up tree with a cycle and an upward import.
#[test]
fn the_checks_catch_a_cycle_and_an_upward_import() {
    assert_eq!(
        references("use crate::sip::Uri; // see crate::{b2bua, trace::Line}\ncrate::{\n x}"),
        ["b2bua", "sip", "trace", "x"]
            .into_iter()
            .map(String::from)
            .collect()
    );
    let dir = std::env::temp_dir().join(format!("strowger-arch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("transaction")).unwrap();
    std::fs::write(dir.join("sip.rs"), "use crate::transport::Target;").unwrap();
    std::fs::write(dir.join("transport.rs"), "/// [`crate::sip::Uri`]").unwrap();
    std::fs::write(
        dir.join("transaction/mod.rs"),
        "use crate::{sip, transport};\nfn f() { crate::metrics::X; }",
    )
    .unwrap();
    std::fs::write(dir.join("lib.rs"), "pub mod b2bua; crate::b2bua::x();").unwrap();
    let graph = module_graph(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        graph["transaction"],
        ["sip", "transport"].into_iter().map(String::from).collect(),
        "metrics is not a module of this tree; lib.rs is not a layer"
    );
    assert_eq!(
        cycles(&graph),
        vec![vec!["sip".to_owned(), "transport".to_owned()]]
    );
    assert_eq!(
        layering_faults(&graph),
        vec!["sip (layer sip) imports transport (layer transport): only lower layers may be imported"]
    );
}
