//! The layering rules, checked on the source so that CI holds them:
//!
//! - no import circle between the top-level modules of either crate;
//! - no openraft outside `src/quorate/src/raft/`;
//! - the client, the agent, the wire module and the observation loop import
//!   no server-side module, and the server side imports no agent module;
//! - the decision core depends on no I/O crate.
//!
//! Run alone: `cargo test -p quorate --test layering`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// The code of a file without comments, and without its trailing test
/// module (test-only imports do not count as layering).
fn code_of(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]") {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            // A `//` inside a string ("http://") is kept: good enough here.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// The top-level module a file of `src` belongs to (`lib.rs` and `main.rs`
/// belong to the crate root, named "").
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => String::new(),
        Some(m) => m.to_owned(),
        None => first,
    }
}

/// Top-level module → the top-level modules it names through `crate::`.
fn graph(src: &Path, known: &BTreeSet<String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(src) {
        let from = module_of(src, &file);
        // The crate root, and test modules kept in their own file
        // (`#[cfg(test)] mod tests;`), do not count.
        if from.is_empty() || file.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let mut code = code_of(&file);
        // In a top-level file `super::` is the crate root.
        if file.parent() == Some(src) {
            code = code.replace("super::", "crate::");
        }
        let entry = g.entry(from.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let rest = &code[i + "crate::".len()..];
            let names: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::x, b}`: every name at the top of the group.
                let end = group.find('}').unwrap_or(group.len());
                group[..end].split(',').map(|s| s.trim().split("::").next().unwrap_or("").to_owned()).collect()
            } else {
                vec![rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect()]
            };
            for to in names {
                if to != from && known.contains(&to) {
                    entry.insert(to);
                }
            }
        }
    }
    g
}

fn top_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';').trim().to_owned())
        .filter(|m| !m.contains('{') && !m.contains(' '))
        .collect()
}

/// A cycle of `g`, if it has one.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| p == n).unwrap();
                let mut cycle = path[at..].to_vec();
                cycle.push(n.to_owned());
                return Some(cycle);
            }
            _ => {}
        }
        state.insert(n.to_owned(), 1);
        path.push(n.to_owned());
        for m in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(n.to_owned(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, g, &mut state, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(name).join("src")
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let g: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_owned(), BTreeSet::from(["b".to_owned()])),
        ("b".to_owned(), BTreeSet::from(["c".to_owned()])),
        ("c".to_owned(), BTreeSet::from(["a".to_owned()])),
    ]
    .into();
    assert_eq!(find_cycle(&g), Some(vec!["a".into(), "b".into(), "c".into(), "a".into()]));
    let mut acyclic = g.clone();
    acyclic.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&acyclic), None);
}

#[test]
fn no_import_circle_between_the_modules_of_quorate() {
    let src = crate_src("quorate");
    let g = graph(&src, &top_modules(&src));
    assert!(g.contains_key("server") && g["server"].contains("raft"), "the scan sees imports: {g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!("import circle: {}\nmodule graph: {g:#?}", c.join(" -> "));
    }
}

#[test]
fn no_import_circle_between_the_modules_of_the_core() {
    let src = crate_src("core");
    let g = graph(&src, &top_modules(&src));
    assert!(g.get("machine").is_some_and(|m| m.contains("lease")), "the scan sees imports: {g:?}");
    if let Some(c) = find_cycle(&g) {
        panic!("import circle in quorate-core: {}\nmodule graph: {g:#?}", c.join(" -> "));
    }
}

#[test]
fn openraft_is_used_only_under_raft() {
    let src = crate_src("quorate");
    let mut found = Vec::new();
    for file in sources(&src) {
        if module_of(&src, &file) == "raft" {
            continue;
        }
        if code_of(&file).contains("openraft") {
            found.push(file.display().to_string());
        }
    }
    assert!(found.is_empty(), "openraft used outside raft/: {found:?}");
}

#[test]
fn client_and_agent_import_no_server_side_module() {
    let src = crate_src("quorate");
    let g = graph(&src, &top_modules(&src));
    let server_side: BTreeSet<&str> = ["server", "api", "raft", "service", "cli", "local", "bench"].into();
    for side in ["client", "agent", "wire", "observation"] {
        let bad: Vec<&String> =
            g.get(side).into_iter().flatten().filter(|m| server_side.contains(m.as_str())).collect();
        assert!(bad.is_empty(), "{side} imports {bad:?}");
    }
}

#[test]
fn the_server_side_imports_no_agent_module() {
    // What agents and coordinators share (the observation loop, stores)
    // lives in `observation`, not in `agent`.
    let src = crate_src("quorate");
    let g = graph(&src, &top_modules(&src));
    for side in ["server", "api", "raft", "service"] {
        assert!(!g.get(side).is_some_and(|m| m.contains("agent")), "{side} imports agent: {:?}", g.get(side));
    }
}

#[test]
fn the_core_depends_on_no_io_crate() {
    let manifest = std::fs::read_to_string(crate_src("core").join("../Cargo.toml")).unwrap();
    let deps: Vec<&str> = manifest
        .split("\n[")
        .filter(|section| section.starts_with("dependencies]"))
        .flat_map(|section| section.lines().skip(1))
        .filter_map(|l| l.split(['=', '.']).next().map(str::trim))
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    assert!(deps.contains(&"serde"), "the manifest scan sees dependencies: {deps:?}");
    for io in ["tokio", "tonic", "redis", "openraft", "redb", "prost", "hyper", "mio", "socket2"] {
        assert!(!deps.contains(&io), "quorate-core depends on {io}: {deps:?}");
    }
}
