//! Names of the histograms the engine records through the `metrics` facade as events happen.
//! Whatever recorder the process installs receives them (the API crate installs a Prometheus
//! one and sets their buckets); without one, recording is a no-op. Counters and gauges are not
//! here: they are read from [`crate::StatsSnapshot`] when scraped.

/// Seconds from a job's admission to its outcome.
pub const JOB_SECONDS: &str = "loraloom_job_duration_seconds";
/// Seconds a worker spent computing one batch other than a decode step.
pub const BATCH_SECONDS: &str = "loraloom_batch_seconds";
/// Seconds one decode step took, over every sequence decoding at that moment.
pub const DECODE_STEP_SECONDS: &str = "loraloom_decode_step_seconds";
/// Seconds from a sampling job's admission to its first sampled token.
pub const FIRST_TOKEN_SECONDS: &str = "loraloom_time_to_first_token_seconds";
