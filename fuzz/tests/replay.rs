//! Every seed in `corpus/` and every input AFL++ once crashed on (`regressions/`), replayed
//! through the same checks on each `cargo test`: a crash, once found and fixed, stays fixed.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        files.sort();
        for file in files {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            eprintln!("{target}: {}", file.display());
            check(&data);
            n += 1;
        }
    }
    n
}

#[test]
fn config_inputs() {
    assert!(replay("config", strangler_fuzz::config) > 0, "no seeds");
}

#[test]
fn compare_inputs() {
    assert!(replay("compare", strangler_fuzz::compare) > 0, "no seeds");
}

#[test]
fn headers_inputs() {
    assert!(replay("headers", strangler_fuzz::headers) > 0, "no seeds");
}

#[test]
fn proxy_inputs() {
    assert!(replay("proxy", strangler_fuzz::proxy) > 0, "no seeds");
}
