//! The library's integration tests, in one binary (each test binary links libtorch
//! again, which costs minutes on two cores): one module per part of the library,
//! and the helpers they share.

mod eval;
mod fit;
mod gguf;
mod keys;
mod model_parity;
mod pool;
mod prompts;
mod rowwise;
mod sample;
mod schema;
mod score_perplexity;
mod score_scorers;
mod score_toxicity;
mod score_util;
mod stage;
