//! The proxy's logs, captured in a test binary: one process-wide JSON subscriber writing into
//! memory. tracing caches callsite interest per process, so a binary whose tests read the log
//! installs it first in every test (`LazyLock::force`), and each test reads its own paths.

use std::sync::{Arc, Mutex};

use serde_json::Value;

/// What the subscriber wrote, one JSON object a line.
#[derive(Clone, Default)]
pub struct Sink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    /// Installs the process's subscriber, JSON lines filtered by `filter` (`RUST_LOG` syntax),
    /// writing into the returned sink. Once per process: keep it in a `LazyLock`.
    pub fn install(filter: &str) -> Sink {
        let sink = Sink::default();
        let writer = sink.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .init();
        sink
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    /// The access events of requests whose path starts with `prefix`, in the order written.
    pub fn access_events_under(&self, prefix: &str) -> Vec<Value> {
        self.access(|path| path.starts_with(prefix))
    }

    /// The access events of requests to exactly `path`, in the order written.
    pub fn access_events(&self, path: &str) -> Vec<Value> {
        self.access(|p| p == path)
    }

    fn access(&self, path: impl Fn(&str) -> bool) -> Vec<Value> {
        self.text()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| {
                v["target"] == "strangler::access"
                    && v["fields"]["path"].as_str().is_some_and(&path)
            })
            .collect()
    }
}
