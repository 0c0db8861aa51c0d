//! The ranges of the numeric options: each check is a clap value parser (every
//! program's numeric flags are checked when parsed) and the library checks the
//! options it is given with the same functions, so that a NaN, an infinity or a
//! meaningless value never reaches a model or a stage key (where NaN and infinity
//! would both be written as `null`).

/// A range a number must be in: its test, and what the error says of a number
/// outside it.
#[derive(Clone, Copy, Debug)]
pub struct Range {
    ok: fn(f64) -> bool,
    says: &'static str,
}

/// Above 0 (learning rates, temperatures, epsilons).
pub const POSITIVE: Range = Range {
    ok: |x| x > 0.0,
    says: "must be above 0",
};
/// At least 0 (loss coefficients).
pub const NON_NEGATIVE: Range = Range {
    ok: |x| x >= 0.0,
    says: "must be at least 0",
};
/// A probability mass in (0, 1] (top-p).
pub const UNIT_FRACTION: Range = Range {
    ok: |x| x > 0.0 && x <= 1.0,
    says: "must be in (0, 1]",
};
/// A time limit in seconds, above 0 and at most a year (longer ones cannot be slept).
pub const SECONDS: Range = Range {
    ok: |x| x > 0.0 && x <= 365.0 * 24.0 * 3600.0,
    says: "must be above 0 seconds and at most a year",
};
/// Events per second, at least one an hour (so that the wait between two can be
/// slept).
pub const RATE: Range = Range {
    ok: |x| x >= 1.0 / 3600.0,
    says: "must be at least one an hour (1/3600 a second)",
};

/// `x` if it is finite and in `range`, else the message that says why, with `shown`
/// standing for the number.
fn within(x: f64, shown: &str, range: Range) -> Result<f64, String> {
    if !x.is_finite() {
        Err(format!("`{shown}` is not a finite number"))
    } else if (range.ok)(x) {
        Ok(x)
    } else {
        Err(format!("{shown} {}", range.says))
    }
}

/// Parses a number flag in `range`.
fn parse_in(s: &str, range: Range) -> Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))?;
    within(x, s, range)
}

/// The value parser of a flag in [`POSITIVE`].
pub fn positive(s: &str) -> Result<f64, String> {
    parse_in(s, POSITIVE)
}

/// The value parser of a flag in [`NON_NEGATIVE`].
pub fn non_negative(s: &str) -> Result<f64, String> {
    parse_in(s, NON_NEGATIVE)
}

/// The value parser of a flag in [`UNIT_FRACTION`].
pub fn unit_fraction(s: &str) -> Result<f64, String> {
    parse_in(s, UNIT_FRACTION)
}

/// The value parser of a flag in [`SECONDS`].
pub fn seconds(s: &str) -> Result<f64, String> {
    parse_in(s, SECONDS)
}

/// The value parser of a flag in [`RATE`].
pub fn rate(s: &str) -> Result<f64, String> {
    parse_in(s, RATE)
}

/// A count of at least 1 (batch sizes, steps, token budgets).
pub fn count(s: &str) -> Result<usize, String> {
    let n: usize = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a whole number"))?;
    if n >= 1 {
        Ok(n)
    } else {
        Err(format!("{s} must be at least 1"))
    }
}

/// As [`count`], as u32.
pub fn count_u32(s: &str) -> Result<u32, String> {
    u32::try_from(count(s)?).map_err(|_| format!("{s} is too large"))
}

/// As [`count`], as u64.
pub fn count_u64(s: &str) -> Result<u64, String> {
    Ok(count(s)? as u64)
}

/// The most reward quantiles a pool may be cut into: each is a token of the model's
/// vocabulary and an embedding row.
pub const MAX_QUANTILES: u32 = 256;

/// A number of reward quantiles K, 1..=[`MAX_QUANTILES`].
pub fn quantiles(s: &str) -> Result<u32, String> {
    let k = count_u32(s)?;
    if k <= MAX_QUANTILES {
        Ok(k)
    } else {
        Err(format!("{s} is more than {MAX_QUANTILES} quantiles"))
    }
}

/// Checks a library option the programs' parsers already check: for callers of the
/// library that build options themselves (a non-finite number would also be written
/// as `null` in a stage key, where NaN and infinity would collide).
pub fn check(name: &str, value: f64, range: Range) -> anyhow::Result<()> {
    within(value, &value.to_string(), range).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(())
}
