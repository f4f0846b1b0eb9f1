//! EmbeddingGemma: the encoder and the sentence head.

mod attention;
mod batch;
#[cfg(target_arch = "x86_64")]
mod bf16_gemm;
mod cpu_kernels;
mod encoder;
mod head;
mod layers;

pub use encoder::Encoder;
pub use head::{normalize, SentenceHead};
pub use layers::Placement;
