//! Where the nonces of round tasks come from. A task's nonce is what makes a replayed update
//! detectable, so the server draws them from the operating system's secure random source
//! ([`OsNonces`], the default). Tests and simulations may install [`SeededNonces`] with
//! [`Engine::with_nonces`](super::Engine::with_nonces), which makes every action of the engine,
//! byte for byte, a function of its events. Nonces change no result, only the bytes of tasks.

use fedpool_common::Nonce;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A source of task nonces, asked once per task in the order the engine hands tasks out.
pub trait NonceSource: Send {
    /// The next nonce.
    fn next(&mut self) -> Nonce;
}

/// Nonces from the operating system's secure random source ([`Nonce::random`]): unpredictable,
/// as a server needs them to be. The engine's default.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsNonces;

impl NonceSource for OsNonces {
    fn next(&mut self) -> Nonce {
        Nonce::random()
    }
}

/// Nonces from ChaCha8 seeded with a number: the same seed gives the same nonces in the same
/// order. Predictable, so for tests and simulations only: a server with a known seed would accept
/// forged updates.
#[derive(Debug, Clone)]
pub struct SeededNonces(ChaCha8Rng);

impl SeededNonces {
    /// The nonces of `seed`.
    pub fn new(seed: u64) -> Self {
        Self(ChaCha8Rng::seed_from_u64(seed))
    }
}

impl NonceSource for SeededNonces {
    fn next(&mut self) -> Nonce {
        let mut bytes = [0u8; 16];
        self.0.fill_bytes(&mut bytes);
        Nonce(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draw(source: &mut impl NonceSource, n: usize) -> Vec<Nonce> {
        (0..n).map(|_| source.next()).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_nonces_and_another_seed_others() {
        let a = draw(&mut SeededNonces::new(7), 4);
        assert_eq!(a, draw(&mut SeededNonces::new(7), 4));
        assert_ne!(a, draw(&mut SeededNonces::new(8), 4));
        assert!(a.windows(2).all(|w| w[0] != w[1]), "a stream, not one value: {a:?}");
    }

    #[test]
    fn os_nonces_differ_from_call_to_call() {
        let mut os = OsNonces;
        assert_ne!(os.next(), os.next());
    }
}
