//! The modules of `src/` depend one way. Every non-test source file is read, each reference to
//! `crate::MODULE` is an edge from the file's top-level module to MODULE, and the graph must
//! have no cycle. A failure names the cycle and the file and line of each edge in it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `from -> to -> where (file:line)`.
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs")
            && path.file_name().is_some_and(|n| n != "tests.rs")
        {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/upstream/body.rs` -> `upstream`).
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The source before its `#[cfg(test)]` module, if any: tests may reach anywhere.
fn non_test(text: &str) -> &str {
    match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    }
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    sources(&src, &mut files);
    let mut g = Graph::new();
    for file in files {
        let from = module_of(&src, &file);
        if from == "lib" || from == "main" {
            continue; // the roots: they may use everything
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = without_comments(non_test(&text));
        for (offset, to) in references(&code) {
            if to != from {
                let line = code[..offset].matches('\n').count() + 1;
                let at = format!("{}:{line}", file.strip_prefix(&src).unwrap().display());
                g.entry(from.clone()).or_default().entry(to).or_insert(at);
            }
        }
    }
    g
}

/// The text with `//` comments blanked (offsets and line numbers kept).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => format!("{}{}", &l[..i], " ".repeat(l.len() - i)),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::MODULE` the code names, with its offset; `crate::{a::x, b}` names both.
fn references(code: &str) -> Vec<(usize, String)> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = vec![];
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level items of the group: split on commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push((i, ident(&group[start..j])));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push((i, ident(&group[start..j])));
                        start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push((i, ident(rest)));
        }
    }
    out.retain(|(_, m)| !m.is_empty() && m != "self");
    out
}

/// A cycle through `start`, as the list of modules, if there is one.
fn cycle(g: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        g: &Graph,
        node: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in g.get(node).into_iter().flat_map(|m| m.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(g, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    walk(g, start, start, &mut path, &mut BTreeSet::new()).then_some(path)
}

#[test]
fn modules_depend_one_way() {
    let g = graph();
    assert!(g.len() > 10, "the source tree was not read: {g:?}");
    let mut cycles = vec![];
    for module in g.keys() {
        if let Some(c) = cycle(&g, module) {
            let edges: Vec<String> = c
                .iter()
                .zip(c.iter().skip(1).chain(std::iter::once(&c[0])))
                .map(|(a, b)| format!("{a} -> {b} ({})", g[a][b]))
                .collect();
            cycles.push(edges.join(", "));
        }
    }
    assert!(cycles.is_empty(), "module cycles:\n{}", cycles.join("\n"));
}

#[test]
fn grouped_and_nested_references_are_read() {
    let code = "use crate::{config::X, routes::{a, b},\n    upstream};\nfn f() { crate::metrics::m(); } // crate::admin";
    let found: Vec<String> = references(&without_comments(code))
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    assert_eq!(found, ["config", "routes", "upstream", "metrics"]);
}

#[test]
fn the_check_sees_a_cycle() {
    let mut g = Graph::new();
    g.entry("a".into())
        .or_default()
        .insert("b".into(), "a.rs:1".into());
    g.entry("b".into())
        .or_default()
        .insert("a".into(), "b.rs:1".into());
    assert_eq!(cycle(&g, "a"), Some(vec!["a".into(), "b".into()]));
    g.get_mut("b").unwrap().clear();
    assert_eq!(cycle(&g, "a"), None);
}

/// The README's map of the code names every source file once, and only those.
#[test]
fn the_readme_maps_every_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let section = readme
        .split("## Map of the code")
        .nth(1)
        .expect("README has a map of the code")
        .split("\n## ")
        .next()
        .unwrap();
    let mapped: BTreeSet<String> = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `src/"))
        .filter_map(|l| l.split('`').next())
        .map(|f| format!("src/{f}"))
        .collect();
    let mut files = vec![];
    sources(&root.join("src"), &mut files);
    let tree: BTreeSet<String> = files
        .iter()
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    let missing: Vec<_> = tree.difference(&mapped).collect();
    let stale: Vec<_> = mapped.difference(&tree).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "not in the README's map: {missing:?}; mapped but not in src/: {stale:?}"
    );
}
