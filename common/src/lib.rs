//! fedpool-common: the shared language of fedpool's client, server and simulator.
//!
//! Pure and synchronous: no async runtime, no sockets, no training. What crosses a process
//! boundary is defined here — adapter pools and deltas ([`adapter`]), host tensors ([`tensor`]),
//! delta compression ([`codec`]), protocol messages ([`wire`]) and their byte framing
//! ([`frame`]), and checkpoints on disk ([`checkpoint`]).

pub mod adapter;
pub mod checkpoint;
pub mod codec;
pub mod frame;
pub mod ids;
pub mod tensor;
pub mod wire;

pub use adapter::{AdapterKind, AdapterPool, HeadSpec, PoolDelta, PoolSpec, Pooling, SlotUsage, TargetSpec};
pub use ids::{BackboneFingerprint, Nonce, Round, Sha256, SpecHash, TaskId};
pub use tensor::HostTensor;
