//! A RabbitMQ broker of the test's own: Debian's `rabbitmq-server` (3.10) started as a
//! private node on free ports of 127.0.0.1, with its own Erlang port mapper (`epmd`, on a free
//! port too, so a test never touches another node's), its data in a temp dir, and every
//! process of it (the shell wrapper, `beam.smp`, `epmd`, the disk monitor) killed when the
//! [`Broker`] is dropped. Each process of a broker carries `STRANGLER_TEST_BROKER=PID:NODE`
//! in its environment: that is how they are all found again, also those of a test process
//! that died without dropping its broker (reaped by the next [`Broker::start`]).
//!
//! The tests that use it are `#[ignore]`d for a plain `cargo test`; [`available`] says
//! whether the package is installed, so they can say so instead of failing obscurely.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use amqprs::channel::{
    BasicConsumeArguments, BasicPublishArguments, Channel, ConsumerMessage,
    ExchangeDeclareArguments, ExchangeType, QueueBindArguments, QueueDeclareArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::BasicProperties;
use tokio::sync::mpsc::UnboundedReceiver;

use super::{listener, stopper, Running};

/// Where Debian's package puts the scripts (run directly: `/usr/sbin`'s wrappers switch to
/// the `rabbitmq` user).
pub const BIN: &str = "/usr/lib/rabbitmq/bin";

/// The environment variable that marks every process of a test broker.
const MARK: &str = "STRANGLER_TEST_BROKER";

/// How long a (re)start may take before the test fails with the log.
const START_WITHIN: Duration = Duration::from_secs(90);

/// Whether `rabbitmq-server` and `rabbitmqctl` are installed where [`BIN`] says.
pub fn available() -> bool {
    ["rabbitmq-server", "rabbitmqctl"]
        .iter()
        .all(|p| Path::new(BIN).join(p).is_file())
        && Path::new("/usr/bin/erl").exists()
}

/// Fails the test, saying what to install, when the broker is not [`available`].
pub fn need_broker() {
    assert!(
        available(),
        "this test needs Debian's rabbitmq-server (scripts in {BIN}) and Erlang (/usr/bin/erl): \
         apt-get install rabbitmq-server"
    );
}

/// users-service on 127.0.0.1:0 with its consumer of write events on `broker`; stops when
/// dropped.
pub async fn start_users_with_events(broker: &Broker) -> Running {
    let (l, addr) = listener().await;
    let (tx, stop) = stopper();
    let source = users_service::EventsSource::new(&broker.url()).unwrap();
    tokio::spawn(users_service::serve_with_events(
        l,
        None,
        Some(source),
        stop,
    ));
    Running {
        addr,
        stop: Some(tx),
    }
}

/// One message as a [`Consumer`] got it: routing key, body, `content-type` and
/// `delivery-mode` (2 = persistent).
pub type Delivery = (String, Vec<u8>, Option<String>, Option<u8>);

/// A private `rabbitmq-server` node (user `guest`, password `guest`, vhost `/`).
pub struct Broker {
    node: String,
    port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Broker {
    /// Starts a new node on free ports and waits until it accepts AMQP connections; panics
    /// with the end of its log when it does not within 90 s.
    pub async fn start() -> Broker {
        assert!(
            available(),
            "rabbitmq-server is not installed in {BIN} (Debian: apt-get install rabbitmq-server)"
        );
        reap_orphans();
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let [port, dist_port, epmd_port] = free_ports();
        let node = format!(
            "strangler-test-{}-{}@localhost",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let dir = tempfile::Builder::new()
            .prefix("strangler-rabbitmq-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("mnesia")).unwrap();
        fs::create_dir_all(d.join("log")).unwrap();
        fs::write(d.join("enabled_plugins"), "[].\n").unwrap();
        fs::write(d.join("rabbitmq-env.conf"), "").unwrap();
        fs::write(
            d.join("rabbitmq.conf"),
            format!("loopback_users = none\nlisteners.tcp.default = 127.0.0.1:{port}\n"),
        )
        .unwrap();
        let mut broker = Broker {
            node,
            port,
            dist_port,
            epmd_port,
            dir,
            child: None,
        };
        broker.launch().await;
        broker
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The AMQP port (the same after [`Broker::start_again`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name, `strangler-test-PID-N@localhost`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The node's data and log directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the node is running (started and not stopped).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// Stops the node (`rabbitmqctl stop`, then killing whatever is left after 30 s) and
    /// waits until its port refuses connections. Its data directory stays: durable
    /// exchanges, queues and persistent messages are there again after
    /// [`Broker::start_again`].
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let ctl = self.ctl_async(&["stop"]);
        let _ = tokio::time::timeout(Duration::from_secs(30), ctl).await;
        let until = Instant::now() + Duration::from_secs(30);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        kill_marked(&self.mark());
        let until = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < until,
                "port {} still accepts after stop",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the stopped node again: same name, same port, same data.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again: the broker is running");
        self.launch().await;
    }

    /// Raises a memory alarm (`set_vm_memory_high_watermark 0`): the broker stops reading
    /// from connections that publish. Note: it sends `connection.blocked` only to clients
    /// that announce the `connection.blocked` capability, which amqprs 2.1 does not; an
    /// amqprs publisher sees its publishes (and their confirms or `tx.commit-ok`) stall.
    pub async fn block(&self) {
        self.ctl_ok(&["set_vm_memory_high_watermark", "0"]).await;
    }

    /// Clears the alarm [`Broker::block`] raised (`set_vm_memory_high_watermark 0.4`).
    pub async fn unblock(&self) {
        self.ctl_ok(&["set_vm_memory_high_watermark", "0.4"]).await;
    }

    /// Runs `rabbitmqctl -n NODE ARGS...` and returns its stdout; panics on failure.
    pub async fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl_async(args).await;
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new AMQP connection to the node.
    pub async fn connect(&self) -> Connection {
        Connection::open(&self.open_args())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", self.url()))
    }

    /// Declares `exchange` as the proxy does (durable topic, not auto-deleted) and binds an
    /// exclusive server-named queue to it with `pattern`; the [`Consumer`] reads that queue
    /// (messages acknowledged on delivery). Bound when this returns: later publishes reach it.
    pub async fn bind(&self, exchange: &str, pattern: &str) -> Consumer {
        let conn = self.connect().await;
        let channel = conn.open_channel(None).await.unwrap();
        declare_exchange(&channel, exchange).await;
        let (queue, _, _) = channel
            .queue_declare(QueueDeclareArguments::exclusive_server_named())
            .await
            .unwrap()
            .unwrap();
        channel
            .queue_bind(QueueBindArguments::new(&queue, exchange, pattern))
            .await
            .unwrap();
        let (_, rx) = channel
            .basic_consume_rx(
                BasicConsumeArguments::new(&queue, "")
                    .manual_ack(false)
                    .finish(),
            )
            .await
            .unwrap();
        Consumer {
            queue,
            rx,
            _channel: channel,
            _conn: conn,
        }
    }

    /// Publishes `body` to `exchange` (declared as in [`Broker::bind`]) with `routing_key`,
    /// persistent, with `content_type`, in a transaction: the broker has routed it when this
    /// returns.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        content_type: &str,
        body: &[u8],
    ) {
        let conn = self.connect().await;
        let channel = conn.open_channel(None).await.unwrap();
        declare_exchange(&channel, exchange).await;
        channel.tx_select().await.unwrap();
        channel
            .basic_publish(
                BasicProperties::default()
                    .with_content_type(content_type)
                    .with_persistence(true)
                    .finish(),
                body.to_vec(),
                BasicPublishArguments::new(exchange, routing_key),
            )
            .await
            .unwrap();
        channel.tx_commit().await.unwrap();
        let _ = channel.close().await;
        let _ = conn.close().await;
    }

    /// `(messages ready, consumers)` of `queue`, or `None` when it does not exist.
    pub async fn queue_counts(&self, queue: &str) -> Option<(u32, u32)> {
        let conn = self.connect().await;
        let channel = conn.open_channel(None).await.unwrap();
        let got = channel
            .queue_declare(QueueDeclareArguments::new(queue).passive(true).finish())
            .await;
        let _ = conn.close().await;
        got.ok()
            .flatten()
            .map(|(_, messages, consumers)| (messages, consumers))
    }

    fn open_args(&self) -> OpenConnectionArguments {
        OpenConnectionArguments::new("127.0.0.1", self.port, "guest", "guest")
    }

    fn mark(&self) -> String {
        format!("{}:{}", std::process::id(), self.node)
    }

    /// A command with the node's environment.
    fn command(&self, program: &str) -> Command {
        let d = self.dir.path();
        let mut c = Command::new(Path::new(BIN).join(program));
        c.env(MARK, self.mark())
            .env("HOME", d)
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .stdin(Stdio::null());
        c
    }

    async fn ctl_async(&self, args: &[&str]) -> std::process::Output {
        let mut c = tokio::process::Command::from(self.command("rabbitmqctl"));
        c.arg("-n").arg(&self.node).args(args).kill_on_drop(true);
        c.output().await.expect("rabbitmqctl")
    }

    /// Starts the server process and waits until an AMQP connection opens.
    async fn launch(&mut self) {
        let out = self.dir.path().join("server.out");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&out)
            .unwrap();
        let child = self
            .command("rabbitmq-server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{BIN}/rabbitmq-server: {e}"));
        self.child = Some(child);
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "rabbitmq-server {} exited ({status}) before accepting connections\n{}",
                    self.node,
                    self.log_tail()
                );
            }
            let opened =
                tokio::time::timeout(Duration::from_secs(2), Connection::open(&self.open_args()))
                    .await;
            if let Ok(Ok(conn)) = opened {
                let _ = conn.close().await;
                return;
            }
            if started.elapsed() > START_WITHIN {
                let tail = self.log_tail();
                self.kill();
                panic!(
                    "rabbitmq-server {} accepted no AMQP connection on 127.0.0.1:{} within {START_WITHIN:?}\n{tail}",
                    self.node, self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the server's output and logs.
    pub fn log_tail(&self) -> String {
        let mut files: Vec<PathBuf> = vec![self.dir.path().join("server.out")];
        if let Ok(entries) = fs::read_dir(self.dir.path().join("log")) {
            files.extend(entries.flatten().map(|e| e.path()));
        }
        let mut out = String::new();
        for f in files {
            let text = fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(40);
            out.push_str(&format!(
                "--- {} (last {} lines)\n",
                f.display(),
                lines.len() - from
            ));
            for l in &lines[from..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Kills every process of the node at once (no graceful stop).
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_marked(&self.mark());
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Graceful first, bounded: `rabbitmqctl stop`, then whatever is left is killed.
            if let Ok(mut ctl) = self
                .command("rabbitmqctl")
                .arg("-n")
                .arg(&self.node)
                .arg("stop")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                let until = Instant::now() + Duration::from_secs(20);
                while ctl.try_wait().ok().flatten().is_none() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                let _ = ctl.kill();
                let _ = ctl.wait();
                let until = Instant::now() + Duration::from_secs(10);
                while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            self.child = Some(child);
        }
        // Also takes epmd, which is still there after a graceful stop.
        self.kill();
    }
}

/// A consumer of an exclusive queue bound by [`Broker::bind`].
pub struct Consumer {
    pub queue: String,
    rx: UnboundedReceiver<ConsumerMessage>,
    _channel: Channel,
    _conn: Connection,
}

impl Consumer {
    /// The next message, or `None` when none arrives within `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<Delivery> {
        let msg = tokio::time::timeout(timeout, self.rx.recv())
            .await
            .ok()
            .flatten()?;
        let deliver = msg.deliver.expect("deliver");
        let props = msg.basic_properties.unwrap_or_default();
        Some((
            deliver.routing_key().clone(),
            msg.content.unwrap_or_default(),
            props.content_type().cloned(),
            props.delivery_mode(),
        ))
    }

    /// Every message until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Delivery> {
        let mut all = Vec::new();
        while let Some(d) = self.next(quiet).await {
            all.push(d);
        }
        all
    }
}

async fn declare_exchange(channel: &Channel, exchange: &str) {
    channel
        .exchange_declare(
            ExchangeDeclareArguments::of_type(exchange, ExchangeType::Topic)
                .durable(true)
                .auto_delete(false)
                .finish(),
        )
        .await
        .unwrap_or_else(|e| panic!("declare exchange {exchange}: {e}"));
}

/// Three distinct free ports of 127.0.0.1 (AMQP, Erlang distribution, epmd).
fn free_ports() -> [u16; 3] {
    let ls: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let p = |i: usize| ls[i].local_addr().unwrap().port();
    [p(0), p(1), p(2)]
}

/// The pids whose environment holds `MARK=<value>` where `value` satisfies `keep`.
fn marked_pids(keep: impl Fn(&str) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let prefix = format!("{MARK}=");
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|&b| b == 0).any(|var| {
                std::str::from_utf8(var)
                    .ok()
                    .and_then(|v| v.strip_prefix(&prefix))
                    .is_some_and(&keep)
            })
        })
        .collect()
}

/// SIGKILLs every process marked with `mark` and waits (up to 10 s) until none is left.
fn kill_marked(mark: &str) {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = marked_pids(|v| v == mark);
        if pids.is_empty() || Instant::now() > until {
            return;
        }
        let _ = Command::new("kill")
            .arg("-KILL")
            .args(pids.iter().map(|p| p.to_string()))
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Kills the brokers of test processes that are gone (killed before they could drop them).
fn reap_orphans() {
    let orphan = |v: &str| {
        v.split_once(':')
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for pid in marked_pids(orphan) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
}
