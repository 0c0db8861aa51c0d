//! End-to-end tests: the real programs spawned in their own work folders, their
//! stdout, stderr, exit codes and files asserted; DuckDB reading what they write.

mod util;

mod bad_input;
mod bin;
mod duckdb;
mod quark_loop;
mod sample;
mod score;
