//! Per-client, per-target LoRA rank budgets under bandwidth and deadline. Not built yet.
