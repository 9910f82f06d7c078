//! Bandwidth, latency and availability models on a simulated clock. Not built yet.
