//! The library's files import one another one way: no file of `src/` imports, directly or through
//! others, a file that imports it (a circle), and the fused CPU executor reads the reference, never the
//! reverse. Read from the source text: each `use` tree and each path that starts with `crate::`,
//! `super::` or `self::` (or names a child module of the file) is resolved to the file of the module it
//! reaches; comments and `#[cfg(test)] mod tests` are left out. The binary's files (`main.rs`,
//! `commands/`) are left out too: nothing imports them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A module path: `["cpu", "fused", "fma"]` for src/cpu/fused/fma.rs, `[]` for lib.rs.
type Module = Vec<String>;

/// Every library module and its file.
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    let mut found = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).unwrap().with_extension("");
            let mut module: Module = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
            if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
                module.pop();
            }
            if !matches!(module.first().map(String::as_str), Some("main" | "commands")) {
                found.insert(module, path);
            }
        }
    }
    found
}

/// The text without comments and without the unit tests at its end.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// A `use` tree (`super::{a::B, c}`) as the paths it names.
fn expand(tree: &str) -> Vec<String> {
    let tree: String = tree.chars().filter(|c| !c.is_whitespace()).collect();
    let Some(open) = tree.find('{') else { return vec![tree.split("as").next().unwrap_or("").to_string()] };
    let close = tree.rfind('}').filter(|&c| c > open).unwrap_or(tree.len());
    let (prefix, inner) = (&tree[..open], &tree[open + 1..close]);
    let (mut parts, mut depth, mut part) = (Vec::new(), 0, String::new());
    for ch in inner.chars() {
        match ch {
            ',' if depth == 0 => parts.push(std::mem::take(&mut part)),
            '{' | '}' => {
                depth += if ch == '{' { 1 } else { -1 };
                part.push(ch);
            }
            _ => part.push(ch),
        }
    }
    parts.push(part);
    parts.iter().filter(|p| !p.is_empty()).flat_map(|p| expand(p)).map(|p| format!("{prefix}{p}")).collect()
}

/// The paths a file's code names: its `use` trees, and `crate::`, `super::` or `self::` paths.
fn paths(code: &str) -> Vec<String> {
    let mut found = Vec::new();
    // `use` statements start a line (after `pub`, `pub(crate)`...) and end at their semicolon.
    let starts = std::iter::once(0).chain(code.match_indices('\n').map(|(at, _)| at + 1));
    for at in starts {
        let line = code[at..].trim_start();
        let line = line.strip_prefix("pub").map_or(line, |l| l.trim_start_matches(|c| c != ' ').trim_start());
        if let Some(tree) = line.strip_prefix("use ") {
            found.extend(expand(&tree[..tree.find(';').unwrap_or(tree.len())]));
        }
    }
    let words: Vec<&str> = code.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).collect();
    found.extend(
        words
            .iter()
            .filter(|w| ["crate::", "super::", "self::"].iter().any(|p| w.starts_with(p)))
            .map(|w| w.to_string()),
    );
    // A child module named bare in its parent (`conv::checks(..)`): as `self::conv`.
    for word in words.iter().filter(|w| w.contains("::")) {
        let first = word.split("::").next().unwrap_or("");
        if !first.is_empty() && !["crate", "super", "self"].contains(&first) {
            found.push(format!("self::{first}"));
        }
    }
    found
}

/// The modules whose files `module`'s file imports.
fn imports(module: &Module, code: &str, all: &BTreeMap<Module, PathBuf>) -> BTreeSet<Module> {
    let mut targets = BTreeSet::new();
    for path in paths(code) {
        let segments: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let (mut base, mut rest) = match segments.first() {
            Some(&"crate") => (Vec::new(), &segments[1..]),
            Some(&"super" | &"self") => (module.clone(), &segments[..]),
            _ => continue,
        };
        while let Some(&first) = rest.first().filter(|s| **s == "super" || **s == "self") {
            if first == "super" {
                base.pop();
            }
            rest = &rest[1..];
        }
        let full: Module =
            base.into_iter().chain(rest.iter().filter(|s| **s != "self").map(|s| s.to_string())).collect();
        // The file of the longest module the path reaches.
        let reached = (0..=full.len()).rev().map(|k| full[..k].to_vec()).find(|m| all.contains_key(m));
        if let Some(m) = reached.filter(|m| m != module && !m.is_empty()) {
            targets.insert(m);
        }
    }
    targets
}

fn graph() -> BTreeMap<Module, BTreeSet<Module>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let all = modules(&src);
    all.iter().map(|(m, path)| (m.clone(), imports(m, &code(&std::fs::read_to_string(path).unwrap()), &all))).collect()
}

fn name(m: &Module) -> String {
    if m.is_empty() {
        "lib".into()
    } else {
        m.join("/")
    }
}

/// A circle through `start`, if any: the modules in order, back to `start`.
fn circle(g: &BTreeMap<Module, BTreeSet<Module>>, start: &Module) -> Option<Vec<Module>> {
    let mut stack = vec![(start.clone(), vec![start.clone()])];
    let mut seen = BTreeSet::new();
    while let Some((at, path)) = stack.pop() {
        for next in g.get(&at).into_iter().flatten() {
            if next == start {
                return Some([path.clone(), vec![start.clone()]].concat());
            }
            if seen.insert(next.clone()) {
                stack.push((next.clone(), [path.clone(), vec![next.clone()]].concat()));
            }
        }
    }
    None
}

#[test]
fn no_file_of_the_library_imports_a_file_that_imports_it() {
    let g = graph();
    assert!(g.len() > 40, "read only {} files of src/", g.len());
    let circles: Vec<String> =
        g.keys().filter_map(|m| circle(&g, m)).map(|c| c.iter().map(name).collect::<Vec<_>>().join(" -> ")).collect();
    assert!(circles.is_empty(), "import circles:\n{}", circles.join("\n"));
}

#[test]
fn the_fused_executor_reads_the_reference_and_never_the_reverse() {
    let g = graph();
    let under = |m: &Module, dir: &[&str]| m.len() >= dir.len() && m[..dir.len()] == *dir;
    let fused_uses_reference =
        g.iter().any(|(m, to)| under(m, &["cpu", "fused"]) && to.iter().any(|t| under(t, &["cpu", "reference"])));
    assert!(fused_uses_reference, "the reader found no import of cpu/reference from cpu/fused: it reads nothing");
    let wrong: Vec<String> = g
        .iter()
        .filter(|(m, _)| under(m, &["cpu", "reference"]))
        .flat_map(|(m, to)| {
            to.iter().filter(|t| under(t, &["cpu", "fused"])).map(move |t| format!("{} imports {}", name(m), name(t)))
        })
        .collect();
    assert!(wrong.is_empty(), "the reference must not depend on the fast executor: {wrong:?}");
}

#[test]
fn the_reader_finds_a_circle_where_there_is_one() {
    let module = |s: &str| s.split('/').map(String::from).collect::<Module>();
    let all: BTreeMap<Module, PathBuf> = ["a", "a/b", "a/c"].iter().map(|m| (module(m), PathBuf::new())).collect();
    let b = imports(&module("a/b"), "use super::c::{self, Thing};\nfn f() { crate::a::c::g() }", &all);
    let c = imports(&module("a/c"), "use super::{b::X, Y};", &all);
    let a = imports(&module("a"), &code("pub mod b;\nfn f() { b::g() } // c::h() in a comment"), &all);
    assert_eq!(b, BTreeSet::from([module("a/c")]));
    assert_eq!(c, BTreeSet::from([module("a/b"), module("a")]));
    assert_eq!(a, BTreeSet::from([module("a/b")]));
    let g = BTreeMap::from([(module("a"), a), (module("a/b"), b), (module("a/c"), c)]);
    assert_eq!(circle(&g, &module("a/b")).map(|c| c.len()), Some(3));
    assert!(circle(&g, &module("a")).is_some());
}
