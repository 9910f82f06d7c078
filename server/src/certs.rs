//! The federation's CA and client certificates (rcgen). Not built yet.
