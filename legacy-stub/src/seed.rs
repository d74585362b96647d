//! The deterministic FitTrack data set shared by the monolith and the extracted services:
//! the same seed gives the same users, workouts and posts on every run and machine.

use serde::{Deserialize, Serialize};

const FIRST: [&str; 10] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Margaret", "Ken", "Radia", "Linus",
];
const LAST: [&str; 10] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Hamilton", "Thompson",
    "Perlman", "Torvalds",
];
const KINDS: [&str; 4] = ["run", "ride", "swim", "lift"];
const POSTS: [&str; 6] = [
    "New personal best today!",
    "Rest day. Stretching and coffee.",
    "Who is up for a long ride on Sunday?",
    "Swam 2k without stopping.",
    "Legs day was brutal.",
    "Finally ran under 25 minutes for a 5k.",
];

/// Number of seeded users, workouts and posts.
pub const USERS: u64 = 20;
pub const WORKOUTS: u64 = 60;
pub const FEED_POSTS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: u64,
    pub name: String,
    /// Mixed case as the monolith stored it; the `email-case` bug lower-cases it.
    pub email: String,
    pub plan: String,
    pub joined: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workout {
    pub id: u64,
    pub user_id: u64,
    pub kind: String,
    pub duration_min: u64,
    pub distance_km: f64,
    pub date: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Post {
    pub id: u64,
    pub user_id: u64,
    pub text: String,
    pub likes: u64,
    pub created_at: String,
}

pub fn users() -> Vec<User> {
    (1..=USERS)
        .map(|id| {
            let (f, l) = (FIRST[(id as usize - 1) % 10], LAST[(id as usize * 3) % 10]);
            User {
                id,
                name: format!("{f} {l}"),
                email: format!("{f}.{l}{id}@FitTrack.example"),
                plan: if id % 3 == 0 { "pro" } else { "free" }.to_string(),
                joined: format!("2024-{:02}-{:02}", id % 12 + 1, id % 28 + 1),
            }
        })
        .collect()
}

pub fn workouts() -> Vec<Workout> {
    (1..=WORKOUTS)
        .map(|id| Workout {
            id,
            user_id: id % USERS + 1,
            kind: KINDS[(id % 4) as usize].to_string(),
            duration_min: 20 + (id * 7) % 70,
            distance_km: ((id * 13) % 200) as f64 / 10.0,
            date: format!("2026-{:02}-{:02}", id % 11 + 1, id % 27 + 1),
        })
        .collect()
}

pub fn posts() -> Vec<Post> {
    (1..=FEED_POSTS)
        .map(|id| Post {
            id,
            user_id: (id * 7) % USERS + 1,
            text: POSTS[(id % 6) as usize].to_string(),
            likes: (id * 11) % 50,
            created_at: format!("2026-11-{:02}T{:02}:00:00Z", id % 21 + 1, id % 24),
        })
        .collect()
}
