//! Atomic round checkpoints and the round log; resume after a crash. Not built yet.
