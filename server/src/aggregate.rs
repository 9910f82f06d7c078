//! Aggregation strategies, streaming: weighted FedAvg, usage-weighted pool merge, exact LoRA merge, robust rules, FedAdam. Not built yet.
