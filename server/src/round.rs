//! The round engine: a sans-IO state machine fed events (client enrolled or lost, update received, tick) that returns actions (send task, reject, commit, drop). Not built yet.
