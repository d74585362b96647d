//! The publisher task: one AMQP connection and channel in confirm mode, reconnected with
//! backoff. Events wait in the buffer while the broker is away; the request path never waits
//! on anything here.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicPublishArguments, Channel, ConfirmSelectArguments, ExchangeDeclareArguments,
};
use amqprs::connection::Connection;
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};

/// What amqprs callbacks return.
type AmqpResult<T> = std::result::Result<T, amqprs::error::Error>;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Event, Events, Kind, Link, Outcome};

/// Unconfirmed events at most on the wire. A new connection starts at one and doubles with
/// each confirm, so a broker that stopped reading (a memory alarm) costs one event per
/// `publish_timeout`, not a window's worth.
const MAX_WINDOW: usize = 1024;
/// Reconnect backoff: from 100 ms, doubling, to 5 s (with jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often overdue confirms and the flush deadline are checked.
const TICK: Duration = Duration::from_millis(50);

/// Published, awaiting its confirm.
struct Pending {
    tag: u64,
    kind: Kind,
    sent: Instant,
}

/// Shared by the publisher and the channel's callback (which runs on the connection's
/// reader task).
#[derive(Default)]
pub(super) struct Confirms {
    pending: Mutex<VecDeque<Pending>>,
    settled: Notify,
}

impl Confirms {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Counts every event still awaiting a confirm as failed (at most once: none is sent again).
pub(super) fn fail_all(confirms: &Confirms, events: &Events) {
    let pending: Vec<Pending> = confirms.lock().drain(..).collect();
    events.in_flight.store(0, Ordering::Relaxed);
    for p in pending {
        events.count(p.kind, Outcome::Failed);
    }
}

/// Why a session with the broker ended.
enum End {
    /// Flushed, or the flush deadline passed.
    Closed,
    /// The connection failed: reconnect.
    Lost(String),
    /// Confirms are overdue (a memory or disk alarm, or a broker too slow): reconnect, and
    /// show the link as stalled until a confirm comes.
    Stalled(String),
}

pub(super) async fn run(events: Arc<Events>) {
    let mut rx = events.rx.clone().lock_owned().await;
    let rx = &mut *rx;
    let mut backoff = BACKOFF_MIN;
    let mut outage: Option<Instant> = None;
    // Whether the last session ended with overdue confirms (kept until a confirm comes).
    let mut stalled = false;
    let mut closing = events.closing.subscribe();
    loop {
        if let Some(deadline) = *closing.borrow() {
            if Instant::now() >= deadline {
                break;
            }
        }
        if !stalled {
            events.set_link(if outage.is_some() {
                Link::Down
            } else {
                Link::Connecting
            });
        }
        let opened = tokio::select! {
            opened = tokio::time::timeout(events.settings.publish_timeout, open(&events)) => opened,
            // A flush while the broker is away still waits for it, until its deadline.
            _ = deadline_passed(&mut closing) => break,
        };
        let session = match opened {
            Ok(Ok(session)) => session,
            Ok(Err(error)) => {
                stalled = false;
                lost(&events, &mut outage, error);
                sleep_backoff(&mut backoff, &mut closing).await;
                continue;
            }
            Err(_) => {
                stalled = false;
                lost(&events, &mut outage, "connecting timed out".into());
                sleep_backoff(&mut backoff, &mut closing).await;
                continue;
            }
        };
        if stalled {
            // Connected again, but the broker has not confirmed anything yet: still stalled
            // (with its error) until a confirm comes.
            events.set_link(Link::Stalled);
        } else {
            if let Some(since) = outage.take() {
                info!(broker = %events.url, down_for = ?since.elapsed(), "events: broker reachable again, publishing");
            } else {
                info!(broker = %events.url, exchange = %events.settings.exchange, "events: publishing");
            }
            events.set_error(None);
            events.set_link(Link::Up);
        }
        backoff = BACKOFF_MIN;
        *events
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(session.confirms.clone());
        let end = publish(&events, &session, rx, &mut closing, &mut stalled).await;
        // Unconfirmed events went on a connection that is being given up: counted failed
        // (at most once: never sent again).
        session.fail_pending(&events);
        *events
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        match end {
            End::Closed => {
                // Counted before the polite close, which a broker that stopped reading can
                // hold for its whole bound.
                events.drop_buffered(rx);
                session.close().await;
                return;
            }
            End::Lost(error) => {
                session.abandon();
                lost(&events, &mut outage, error);
            }
            End::Stalled(error) => {
                session.abandon();
                if !stalled {
                    warn!(broker = %events.url, %error, "events: the broker stopped confirming (a memory or disk alarm?); buffering, one event in flight until it confirms again");
                }
                stalled = true;
                events.set_error(Some(error));
                events.set_link(Link::Stalled);
            }
        }
        sleep_backoff(&mut backoff, &mut closing).await;
    }
    events.drop_buffered(rx);
}

/// Logs the first failure of an outage as a warning, later ones quietly.
fn lost(events: &Events, outage: &mut Option<Instant>, error: String) {
    if outage.is_none() {
        warn!(broker = %events.url, %error, "events: broker unreachable; buffering (a full buffer drops events, counted)");
        *outage = Some(Instant::now());
    } else {
        tracing::debug!(%error, "events: broker still unreachable");
    }
    events.set_error(Some(error));
    events.set_link(Link::Down);
}

/// Resolves once a flush deadline is set and has passed.
async fn deadline_passed(closing: &mut tokio::sync::watch::Receiver<Option<Instant>>) {
    loop {
        let deadline = *closing.borrow_and_update();
        match deadline {
            Some(d) => {
                tokio::time::sleep_until(d).await;
                return;
            }
            None => {
                if closing.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
    }
}

async fn sleep_backoff(
    backoff: &mut Duration,
    closing: &mut tokio::sync::watch::Receiver<Option<Instant>>,
) {
    let jitter = backoff.mul_f64(fastrand::f64() * 0.2);
    let wait = *backoff + jitter;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = deadline_passed(closing) => {}
    }
}

/// One connection and its confirm-mode channel.
struct Session {
    connection: Connection,
    channel: Channel,
    confirms: Arc<Confirms>,
}

impl Session {
    /// Every unconfirmed event failed (the connection it went on is gone).
    fn fail_pending(&self, events: &Events) {
        fail_all(&self.confirms, events);
    }

    /// Closes politely, bounded: a broker that stopped reading would hold it forever.
    async fn close(self) {
        let Session {
            connection,
            channel,
            ..
        } = self;
        let close = async {
            let _ = channel.close().await;
            let _ = connection.close().await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), close).await;
    }

    /// Drops a failed connection without waiting on it.
    fn abandon(self) {
        tokio::spawn(self.close());
    }
}

async fn open(events: &Arc<Events>) -> Result<Session, String> {
    let args = events.url.open_args("strangler events", 30);
    let connection = Connection::open(&args)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    connection
        .register_callback(Quiet)
        .await
        .map_err(|e| e.to_string())?;
    let channel = connection
        .open_channel(None)
        .await
        .map_err(|e| format!("open channel: {e}"))?;
    let confirms = Arc::new(Confirms::default());
    channel
        .register_callback(ConfirmCallback {
            confirms: confirms.clone(),
            events: events.clone(),
        })
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectArguments::default())
        .await
        .map_err(|e| format!("confirm mode: {e}"))?;
    let exchange = ExchangeDeclareArguments::new(&events.settings.exchange, "topic")
        .durable(true)
        .finish();
    channel
        .exchange_declare(exchange)
        .await
        .map_err(|e| format!("declare exchange {}: {e}", events.settings.exchange))?;
    Ok(Session {
        connection,
        channel,
        confirms,
    })
}

/// Publishes until the flush is done or the connection is lost.
async fn publish(
    events: &Events,
    session: &Session,
    rx: &mut mpsc::Receiver<Event>,
    closing: &mut tokio::sync::watch::Receiver<Option<Instant>>,
    stalled: &mut bool,
) -> End {
    let timeout = events.settings.publish_timeout;
    let mut tag = 0u64;
    let mut window = 1usize;
    let mut confirmed_before = 0usize;
    let io_failure = session.connection.listen_network_io_failure();
    tokio::pin!(io_failure);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let in_flight = session.confirms.lock().len();
        // Grow the window by the confirms that came since the last look.
        let confirmed = (tag as usize).saturating_sub(in_flight);
        if confirmed > confirmed_before {
            window = (window + (confirmed - confirmed_before)).min(MAX_WINDOW);
            confirmed_before = confirmed;
        }
        let deadline = *closing.borrow();
        if let Some(d) = deadline {
            if in_flight == 0 && rx.is_empty() {
                return End::Closed;
            }
            if Instant::now() >= d {
                return End::Closed;
            }
        }
        if !session.connection.is_open() || !session.channel.is_open() {
            return End::Lost("the broker closed the connection".into());
        }
        let overdue = session
            .confirms
            .lock()
            .front()
            .is_some_and(|p| p.sent.elapsed() >= timeout);
        if overdue {
            return End::Stalled(format!("no publisher confirm within {timeout:?}"));
        }
        let room = in_flight < window;
        tokio::select! {
            biased;
            _ = &mut io_failure => return End::Lost("connection lost".into()),
            event = rx.recv(), if room => {
                let Some(event) = event else { return End::Closed };
                events.taken(&event);
                tag += 1;
                // Bounded by the flush deadline too, so a flush is never held by one publish.
                let until = *closing.borrow();
                if let Err(error) = send(events, session, &event, tag, timeout, until).await {
                    // Not on the wire, or not known to be: at most once, so counted failed.
                    {
                        let mut pending = session.confirms.lock();
                        pending.retain(|p| p.tag != tag);
                        events.in_flight.store(pending.len(), Ordering::Relaxed);
                    }
                    events.count(event.kind, Outcome::Failed);
                    return End::Lost(error);
                }
            }
            _ = session.confirms.settled.notified() => {
                if std::mem::take(stalled) {
                    info!(broker = %events.url, "events: the broker confirms again, publishing");
                    events.set_error(None);
                }
                events.set_link(Link::Up);
            }
            _ = tick.tick() => {}
            _ = closing.changed() => {}
        }
    }
}

async fn send(
    events: &Events,
    session: &Session,
    event: &Event,
    tag: u64,
    timeout: Duration,
    until: Option<Instant>,
) -> Result<(), String> {
    let timeout = until.map_or(timeout, |d| {
        d.saturating_duration_since(Instant::now()).min(timeout)
    });
    let id = format!("{:032x}", fastrand::u128(..));
    let body = event.to_cloudevent(&events.settings.source, &id);
    let timestamp = event
        .at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let props = BasicProperties::default()
        .with_content_type("application/cloudevents+json")
        .with_persistence(true)
        .with_message_id(&id)
        .with_timestamp(timestamp)
        .with_app_id("strangler")
        .with_message_type(event.kind.ce_type())
        .finish();
    let args = BasicPublishArguments::new(&events.settings.exchange, &event.routing_key());
    {
        let mut pending = session.confirms.lock();
        pending.push_back(Pending {
            tag,
            kind: event.kind,
            sent: Instant::now(),
        });
        events.in_flight.store(pending.len(), Ordering::Relaxed);
    }
    match tokio::time::timeout(timeout, session.channel.basic_publish(props, body, args)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("publish: {e}")),
        Err(_) => Err(format!("publish not written within {timeout:?}")),
    }
}

/// Settles pending events as the broker confirms them.
struct ConfirmCallback {
    confirms: Arc<Confirms>,
    events: Arc<Events>,
}

impl ConfirmCallback {
    fn settle(&self, tag: u64, multiple: bool, outcome: Outcome) {
        let mut pending = self.confirms.lock();
        let mut settled = Vec::new();
        if multiple {
            while pending.front().is_some_and(|p| p.tag <= tag) {
                if let Some(p) = pending.pop_front() {
                    settled.push(p.kind);
                }
            }
        } else if let Some(i) = pending.iter().position(|p| p.tag == tag) {
            if let Some(p) = pending.remove(i) {
                settled.push(p.kind);
            }
        }
        self.events
            .in_flight
            .store(pending.len(), Ordering::Relaxed);
        drop(pending);
        for kind in settled {
            self.events.count(kind, outcome);
        }
        self.confirms.settled.notify_one();
    }
}

#[async_trait::async_trait]
impl ChannelCallback for ConfirmCallback {
    async fn close(&mut self, _: &Channel, close: CloseChannel) -> AmqpResult<()> {
        warn!(%close, "events: the broker closed the channel");
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> AmqpResult<()> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, _active: bool) -> AmqpResult<bool> {
        Ok(true)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), Outcome::Published);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), Outcome::Failed);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// Connection-level notices: logged by the publisher loop, not here.
struct Quiet;

#[async_trait::async_trait]
impl ConnectionCallback for Quiet {
    async fn close(&mut self, _: &Connection, close: Close) -> AmqpResult<()> {
        warn!(%close, "events: the broker closed the connection");
        Ok(())
    }
    async fn blocked(&mut self, _: &Connection, reason: String) {
        warn!(%reason, "events: the broker blocked publishing");
    }
    async fn unblocked(&mut self, _: &Connection) {}
    async fn secret_updated(&mut self, _: &Connection) {}
}
