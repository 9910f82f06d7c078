//! Per-round CSV and JSON, and plots of accuracy against rounds and bytes. Not built yet.
