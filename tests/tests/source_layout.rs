//! The source layout rules of docs/ARCHITECTURE.md, checked on every test run:
//!
//! - the server's concept folders (and top-level modules) import one way: no cycle
//!   between them, whatever path a `use` takes;
//! - the agent's modules have no import cycle at all;
//! - SQL lives only in the server's `store/` (and in the agent's own store files).
//!
//! A reference is any `crate::NAME` or `super::NAME` path in the code (comments
//! stripped), resolved to the top-level module it lands in.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("source directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file without comments (line and doc comments; good enough for `use`
/// paths and SQL keywords, which never sit inside block comments here).
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).expect("readable source");
    text.lines()
        .map(|line| match line.find("//") {
            // `//` inside a string (a URL) keeps the line: only strip when the line is a
            // comment or the slashes follow code with no quote before them.
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module path of a file, relative to `src/`: `store/jobs.rs` -> ["store", "jobs"].
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).expect("file under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts
        .last()
        .is_some_and(|p| p == "mod" || p == "lib" || p == "main")
    {
        parts.pop();
    }
    parts
}

/// Every top-level module a file refers to through `crate::` or `super::` paths,
/// including the items of `use crate::{a, b::c}` groups.
fn references(module: &[String], code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    for (prefix, is_super) in [("crate::", false), ("super::", true)] {
        let mut from = 0;
        while let Some(at) = code[from..].find(prefix) {
            let start = from + at;
            from = start + prefix.len();
            // `herald_crate::` or `xsuper::` are other names.
            if start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_') {
                continue;
            }
            let base: Vec<String> = if is_super {
                // `super::` from a file `a/b.rs` (module a::b) is `a`; chains climb further.
                let mut base = module.to_vec();
                base.pop();
                let mut rest = &code[from..];
                while let Some(r) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = r;
                    from += "super::".len();
                }
                base
            } else {
                Vec::new()
            };
            let rest = &code[from..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = matching_brace(group);
                for item in split_top(&group[..end]) {
                    if let Some(name) = first_segment(item.trim()) {
                        push(&mut out, &base, name);
                    }
                }
            } else if let Some(name) = first_segment(rest) {
                push(&mut out, &base, name);
            }
        }
    }
    out
}

fn push(out: &mut BTreeSet<String>, base: &[String], name: &str) {
    if name == "self" || name.is_empty() {
        if let Some(top) = base.first() {
            out.insert(top.clone());
        }
        return;
    }
    match base.first() {
        Some(top) => out.insert(top.clone()),
        None => out.insert(name.to_string()),
    };
}

fn first_segment(text: &str) -> Option<&str> {
    let end = text
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    (end > 0).then(|| &text[..end])
}

fn matching_brace(text: &str) -> usize {
    let mut depth = 0;
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return i,
            '}' => depth -= 1,
            _ => {}
        }
    }
    text.len()
}

fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in text.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Edges between top-level modules (a file's own top-level module excluded).
fn graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let tops: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_of(src, f).first().cloned())
        .collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let module = module_of(src, file);
        let Some(top) = module.first().cloned() else {
            continue; // lib.rs / main.rs declare the modules
        };
        let targets = edges.entry(top.clone()).or_default();
        for name in references(&module, &code(file)) {
            if name != top && tops.contains(&name) {
                targets.insert(name);
            }
        }
    }
    edges
}

/// A cycle in the graph, if any, as the list of modules around it.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|n| n == next).expect("on the stack");
                    let mut found = stack[at..].to_vec();
                    found.push(next.clone());
                    return Some(found);
                }
                0 => {
                    if let Some(found) = visit(next, edges, state, stack) {
                        return Some(found);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(found) = visit(node, edges, &mut state, &mut stack) {
                return Some(found);
            }
        }
    }
    None
}

fn describe(edges: &BTreeMap<String, BTreeSet<String>>) -> String {
    edges
        .iter()
        .map(|(from, to)| {
            format!(
                "  {from} -> {}",
                to.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Fails, printing the graph, if the top-level modules under `dir` import in a cycle.
fn assert_no_cycle(dir: &str) {
    let edges = graph(&workspace().join(dir));
    println!("{dir} modules:\n{}", describe(&edges));
    if let Some(found) = cycle(&edges) {
        panic!(
            "import cycle in {dir}: {}\nedges:\n{}",
            found.join(" -> "),
            describe(&edges)
        );
    }
}

#[test]
fn the_server_s_folders_import_one_way() {
    assert_no_cycle("server/src");
}

#[test]
fn the_agent_s_modules_have_no_import_cycle() {
    assert_no_cycle("agent/src");
}

#[test]
fn sql_lives_only_in_the_server_s_store() {
    let src = workspace().join("server/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let statements = [
        "SELECT ",
        "INSERT INTO",
        "DELETE FROM",
        "CREATE TABLE",
        "CREATE INDEX",
        "ALTER TABLE",
        "PRAGMA ",
    ];
    let mut offenders = Vec::new();
    for file in files {
        if module_of(&src, &file).first().is_some_and(|m| m == "store") {
            continue;
        }
        let text = code(&file);
        for (n, line) in text.lines().enumerate() {
            let upper = line.to_uppercase();
            let sql = statements.iter().any(|s| line.contains(s))
                || (line.contains("UPDATE ") && upper.contains(" SET "));
            if sql && line.contains('"') {
                offenders.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "SQL outside server/src/store/:\n{}",
        offenders.join("\n")
    );
}

#[test]
fn the_checker_sees_groups_and_super_paths() {
    let module = vec!["forward".to_string(), "send".to_string()];
    let found = references(
        &module,
        "use crate::{config::{A, B}, relay};\nuse super::queue::X;\nlet x = crate::now_ms();",
    );
    let want: BTreeSet<String> = ["config", "relay", "forward", "now_ms"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(found, want);
    let mut edges = BTreeMap::new();
    edges.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
    edges.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
    assert_eq!(
        cycle(&edges),
        Some(vec!["a".into(), "b".into(), "a".into()])
    );
}
