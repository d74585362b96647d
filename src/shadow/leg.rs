//! One shadow leg: send the copy, collect both answers (bounded), compare, record.

use std::sync::Arc;
use std::time::Duration;

use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Method, Request};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info};

use super::report::{DiffEntry, Side};
use super::{Outcome, Plan, Shadows};
use crate::compare::{compare, learn_noise, Answer, Rules, Verdict};
use crate::headers::X_STRANGLER_SHADOW;
use crate::upstream::body::UpstreamBody;
use crate::upstream::tee::{Budget, Captured, Held, Tee};
use crate::upstream::Upstream;

/// How long the leg waits for the primary's body after the primary's own deadline.
const PRIMARY_GRACE: Duration = Duration::from_secs(1);

/// The primary's response head, handed over when it arrives.
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) headers: HeaderMap,
    pub(super) latency: Duration,
}

/// The request body copy: already known (no body) or still streaming to the primary.
pub(super) enum RequestCopy {
    Ready(Held),
    Pending(oneshot::Receiver<Captured>),
}

/// Everything a leg needs, moved into its task: the request it copies and the hand-overs
/// from the primary exchange.
pub(super) struct Leg {
    pub(super) copy: Copy,
    pub(super) inputs: Inputs,
}

/// The request a leg copies and where the copies go.
pub(super) struct Copy {
    pub(super) plan: Plan,
    pub(super) shadows: Arc<Shadows>,
    pub(super) method: Method,
    pub(super) pq: Option<PathAndQuery>,
    /// The forwarded request's headers (already cleaned by the proxy).
    pub(super) headers: HeaderMap,
    pub(super) request_id: String,
    pub(super) primary: Arc<Upstream>,
    pub(super) shadow: Arc<Upstream>,
}

/// What the primary exchange hands over, when it has it.
pub(super) struct Inputs {
    pub(super) request_body: RequestCopy,
    pub(super) primary_head: oneshot::Receiver<Head>,
    pub(super) primary_body: oneshot::Receiver<Captured>,
    pub(super) primary_deadline: Instant,
}

/// Why a side has no answer to compare.
enum Missing {
    Error(String),
    Skipped(&'static str),
}

impl Missing {
    fn outcome(self) -> Outcome {
        match self {
            Missing::Error(why) => {
                debug!(error = %why, "shadow request failed");
                Outcome::Error
            }
            Missing::Skipped(why) => {
                debug!(why, "shadow answer not compared");
                Outcome::Skipped
            }
        }
    }
}

/// The answers a leg collected.
struct Answers {
    primary: Option<(Head, Answer)>,
    shadow: Result<(Answer, Duration, Held), Missing>,
    /// A second answer of the primary backend, for learning noise.
    noise: Option<Answer>,
}

impl Leg {
    /// Runs the leg to its end and records the outcome. Consumes the permit when done.
    pub(super) async fn run(self) {
        let stats = self.copy.plan.stats.clone();
        let shadows = self.copy.shadows.clone();
        let request_id = self.copy.request_id.clone();
        let events = self.copy.plan.events.clone();
        let (outcome, entry) = self.compare().await;
        stats.count(outcome);
        match (&outcome, entry) {
            (Outcome::Mismatch, Some(entry)) => {
                let first: Vec<&str> = entry
                    .differences
                    .iter()
                    .take(3)
                    .map(|d| d.path.as_str())
                    .collect();
                info!(route = %stats.prefix, request_id = %entry.request_id, differences = entry.total_differences, first = ?first, "shadow mismatch");
                if let Some((events, key)) = events {
                    let event = crate::events::Event::mismatch(&key, &entry.path, entry.to_json());
                    events.emit(event);
                }
                shadows.diffs.push(entry);
            }
            (o, _) => {
                debug!(route = %stats.prefix, request_id = %request_id, outcome = o.as_str(), "shadow compared")
            }
        }
    }

    async fn compare(self) -> (Outcome, Option<DiffEntry>) {
        let Leg { copy, inputs } = self;
        let deadline = inputs.primary_deadline;
        let Some(body) = request_copy(inputs.request_body, deadline).await else {
            return (Outcome::Skipped, None);
        };
        let Some(answers) = copy
            .send(body, inputs.primary_head, inputs.primary_body, deadline)
            .await
        else {
            return (Outcome::Error, None);
        };
        let Some((head, primary)) = answers.primary else {
            return (Outcome::Skipped, None);
        };
        let (shadow, latency, _held) = match answers.shadow {
            Ok(s) => s,
            Err(missing) => return (missing.outcome(), None),
        };
        copy.plan.stats.duration.record(latency.as_secs_f64());
        let rules = copy.rules(&primary, answers.noise.as_ref());
        match compare(&primary, &shadow, &rules) {
            Verdict::Match => (Outcome::Match, None),
            Verdict::Skipped(_) => (Outcome::Skipped, None),
            Verdict::Mismatch(differences) => {
                let entry = copy.entry(&head, &shadow, latency, differences);
                (Outcome::Mismatch, Some(entry))
            }
        }
    }
}

/// The request body as the primary received it; `None` when it was too large or never ended.
async fn request_copy(copy: RequestCopy, deadline: Instant) -> Option<Held> {
    match copy {
        RequestCopy::Ready(held) => Some(held),
        RequestCopy::Pending(rx) => match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Captured::Body(held))) => Some(held),
            _ => None,
        },
    }
}

/// The primary's answer as the client got it, waited for a little past its own deadline.
async fn primary_answer(
    head: oneshot::Receiver<Head>,
    body: oneshot::Receiver<Captured>,
    wait: Instant,
) -> Option<(Head, Answer)> {
    let head = tokio::time::timeout_at(wait, head).await.ok()?.ok()?;
    match tokio::time::timeout_at(wait, body).await.ok()?.ok()? {
        Captured::Body(held) => {
            let answer = Answer {
                status: head.status,
                headers: head.headers.clone(),
                body: held.bytes.clone(),
                trailers: held.trailers.clone(),
            };
            Some((head, answer))
        }
        Captured::TooLarge => None,
    }
}

impl Copy {
    /// The request again, for `to`, marked as a shadow copy.
    fn request(&self, to: &Upstream, body: &Held) -> Option<Request<UpstreamBody>> {
        let mut headers = self.headers.clone();
        headers.insert(X_STRANGLER_SHADOW, HeaderValue::from_static("1"));
        to.request(
            self.method.clone(),
            self.pq.as_ref(),
            headers,
            body.bytes.clone(),
        )
    }

    /// Sends the copies (to the shadow; to the primary again when learning noise) and waits
    /// for every answer. `None` when a copy cannot be made.
    async fn send(
        &self,
        body: Held,
        head: oneshot::Receiver<Head>,
        primary_body: oneshot::Receiver<Captured>,
        primary_deadline: Instant,
    ) -> Option<Answers> {
        let shadow_req = self.request(&self.shadow, &body)?;
        let noise_req = self
            .plan
            .noise
            .then(|| self.request(&self.primary, &body))
            .flatten();
        let (max, budget) = (self.plan.max_body, &self.shadows.budget);
        let deadline = Instant::now() + self.shadow.timeout;
        // Boxed: only routes learning noise send this copy, and the leg's future (moved into
        // its task) stays small for the others.
        let noise = async {
            let req = noise_req?;
            let (answer, _, _) = Box::pin(fetch(&self.primary, req, deadline, max, budget))
                .await
                .ok()?;
            Some(answer)
        };
        let (shadow, primary, noise) = tokio::join!(
            fetch(&self.shadow, shadow_req, deadline, max, budget),
            primary_answer(head, primary_body, primary_deadline + PRIMARY_GRACE),
            noise
        );
        Some(Answers {
            primary,
            shadow,
            noise,
        })
    }

    /// The route's rules, plus the noise learned so far and from this request's second
    /// answer of the primary backend.
    fn rules(&self, primary: &Answer, second: Option<&Answer>) -> Rules {
        let stats = &self.plan.stats;
        if let Some(second) = second {
            let learned = learn_noise(primary, second, self.plan.max_body);
            if !learned.is_empty() {
                stats.learn(learned);
            }
        }
        stats.rules(&self.plan.rules)
    }

    /// The `/diffs` entry of a mismatch.
    fn entry(
        &self,
        head: &Head,
        shadow: &Answer,
        latency: Duration,
        differences: Vec<crate::compare::Difference>,
    ) -> DiffEntry {
        let side = |backend: &Upstream, status: u16, latency: Duration| Side {
            backend: backend.name.clone(),
            status,
            latency_ms: latency.as_secs_f64() * 1000.0,
        };
        DiffEntry {
            at: std::time::SystemTime::now(),
            route: self.plan.stats.prefix.clone(),
            method: self.method.to_string(),
            path: self.pq.as_ref().map_or("/", |pq| pq.path()).to_string(),
            request_id: self.request_id.clone(),
            primary: side(&self.primary, head.status, head.latency),
            shadow: side(&self.shadow, shadow.status, latency),
            total_differences: differences.len(),
            differences,
            learned_noise: self.plan.stats.learned_noise(),
        }
        .bounded()
    }
}

/// Sends `req` and reads the answer, at most `max` body bytes, by `deadline`.
async fn fetch(
    to: &Upstream,
    req: Request<UpstreamBody>,
    deadline: Instant,
    max: usize,
    budget: &Arc<Budget>,
) -> Result<(Answer, Duration, Held), Missing> {
    let started = Instant::now();
    let (resp, lease) = to
        .send(req, deadline)
        .await
        .map_err(|f| Missing::Error(f.error.to_string()))?;
    let latency = started.elapsed();
    let (parts, mut body) = resp.into_parts();
    let (mut tee, rx) = Tee::new(max, budget);
    let read = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| Missing::Error(e.to_string()))?;
            tee.frame(&frame);
            if tee.is_done() {
                return Err(Missing::Skipped("answer over compare.max_body"));
            }
        }
        tee.finish();
        lease.release();
        Ok(())
    };
    tokio::time::timeout_at(deadline, read)
        .await
        .map_err(|_| Missing::Error("shadow answer timed out".into()))??;
    match rx.await {
        Ok(Captured::Body(held)) => Ok((
            Answer {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body: held.bytes.clone(),
                trailers: held.trailers.clone(),
            },
            latency,
            held,
        )),
        _ => Err(Missing::Skipped("answer over compare.max_body")),
    }
}
