//! quark: Quantized Reward Konditioning (Lu et al., NeurIPS 2022) on libtorch.
//!
//! The library behind the `quark-*` programs. Each stage of the loop (sample, score,
//! bin, fit, eval) is a function here over files whose tables [`schema`] defines;
//! [`stage`] makes every output content-hashed and atomic; the programs in `bins/`
//! only parse flags and call in.

pub mod cli;
pub mod eval;
pub mod fit;
pub mod gguf;
pub mod home;
pub mod model;
pub mod plot;
pub mod pool;
pub mod progress;
pub mod prompts;
pub mod sample;
pub mod schema;
pub mod score;
pub mod stage;
#[doc(hidden)]
pub mod testing;
