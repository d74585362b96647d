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

#[test]
fn a_bad_events_url_is_refused_without_showing_its_password() {
    let out = Command::new(env!("CARGO_BIN_EXE_users-service"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--events-url-env",
            "USERS_EVENTS_URL",
        ])
        .env("USERS_EVENTS_URL", "amqp://u:hunter2@rabbit:notaport/%2f")
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("$USERS_EVENTS_URL"), "{stderr}");
    assert!(stderr.contains("port"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn events_flags_need_their_values() {
    for args in [
        &["--events-url-env"][..],
        &["--events-queue"],
        &["--events-exchange"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_users-service"))
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
