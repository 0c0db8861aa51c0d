//! The ranges of the numeric options: each check is a clap value parser (every
//! program's numeric flags are checked when parsed) and the library checks the
//! options it is given with the same functions, so that a NaN, an infinity or a
//! meaningless value never reaches a model or a stage key (where NaN and infinity
//! would both be written as `null`).

fn number<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number"))
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = number(s)?;
    if x.is_finite() {
        Ok(x)
    } else {
        Err(format!("`{s}` is not a finite number"))
    }
}

/// A finite number above 0 (learning rates, temperatures, rates, time limits).
pub fn positive(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x > 0.0 {
        Ok(x)
    } else {
        Err(format!("{s} must be above 0"))
    }
}

/// A finite number of at least 0 (loss coefficients).
pub fn non_negative(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x >= 0.0 {
        Ok(x)
    } else {
        Err(format!("{s} must be at least 0"))
    }
}

/// A probability mass in (0, 1] (top-p).
pub fn unit_fraction(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x > 0.0 && x <= 1.0 {
        Ok(x)
    } else {
        Err(format!("{s} must be in (0, 1]"))
    }
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
pub fn check(name: &str, value: f64, parse: fn(&str) -> Result<f64, String>) -> anyhow::Result<()> {
    parse(&value.to_string()).map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    Ok(())
}

/// The longest wait a time flag may ask for (a year): longer ones cannot be slept.
pub const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// A time limit in seconds: above 0 and at most [`MAX_SECONDS`].
pub fn seconds(s: &str) -> Result<f64, String> {
    let x = positive(s)?;
    if x <= MAX_SECONDS {
        Ok(x)
    } else {
        Err(format!("{s} seconds is more than a year"))
    }
}

/// A rate in events per second: at least one an hour, so that the time between two
/// events can be waited for.
pub fn rate(s: &str) -> Result<f64, String> {
    let x = positive(s)?;
    if x >= 1.0 / 3600.0 {
        Ok(x)
    } else {
        Err(format!("{s} a second is less than one an hour"))
    }
}
