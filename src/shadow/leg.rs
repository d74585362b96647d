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
use crate::compare::{compare, learn_noise, Answer, Verdict};
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

/// Everything a leg needs, moved into its task.
pub(super) struct Leg {
    pub(super) plan: Plan,
    pub(super) shadows: Arc<Shadows>,
    pub(super) method: Method,
    pub(super) pq: Option<PathAndQuery>,
    /// The forwarded request's headers (already cleaned by the proxy).
    pub(super) headers: HeaderMap,
    pub(super) request_id: String,
    pub(super) primary: Arc<Upstream>,
    pub(super) shadow: Arc<Upstream>,
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

impl Leg {
    /// Runs the leg to its end and records the outcome. Consumes the permit when done.
    pub(super) async fn run(self) {
        let stats = self.plan.stats.clone();
        let shadows = self.shadows.clone();
        let route = stats.prefix.clone();
        let request_id = self.request_id.clone();
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
                info!(route = %route, request_id = %entry.request_id, differences = entry.total_differences, first = ?first, "shadow mismatch");
                shadows.diffs.push(entry);
            }
            (o, _) => {
                debug!(route = %route, request_id = %request_id, outcome = o.as_str(), "shadow compared")
            }
        }
    }

    async fn compare(self) -> (Outcome, Option<DiffEntry>) {
        let budget = self.shadows.budget.clone();
        let max = self.plan.max_body;
        let body = match self.request_body {
            RequestCopy::Ready(held) => held,
            RequestCopy::Pending(rx) => {
                match tokio::time::timeout_at(self.primary_deadline, rx).await {
                    Ok(Ok(Captured::Body(held))) => held,
                    Ok(Ok(Captured::TooLarge)) => return (Outcome::Skipped, None),
                    _ => return (Outcome::Skipped, None),
                }
            }
        };
        let copy = |to: &Upstream| -> Option<Request<UpstreamBody>> {
            let mut req = Request::builder()
                .method(self.method.clone())
                .uri(to.uri(self.pq.as_ref()).ok()?)
                .body(UpstreamBody::full(body.bytes.clone()))
                .ok()?;
            *req.headers_mut() = self.headers.clone();
            req.headers_mut()
                .insert(X_STRANGLER_SHADOW, HeaderValue::from_static("1"));
            Some(req)
        };
        let (Some(shadow_req), noise_req) = (
            copy(&self.shadow),
            self.plan.noise.then(|| copy(&self.primary)).flatten(),
        ) else {
            return (Outcome::Error, None);
        };
        let shadow_deadline = Instant::now() + self.shadow.timeout;
        let primary = async {
            let wait = self.primary_deadline + PRIMARY_GRACE;
            let head = tokio::time::timeout_at(wait, self.primary_head)
                .await
                .ok()?
                .ok()?;
            match tokio::time::timeout_at(wait, self.primary_body)
                .await
                .ok()?
                .ok()?
            {
                Captured::Body(held) => Some((head, held)),
                Captured::TooLarge => None,
            }
        };
        let noise = async {
            match noise_req {
                Some(req) => fetch(&self.primary, req, shadow_deadline, max, &budget)
                    .await
                    .ok(),
                None => None,
            }
        };
        let (shadow, primary, noise) = tokio::join!(
            fetch(&self.shadow, shadow_req, shadow_deadline, max, &budget),
            primary,
            noise
        );
        let Some((head, primary_body)) = primary else {
            return (Outcome::Skipped, None);
        };
        let primary_answer = Answer {
            status: head.status,
            headers: head.headers,
            body: primary_body.bytes.clone(),
            trailers: primary_body.trailers.clone(),
        };
        let (shadow_answer, shadow_latency, _held) = match shadow {
            Ok(s) => s,
            Err(Missing::Error(why)) => {
                debug!(error = %why, "shadow request failed");
                return (Outcome::Error, None);
            }
            Err(Missing::Skipped(why)) => {
                debug!(why, "shadow answer not compared");
                return (Outcome::Skipped, None);
            }
        };
        self.plan
            .stats
            .duration
            .record(shadow_latency.as_secs_f64());
        let mut rules = self.plan.rules;
        if let Some((second, _, _held)) = noise {
            let noise_learned = learn_noise(&primary_answer, &second, max);
            if !noise_learned.is_empty() {
                self.plan.stats.learn(noise_learned.clone());
                rules.ignore.extend(
                    noise_learned
                        .iter()
                        .map(|p| crate::compare::Pattern::parse(p)),
                );
            }
        }
        match compare(&primary_answer, &shadow_answer, &rules) {
            Verdict::Match => (Outcome::Match, None),
            Verdict::Skipped(_) => (Outcome::Skipped, None),
            Verdict::Mismatch(differences) => {
                let primary = Side {
                    backend: self.primary.name.clone(),
                    status: head.status,
                    latency_ms: head.latency.as_secs_f64() * 1000.0,
                };
                let shadow = Side {
                    backend: self.shadow.name.clone(),
                    status: shadow_answer.status,
                    latency_ms: shadow_latency.as_secs_f64() * 1000.0,
                };
                let path = self
                    .pq
                    .as_ref()
                    .map_or("/".to_string(), |pq| pq.path().to_string());
                let entry = DiffEntry::new(
                    self.plan.stats.prefix.clone(),
                    self.method.to_string(),
                    path,
                    self.request_id,
                    primary,
                    shadow,
                    differences,
                    self.plan.stats.learned_noise(),
                );
                (Outcome::Mismatch, Some(entry))
            }
        }
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
