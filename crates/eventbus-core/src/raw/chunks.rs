//! Copies of small byte strings into shared chunks.

use bytes::{Bytes, BytesMut};

use crate::message::Headers;

/// Bytes of a chunk unless [`ByteChunks::new`] says otherwise.
pub const DEFAULT_CHUNK: usize = 16 * 1024;

/// Copies byte strings (keys, payloads, header values) into shared chunks: a copy
/// is a slice of the chunk it was written to, shared by the copies made around
/// it, as the records of a broker's log segment or fetch buffer share it.
///
/// A copy then costs no allocation of its own (one per chunk), and the copies of
/// a chunk share one count, on a line the copier just touched: a consumer that
/// copies each record out of its client library and hands it to a worker on
/// another core allocates on one thread and frees on the other once per chunk,
/// not once per key and payload. A chunk is freed when the last of its copies is
/// dropped, so a copy held long (a stuck message) keeps its chunk.
#[derive(Debug)]
pub struct ByteChunks {
    chunk: BytesMut,
    size: usize,
}

impl Default for ByteChunks {
    fn default() -> Self {
        Self::new(DEFAULT_CHUNK)
    }
}

impl ByteChunks {
    /// A copier into chunks of `size` bytes; a longer string gets a chunk of its
    /// own length.
    pub fn new(size: usize) -> Self {
        Self {
            chunk: BytesMut::new(),
            size: size.max(1),
        }
    }

    /// `bytes`, copied into the current chunk (a new chunk when it has no room).
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if self.chunk.capacity() - self.chunk.len() < bytes.len() {
            self.chunk = BytesMut::with_capacity(self.size.max(bytes.len()));
        }
        self.chunk.extend_from_slice(bytes);
        self.chunk.split().freeze()
    }
}

/// A consumed record's headers from `pairs` of names and values (copied by a
/// [`ByteChunks`]), as one allocation: no string per name, no list besides the
/// pairs. `pairs` is left empty, a buffer for the next record's. A name that is
/// not UTF-8 is made so (each invalid sequence replaced by U+FFFD).
pub fn shared_headers(pairs: &mut Vec<(Bytes, Bytes)>) -> Headers {
    Headers::from_shared(pairs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_byte_for_byte_and_neighbours_share_a_chunk() {
        let size = 64;
        let mut chunks = ByteChunks::new(size);
        let inputs: Vec<Vec<u8>> = [0, 1, 10, size - 1, size + 5, 3, 7]
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect())
            .collect();
        let copies: Vec<Bytes> = inputs.iter().map(|b| chunks.copy(b)).collect();
        drop(chunks);
        for (copy, input) in copies.iter().zip(&inputs) {
            assert_eq!(&copy[..], &input[..]);
        }
        // 1 and 10 bytes follow each other in one chunk.
        assert_eq!(copies[1].as_ptr().wrapping_add(1), copies[2].as_ptr());
        // 3 and 7 bytes after a string longer than a chunk: a fresh chunk.
        assert_eq!(copies[5].as_ptr().wrapping_add(3), copies[6].as_ptr());
        assert_ne!(
            copies[4].as_ptr().wrapping_add(size + 5),
            copies[5].as_ptr()
        );
    }
}
