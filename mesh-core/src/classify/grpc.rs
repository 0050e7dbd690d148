//! gRPC status codes and the gRPC headers the mesh reads and writes.
//!
//! - `grpc-status`: a decimal [`Code`]; values outside 0–16 are `UNKNOWN`, as the gRPC
//!   specification says.
//! - `grpc-retry-pushback-ms` (gRFC A6): a non-negative integer is the delay the server
//!   asks for before a retry; a negative value means *do not retry*. [`parse_pushback`]
//!   returns an error for anything else, which A6 also treats as "do not retry".
//! - `grpc-timeout` (gRPC over HTTP/2): 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`,
//!   `u`, `n`). [`parse_timeout`] reads it; [`encode_timeout`] writes a deadline in the
//!   finest unit whose value fits in 8 digits, rounding up so that a propagated deadline is
//!   never shortened by the encoding.
//!
//! All parsers are pure and bounded: they look at no more than a few dozen bytes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use http::HeaderValue;

use super::HeaderError;

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $n:literal, $text:literal;)*) => {
        /// A gRPC status code.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)]
        #[repr(u8)]
        pub enum Code {
            $($(#[$doc])* $name = $n,)*
        }

        impl Code {
            /// The code for a numeric value; values outside 0–16 are `Unknown`.
            pub const fn from_i32(n: i32) -> Code {
                match n {
                    $($n => Code::$name,)*
                    _ => Code::Unknown,
                }
            }

            /// The canonical upper-case name (`RESOURCE_EXHAUSTED`).
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Code::$name => $text,)*
                }
            }

            /// Every code, in numeric order.
            pub const ALL: [Code; 17] = [$(Code::$name,)*];
        }
    };
}

codes! {
    Ok = 0, "OK";
    Cancelled = 1, "CANCELLED";
    Unknown = 2, "UNKNOWN";
    InvalidArgument = 3, "INVALID_ARGUMENT";
    DeadlineExceeded = 4, "DEADLINE_EXCEEDED";
    NotFound = 5, "NOT_FOUND";
    AlreadyExists = 6, "ALREADY_EXISTS";
    PermissionDenied = 7, "PERMISSION_DENIED";
    ResourceExhausted = 8, "RESOURCE_EXHAUSTED";
    FailedPrecondition = 9, "FAILED_PRECONDITION";
    Aborted = 10, "ABORTED";
    OutOfRange = 11, "OUT_OF_RANGE";
    Unimplemented = 12, "UNIMPLEMENTED";
    Internal = 13, "INTERNAL";
    Unavailable = 14, "UNAVAILABLE";
    DataLoss = 15, "DATA_LOSS";
    Unauthenticated = 16, "UNAUTHENTICATED";
}

impl Code {
    /// The code a gRPC client reports for an answer with HTTP status `status` and no
    /// `grpc-status` (gRPC's HTTP to gRPC status code mapping: 400 `INTERNAL`, 401
    /// `UNAUTHENTICATED`, 403 `PERMISSION_DENIED`, 404 `UNIMPLEMENTED`, 429, 502, 503 and
    /// 504 `UNAVAILABLE`, any other `UNKNOWN`).
    pub const fn for_http_status(status: u16) -> Code {
        match status {
            400 => Code::Internal,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::Unimplemented,
            429 | 502 | 503 | 504 => Code::Unavailable,
            _ => Code::Unknown,
        }
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a gRPC status code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown gRPC status code `{0}` (expected a name such as UNAVAILABLE or a number 0-16)")]
pub struct UnknownCode(String);

impl FromStr for Code {
    type Err = UnknownCode;

    /// Parses a name in any case (`UNAVAILABLE`, `unavailable`, `Unavailable`) or a number
    /// from 0 to 16.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(n) = s.parse::<u8>() {
            return Code::ALL
                .get(usize::from(n))
                .copied()
                .ok_or_else(|| UnknownCode(s.to_owned()));
        }
        let normalized = s.trim().replace(['-', ' '], "_");
        Code::ALL
            .into_iter()
            .find(|c| {
                c.as_str().eq_ignore_ascii_case(&normalized)
                    || c.as_str()
                        .replace('_', "")
                        .eq_ignore_ascii_case(&normalized)
            })
            .ok_or_else(|| UnknownCode(s.to_owned()))
    }
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Code {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        crate::serde_str::deserialize(deserializer)
    }
}

/// A set of gRPC codes: a 17-bit mask, so membership is one instruction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The empty set.
    pub const EMPTY: CodeSet = CodeSet(0);

    /// A set of the given codes.
    pub const fn of(codes: &[Code]) -> CodeSet {
        let mut bits = 0;
        let mut i = 0;
        while i < codes.len() {
            bits |= 1 << codes[i] as u32;
            i += 1;
        }
        CodeSet(bits)
    }

    /// Whether `code` is in the set.
    pub const fn contains(self, code: Code) -> bool {
        self.0 & (1 << code as u32) != 0
    }

    /// The set with `code` added.
    pub const fn with(self, code: Code) -> CodeSet {
        CodeSet(self.0 | 1 << code as u32)
    }

    /// The codes in the set, in numeric order.
    pub fn iter(self) -> impl Iterator<Item = Code> {
        Code::ALL.into_iter().filter(move |c| self.contains(*c))
    }
}

impl FromIterator<Code> for CodeSet {
    fn from_iter<I: IntoIterator<Item = Code>>(iter: I) -> Self {
        iter.into_iter().fold(CodeSet::EMPTY, CodeSet::with)
    }
}

impl serde::Serialize for CodeSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for CodeSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(<Vec<Code>>::deserialize(deserializer)?
            .into_iter()
            .collect())
    }
}

/// Reads a `grpc-status` value. Numbers outside 0–16 are `UNKNOWN`; anything that is not
/// a number of at most 10 digits is an error.
pub fn parse_status(value: &HeaderValue) -> Result<Code, HeaderError> {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > 10 || !bytes.iter().all(u8::is_ascii_digit) {
        return Err(HeaderError::new(
            "grpc-status",
            bytes,
            "not a decimal status code",
        ));
    }
    let n = bytes
        .iter()
        .fold(0i64, |acc, b| acc * 10 + i64::from(b - b'0'));
    Ok(i32::try_from(n).map_or(Code::Unknown, Code::from_i32))
}

/// What a server said with `grpc-retry-pushback-ms`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pushback {
    /// Retry no sooner than after this delay.
    After(Duration),
    /// Do not retry this request (a negative value).
    DoNotRetry,
}

/// Reads a `grpc-retry-pushback-ms` value, capping the delay at `cap`.
///
/// ```
/// use http::HeaderValue;
/// use mesh_core::classify::grpc::{parse_pushback, Pushback};
/// use std::time::Duration;
///
/// let cap = Duration::from_secs(30);
/// let p = |v| parse_pushback(&HeaderValue::from_static(v), cap);
/// assert_eq!(p("250")?, Pushback::After(Duration::from_millis(250)));
/// assert_eq!(p("-1")?, Pushback::DoNotRetry);
/// assert_eq!(p("99999999999")?, Pushback::After(cap));
/// assert!(p("1s").is_err());
/// # Ok::<(), mesh_core::classify::HeaderError>(())
/// ```
pub fn parse_pushback(value: &HeaderValue, cap: Duration) -> Result<Pushback, HeaderError> {
    let bytes = value.as_bytes();
    let invalid = || HeaderError::new("grpc-retry-pushback-ms", bytes, "not an integer");
    let (negative, digits) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid());
    }
    if negative {
        return Ok(Pushback::DoNotRetry);
    }
    let ms = digits.iter().fold(0u64, |acc, b| {
        acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    });
    Ok(Pushback::After(Duration::from_millis(ms).min(cap)))
}

/// The largest value `grpc-timeout` can carry: 8 digits.
const MAX_TIMEOUT_VALUE: u64 = 99_999_999;

/// Units from finest to coarsest, with their length in nanoseconds.
const UNITS: [(u8, u64); 6] = [
    (b'n', 1),
    (b'u', 1_000),
    (b'm', 1_000_000),
    (b'S', 1_000_000_000),
    (b'M', 60_000_000_000),
    (b'H', 3_600_000_000_000),
];

/// Reads a `grpc-timeout` value such as `100m` (100 ms) or `5S`.
///
/// ```
/// use http::HeaderValue;
/// use mesh_core::classify::grpc::parse_timeout;
/// use std::time::Duration;
///
/// assert_eq!(parse_timeout(&HeaderValue::from_static("100m"))?, Duration::from_millis(100));
/// assert_eq!(parse_timeout(&HeaderValue::from_static("2H"))?, Duration::from_secs(7200));
/// assert!(parse_timeout(&HeaderValue::from_static("123456789S")).is_err()); // 9 digits
/// # Ok::<(), mesh_core::classify::HeaderError>(())
/// ```
pub fn parse_timeout(value: &HeaderValue) -> Result<Duration, HeaderError> {
    let bytes = value.as_bytes();
    let invalid = |reason| HeaderError::new("grpc-timeout", bytes, reason);
    let Some((unit, digits)) = bytes.split_last() else {
        return Err(invalid("empty"));
    };
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(invalid("expected 1 to 8 digits followed by a unit"));
    }
    let Some(&(_, nanos_per)) = UNITS.iter().find(|(u, _)| u == unit) else {
        return Err(invalid("unit is not one of H, M, S, m, u, n"));
    };
    let n = digits
        .iter()
        .fold(0u64, |acc, b| acc * 10 + u64::from(b - b'0'));
    // At most 99_999_999 hours: ~3.6e20 ns overflows u64, so go through u128.
    let nanos = u128::from(n) * u128::from(nanos_per);
    let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder of a division by 1e9 always fits in u32.
    let sub = (nanos % 1_000_000_000) as u32;
    Ok(Duration::new(secs, sub))
}

/// Writes `timeout` as a `grpc-timeout` value: the finest unit whose count fits in 8
/// digits, rounded up. Timeouts beyond 99,999,999 hours are written as that maximum.
///
/// ```
/// use mesh_core::classify::grpc::encode_timeout;
/// use std::time::Duration;
///
/// assert_eq!(encode_timeout(Duration::from_millis(100)), "100000u");
/// assert_eq!(encode_timeout(Duration::from_secs(3600)), "3600000m");
/// assert_eq!(encode_timeout(Duration::from_nanos(1_500_000_001)), "1500001u"); // rounded up
/// ```
pub fn encode_timeout(timeout: Duration) -> HeaderValue {
    let nanos = timeout.as_nanos();
    let (unit, count) = UNITS
        .iter()
        .map(|&(unit, per)| (unit, nanos.div_ceil(u128::from(per))))
        .find(|&(_, count)| count <= u128::from(MAX_TIMEOUT_VALUE))
        .unwrap_or((b'H', u128::from(MAX_TIMEOUT_VALUE)));
    let mut buf = count.to_string().into_bytes();
    buf.push(unit);
    // Digits and an ASCII letter are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("99999999H"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn code_names_and_numbers() {
        for (i, c) in Code::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i);
            assert_eq!(Code::from_i32(i as i32), c);
            assert_eq!(c.as_str().parse::<Code>().unwrap(), c);
            assert_eq!(i.to_string().parse::<Code>().unwrap(), c);
        }
        assert_eq!(
            "resource_exhausted".parse::<Code>().unwrap(),
            Code::ResourceExhausted
        );
        assert_eq!(
            "ResourceExhausted".parse::<Code>().unwrap(),
            Code::ResourceExhausted
        );
        assert_eq!(Code::from_i32(17), Code::Unknown);
        assert_eq!(Code::from_i32(-1), Code::Unknown);
        let e = "UNAVAILIBLE".parse::<Code>().unwrap_err().to_string();
        assert!(e.contains("UNAVAILIBLE") && e.contains("0-16"), "{e}");
        assert!("17".parse::<Code>().is_err());
    }

    #[test]
    fn code_sets() {
        let s = CodeSet::of(&[Code::Unavailable, Code::Internal]);
        assert!(s.contains(Code::Unavailable) && s.contains(Code::Internal));
        assert!(!s.contains(Code::Ok));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [Code::Internal, Code::Unavailable]
        );
        #[derive(serde::Deserialize)]
        struct T {
            s: CodeSet,
        }
        let t: T = toml::from_str(r#"s = ["unavailable", "DATA_LOSS", "4"]"#).unwrap();
        assert_eq!(
            t.s,
            CodeSet::of(&[Code::Unavailable, Code::DataLoss, Code::DeadlineExceeded])
        );
    }

    #[test]
    fn status_header() {
        let p = |v: &'static str| parse_status(&HeaderValue::from_static(v));
        assert_eq!(p("0").unwrap(), Code::Ok);
        assert_eq!(p("14").unwrap(), Code::Unavailable);
        assert_eq!(p("99").unwrap(), Code::Unknown);
        assert_eq!(p("9999999999").unwrap(), Code::Unknown);
        for bad in ["", "-1", "OK", "1 ", "99999999999"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn timeout_units() {
        let p = |v: &'static str| parse_timeout(&HeaderValue::from_static(v)).unwrap();
        assert_eq!(p("1n"), Duration::from_nanos(1));
        assert_eq!(p("1u"), Duration::from_micros(1));
        assert_eq!(p("1m"), Duration::from_millis(1));
        assert_eq!(p("1S"), Duration::from_secs(1));
        assert_eq!(p("1M"), Duration::from_secs(60));
        assert_eq!(p("99999999H"), Duration::from_secs(99_999_999 * 3600));
        for bad in ["", "S", "1", "1s", "1h", "-1S", "1.5S", "123456789n", " 1S"] {
            let e = parse_timeout(&HeaderValue::from_static(bad))
                .unwrap_err()
                .to_string();
            assert!(e.starts_with("invalid grpc-timeout"), "{bad:?}: {e}");
        }
        assert_eq!(encode_timeout(Duration::ZERO), "0n");
        assert_eq!(
            encode_timeout(Duration::from_nanos(99_999_999)),
            "99999999n"
        );
        assert_eq!(encode_timeout(Duration::from_nanos(100_000_000)), "100000u");
        assert_eq!(encode_timeout(Duration::MAX), "99999999H");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes) {
                let _ = parse_timeout(&v);
                let _ = parse_status(&v);
                if let Ok(Pushback::After(d)) = parse_pushback(&v, Duration::from_secs(5)) {
                    prop_assert!(d <= Duration::from_secs(5));
                }
            }
        }

        #[test]
        fn encoded_timeouts_parse_back_never_shorter(nanos in any::<u64>(), secs in 0u64..=99_999_999 * 3600) {
            for d in [Duration::from_nanos(nanos), Duration::from_secs(secs)] {
                let back = parse_timeout(&encode_timeout(d)).unwrap();
                prop_assert!(back >= d, "{d:?} -> {back:?}");
                // Exact when the value fits in 8 digits of nanoseconds; otherwise the
                // error is under one unit, which is under 1/10^5 of the value.
                let err = (back - d).as_nanos();
                prop_assert!(err == 0 || err * 100_000 <= d.as_nanos(), "{d:?} -> {back:?}");
            }
        }

        #[test]
        fn pushback_round_trips(ms in any::<u32>()) {
            let v = HeaderValue::from_str(&ms.to_string()).unwrap();
            prop_assert_eq!(
                parse_pushback(&v, Duration::MAX).unwrap(),
                Pushback::After(Duration::from_millis(u64::from(ms)))
            );
            let neg = HeaderValue::from_str(&format!("-{ms}")).unwrap();
            prop_assert_eq!(parse_pushback(&neg, Duration::MAX).unwrap(), Pushback::DoNotRetry);
        }
    }
}
