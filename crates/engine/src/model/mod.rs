//! EmbeddingGemma: the encoder and the sentence head.

mod attention;
mod batch;
mod cpu_kernels;
mod encoder;
mod head;
mod layers;

pub use encoder::Encoder;
pub use head::{normalize, SentenceHead};
pub use layers::Placement;
