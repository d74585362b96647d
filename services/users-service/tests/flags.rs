//! The command line of `users-service`: bad flags are usage errors.

use std::process::Command;

#[test]
fn bad_flags_are_refused() {
    for args in [
        &["--bug", "nope"][..],
        &["--listen", "127.0.0.1"],
        &["--colour"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_users-service"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
