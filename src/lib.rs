pub mod config;
pub mod routes;
pub mod units;
