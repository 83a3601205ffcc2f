//! PTCP throughput benchmark (placeholder until the driver lands).
fn main() {}
