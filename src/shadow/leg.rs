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
use crate::compare::{compare, generalize, learn_noise, Answer, Difference, Skip, Verdict};
use crate::headers::X_STRANGLER_SHADOW;
use crate::upstream::body::UpstreamBody;
use crate::upstream::tee::{Budget, Captured, Held, Tee};
use crate::upstream::Upstream;

/// How long the leg waits for the primary's body after the primary's own deadline.
const PRIMARY_GRACE: Duration = Duration::from_secs(1);
/// A mismatch to be confirmed asks the primary backend again this long after its first
/// answer: long enough for a timestamp with a resolution of a second to move.
pub(super) const CONFIRM_AFTER: Duration = Duration::from_millis(1100);

/// The primary's response head, handed over when it arrives.
pub(super) struct Head {
    pub(super) status: u16,
    pub(super) headers: HeaderMap,
    pub(super) latency: Duration,
    /// When the head arrived.
    pub(super) answered: Instant,
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
    Skipped(Skip),
}

/// How a leg ended.
enum Judged {
    Match,
    Mismatch(Box<DiffEntry>),
    Error,
    Skipped(Skip),
}

impl From<Missing> for Judged {
    fn from(missing: Missing) -> Self {
        match missing {
            Missing::Error(why) => {
                debug!(error = %why, "shadow request failed");
                Judged::Error
            }
            Missing::Skipped(why) => Judged::Skipped(why),
        }
    }
}

/// The answers a leg collected.
struct Answers {
    primary: Result<(Head, Answer), Skip>,
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
        let outcome = match self.compare().await {
            Judged::Match => Outcome::Match,
            Judged::Error => Outcome::Error,
            Judged::Skipped(why) => {
                debug!(route = %stats.prefix, request_id = %request_id, why = why.as_str(), "shadow answer not compared");
                stats.skipped(why);
                return;
            }
            Judged::Mismatch(entry) => {
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
                shadows.diffs.push(*entry);
                Outcome::Mismatch
            }
        };
        stats.count(outcome);
        if outcome != Outcome::Mismatch {
            debug!(route = %stats.prefix, request_id = %request_id, outcome = outcome.as_str(), "shadow compared");
        }
    }

    async fn compare(mut self) -> Judged {
        // The shadow's request takes the request's headers when nothing asks for them again
        // (no noise to learn, no mismatch to confirm): one header map copy fewer per leg.
        let headers = if self.copy.plan.noise || self.copy.plan.confirm {
            self.copy.headers.clone()
        } else {
            std::mem::take(&mut self.copy.headers)
        };
        // Fields used in place: destructured, `self` would be held twice in this future.
        let copy = &self.copy;
        let deadline = self.inputs.primary_deadline;
        let body = match request_copy(self.inputs.request_body, deadline).await {
            Ok(body) => body,
            Err(why) => return Judged::Skipped(why),
        };
        let Some(answers) = copy
            .send(
                headers,
                &body,
                self.inputs.primary_head,
                self.inputs.primary_body,
                deadline,
            )
            .await
        else {
            return Judged::Error;
        };
        let (head, primary) = match answers.primary {
            Ok(p) => p,
            Err(why) => return Judged::Skipped(why),
        };
        let (shadow, latency, _held) = match answers.shadow {
            Ok(s) => s,
            Err(missing) => return missing.into(),
        };
        copy.plan.stats.duration.record(latency.as_secs_f64());
        let (primary, shadow) = (Arc::new(primary), Arc::new(shadow));
        let verdict = match copy.judge(&primary, &shadow, answers.noise).await {
            Ok(v) => v,
            Err(why) => return Judged::Skipped(why),
        };
        let verdict = match verdict {
            Verdict::Mismatch { differences, .. } if copy.needs_confirming(&differences) => {
                match copy.confirm(&body, &head, &primary, &shadow).await {
                    Ok(v) => v,
                    Err(why) => return Judged::Skipped(why),
                }
            }
            v => v,
        };
        match verdict {
            Verdict::Match => Judged::Match,
            Verdict::Skipped(why) => Judged::Skipped(why),
            Verdict::Mismatch { differences, total } => {
                let entry = copy.entry(&head, &shadow, latency, differences, total);
                Judged::Mismatch(Box::new(entry))
            }
        }
    }
}

/// The request body as the primary received it; skipped when it was too large or never ended.
async fn request_copy(copy: RequestCopy, deadline: Instant) -> Result<Held, Skip> {
    match copy {
        RequestCopy::Ready(held) => Ok(held),
        RequestCopy::Pending(rx) => match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(Captured::Body(held))) => Ok(held),
            Ok(Ok(Captured::TooLarge)) => Err(Skip::TooLarge),
            _ => Err(Skip::Incomplete),
        },
    }
}

/// The primary's answer as the client got it, waited for a little past its own deadline.
async fn primary_answer(
    head: oneshot::Receiver<Head>,
    body: oneshot::Receiver<Captured>,
    wait: Instant,
) -> Result<(Head, Answer), Skip> {
    let Ok(Ok(mut head)) = tokio::time::timeout_at(wait, head).await else {
        return Err(Skip::Incomplete);
    };
    let Ok(Ok(body)) = tokio::time::timeout_at(wait, body).await else {
        return Err(Skip::Incomplete);
    };
    match body {
        Captured::Body(held) => {
            let answer = Answer {
                status: head.status,
                // Moved, not cloned: the leg keeps the head for its status and times only.
                headers: std::mem::take(&mut head.headers),
                body: held.bytes.clone(),
                trailers: held.trailers.clone(),
            };
            Ok((head, answer))
        }
        Captured::TooLarge => Err(Skip::TooLarge),
    }
}

impl Copy {
    /// The request again, for `to`, marked as a shadow copy.
    fn request(&self, to: &Upstream, body: &Held) -> Option<Request<UpstreamBody>> {
        self.request_with(to, body, self.headers.clone())
    }

    /// [`Copy::request`] with `headers`, the request's own (cloned or taken).
    fn request_with(
        &self,
        to: &Upstream,
        body: &Held,
        mut headers: HeaderMap,
    ) -> Option<Request<UpstreamBody>> {
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
        headers: HeaderMap,
        body: &Held,
        head: oneshot::Receiver<Head>,
        primary_body: oneshot::Receiver<Captured>,
        primary_deadline: Instant,
    ) -> Option<Answers> {
        let shadow_req = self.request_with(&self.shadow, body, headers)?;
        let noise_req = self
            .plan
            .noise
            .then(|| self.request(&self.primary, body))
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

    /// Learns from this request's second answer of the primary backend (if it has one) and
    /// compares, on the comparison threads: the route's rules plus the noise learned so far.
    async fn judge(
        &self,
        primary: &Arc<Answer>,
        shadow: &Arc<Answer>,
        second: Option<Answer>,
    ) -> Result<Verdict, Skip> {
        let (stats, base, max) = (
            self.plan.stats.clone(),
            self.plan.rules.clone(),
            self.plan.max_body,
        );
        let (primary, shadow) = (primary.clone(), shadow.clone());
        let job = move || {
            if let Some(second) = second {
                let learned = learn_noise(&primary, &second, max);
                if !learned.is_empty() {
                    stats.learn(learned);
                }
            }
            compare(&primary, &shadow, &stats.rules(&base))
        };
        self.shadows
            .judges
            .run(job)
            .await
            .map_err(|_| Skip::QueueFull)
    }

    /// Whether a mismatch must be confirmed before it counts: on a route learning noise, for
    /// a safe request, when some differing path has not been confirmed real before.
    fn needs_confirming(&self, differences: &[Difference]) -> bool {
        if !self.plan.confirm {
            return false;
        }
        let paths: Vec<String> = differences.iter().map(|d| generalize(&d.path)).collect();
        !self.plan.stats.all_known_real(&paths)
    }

    /// Asks the primary backend again, [`CONFIRM_AFTER`] after its first answer, learns what
    /// differs between its two answers as noise, and compares again. A field that differs
    /// only now and then (a millisecond timestamp from a fast monolith) is learned here
    /// before it can count as a mismatch; paths still differing are remembered as real, so
    /// the next mismatch at them is counted at once.
    async fn confirm(
        &self,
        body: &Held,
        head: &Head,
        primary: &Arc<Answer>,
        shadow: &Arc<Answer>,
    ) -> Result<Verdict, Skip> {
        let Some(req) = self.request(&self.primary, body) else {
            return Err(Skip::Incomplete);
        };
        tokio::time::sleep_until(head.answered + CONFIRM_AFTER).await;
        let (max, budget) = (self.plan.max_body, &self.shadows.budget);
        let deadline = Instant::now() + self.primary.timeout;
        let second = match Box::pin(fetch(&self.primary, req, deadline, max, budget)).await {
            Ok((answer, _, _)) => answer,
            Err(Missing::Skipped(why)) => return Err(why),
            Err(Missing::Error(error)) => {
                debug!(%error, "noise confirmation failed; the mismatch stands");
                return self.judge(primary, shadow, None).await;
            }
        };
        let verdict = self.judge(primary, shadow, Some(second)).await?;
        if let Verdict::Mismatch { differences, .. } = &verdict {
            self.plan
                .stats
                .confirmed_real(differences.iter().map(|d| generalize(&d.path)));
        }
        Ok(verdict)
    }

    /// The `/diffs` entry of a mismatch.
    fn entry(
        &self,
        head: &Head,
        shadow: &Answer,
        latency: Duration,
        differences: Vec<Difference>,
        total: usize,
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
            total_differences: total,
            differences,
            learned_noise: self.plan.stats.learned_noise(),
        }
        .bounded()
    }
}

/// Sends `req` and reads the answer, at most `max` body bytes, by `deadline`. (A function
/// returning its future, not an `async fn`, which would hold the request twice.)
#[allow(clippy::manual_async_fn)]
fn fetch<'a>(
    to: &'a Upstream,
    req: Request<UpstreamBody>,
    deadline: Instant,
    max: usize,
    budget: &'a Arc<Budget>,
) -> impl std::future::Future<Output = Result<(Answer, Duration, Held), Missing>> + Send + 'a {
    async move {
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
                    return Err(Missing::Skipped(Skip::TooLarge));
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
            _ => Err(Missing::Skipped(Skip::TooLarge)),
        }
    }
}
