//! The runtime's modules layer one way: the event loop knows nothing of coroutines or tasks
//! (it resumes them through `aio::Resume`), coroutines know nothing of tasks, and so on up.
//! This test reads the sources and fails when a module names one of its own layer or above —
//! the `aio ↔ coroutine ↔ executor ↔ aio_wait` cycle the io_uring work removed. The async
//! engine (`executor/`, a directory module: every file in it counts as `executor`) sits on top
//! of the coroutine engine's modules whose async forms it adds, and nothing of the coroutine
//! engine names it.

use std::fs;
use std::path::{Path, PathBuf};

/// Each module and its layer; a module may only name modules of a lower layer.
const LAYERS: &[(&str, u32)] = &[
    ("fault", 0),
    ("sys", 0),
    ("bh", 0),
    ("timer", 0),
    ("affinity", 1),
    ("ring", 1),
    ("aio", 2),
    ("coroutine", 3),
    ("lock", 4),
    ("thread_pool", 4),
    ("iothread", 4),
    ("uring", 4),
    ("fd_wait", 4),
    ("aio_wait", 5),
    ("executor", 5),
];

fn layer(name: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// The modules a source file names as `crate::NAME` (in `use` lists or paths), comments
/// excluded.
fn named_modules(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in src.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let names: Vec<&str> = if let Some(list) = rest.strip_prefix('{') {
                let end = list.find('}').unwrap_or(list.len());
                list[..end]
                    .split(',')
                    .map(|s| s.trim().split("::").next().unwrap_or("").trim())
                    .collect()
            } else {
                vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or("")]
            };
            out.extend(names.into_iter().map(str::to_owned));
        }
    }
    out
}

/// The source files of a module: `src/NAME.rs`, or every file of the directory `src/NAME/`.
fn module_files(src: &Path, module: &str) -> Vec<PathBuf> {
    let file = src.join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let dir = src.join(module);
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} has no sources", dir.display());
    files
}

#[test]
fn modules_only_name_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut checked = 0;
    let mut violations = Vec::new();
    for (module, own) in LAYERS {
        for path in module_files(&src, module) {
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            checked += 1;
            for named in named_modules(&text) {
                if let Some(l) = layer(&named) {
                    if named != *module && l >= *own {
                        let file = path.strip_prefix(&src).unwrap_or(&path).display();
                        violations.push(format!("{file} (layer {own}) names {named} (layer {l})"));
                    }
                }
            }
        }
    }
    assert!(checked >= LAYERS.len());
    assert!(
        violations.is_empty(),
        "layering broken:\n{}",
        violations.join("\n")
    );
}

#[test]
fn every_module_has_a_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for entry in fs::read_dir(&src).expect("read src") {
        let entry = entry.expect("dir entry");
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let module = if entry.path().is_dir() {
            Some(&*name)
        } else {
            name.strip_suffix(".rs")
        };
        if let Some(module) = module {
            if module != "lib" {
                assert!(
                    layer(module).is_some(),
                    "runtime/src/{name} has no layer in tests/layering.rs"
                );
            }
        }
    }
}

#[test]
fn the_parser_sees_use_lists_and_paths() {
    let src = "use crate::aio::{self, AioContext};\nuse crate::{bh::Bh, timer};\n\
               let x = crate::executor::run(); // crate::lock in a comment\n";
    assert_eq!(named_modules(src), ["aio", "bh", "timer", "executor"]);
}
