//! The command line of `legacy-stub`: bad flags are usage errors, not a running server.

use std::process::Command;

#[test]
fn bad_flags_are_refused() {
    for args in [
        &["--error-rate", "2"][..],
        &["--error-rate", "lots"],
        &["--latency", "soon"],
        &["--listen", "nowhere"],
        &["--colour"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_legacy-stub"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stderr.is_empty(), "{args:?} says why");
    }
}
