//! quark: Quantized Reward Konditioning (Lu et al., NeurIPS 2022) on libtorch.
//!
//! The library behind the `quark-*` programs. Each stage of the loop (sample, score,
//! bin, fit, eval) is a function here over files whose tables [`schema`] defines;
//! [`stage`], the floor that uses nothing else of the crate, makes every output
//! content-hashed and atomic. [`model`] runs the networks (one file per
//! architecture) where [`device`] says; [`gguf`] imports the default model; [`check`]
//! holds the ranges of the numeric options and [`cli`] what every program does
//! around its one call; [`home`] finds the assets; [`rng`] is the seeded generator. The programs in `bins/` only
//! parse flags and call in.

pub mod allocator;
pub mod check;
pub mod cli;
pub mod device;
pub mod eval;
pub mod fit;
pub mod gguf;
pub mod home;
pub mod model;
pub mod pool;
pub mod progress;
pub mod prompts;
pub mod rng;
pub mod sample;
pub mod schema;
pub mod score;
pub mod stage;
#[doc(hidden)]
pub mod testing;
