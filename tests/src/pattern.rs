//! A seeded byte pattern (splitmix64) that both ends of a transfer regenerate instead of
//! storing it, so a test can check any volume of data by length and SHA-256.

use sha2::{Digest, Sha256};

/// Bytes generated per chunk.
const CHUNK: usize = 64 * 1024;

/// The first `len` bytes of the pattern of a seed, generated one 64 KiB chunk at a time.
#[derive(Clone, Debug)]
pub struct Pattern {
    /// splitmix64 state.
    state: u64,
    left: u64,
    buf: Vec<u8>,
}

impl Pattern {
    /// The first `len` bytes of the pattern `seed`.
    pub fn new(seed: u64, len: u64) -> Self {
        Self {
            state: seed,
            left: len,
            buf: vec![0u8; CHUNK],
        }
    }

    /// The next chunk: 64 KiB, or what is left of `len`; `None` at the end.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.left == 0 {
            return None;
        }
        let n = self.left.min(CHUNK as u64) as usize;
        self.left -= n as u64;
        // Whole 8-byte words per chunk, so the stream does not depend on the chunking.
        for c in self.buf[..n].chunks_mut(8) {
            self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            let v = (z ^ (z >> 31)).to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
        Some(&self.buf[..n])
    }
}

/// SHA-256 of the first `len` bytes of the pattern `seed`.
pub fn digest(seed: u64, len: u64) -> [u8; 32] {
    let mut pattern = Pattern::new(seed, len);
    let mut hash = Sha256::new();
    while let Some(chunk) = pattern.next_chunk() {
        hash.update(chunk);
    }
    hash.finalize().into()
}
