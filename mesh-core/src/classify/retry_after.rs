//! The HTTP `Retry-After` header (RFC 9110 §10.2.3).
//!
//! The value is either *delta-seconds* (`120`) or an *HTTP-date*
//! (`Fri, 31 Dec 1999 23:59:59 GMT`, and the obsolete RFC 850 and asctime forms). The
//! parser is pure and bounded: it refuses values longer than [`MAX_LEN`] bytes before
//! looking at them, saturates huge delta-seconds instead of overflowing, turns a date in
//! the past into zero, and caps the result so that a server cannot park a client for
//! hours.

use std::time::{Duration, SystemTime};

use http::HeaderValue;

use super::HeaderError;

/// The longest `Retry-After` value the parser looks at, in bytes. An IMF-fixdate is 29.
pub const MAX_LEN: usize = 64;

/// Parses a `Retry-After` value into a delay from `now`, at most `cap`.
///
/// ```
/// use http::HeaderValue;
/// use mesh_core::classify::retry_after;
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
///
/// let cap = Duration::from_secs(60);
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_777);
/// let delay = |v: &'static str| retry_after::parse(&HeaderValue::from_static(v), now, cap);
/// assert_eq!(delay("2")?, Duration::from_secs(2));
/// assert_eq!(delay("86400")?, cap);
/// assert_eq!(delay("Sun, 06 Nov 1994 08:49:47 GMT")?, Duration::from_secs(10));
/// assert_eq!(delay("Sun, 06 Nov 1994 08:49:00 GMT")?, Duration::ZERO); // in the past
/// assert!(delay("soon").is_err());
/// # Ok::<(), mesh_core::classify::HeaderError>(())
/// ```
pub fn parse(value: &HeaderValue, now: SystemTime, cap: Duration) -> Result<Duration, HeaderError> {
    let invalid = |reason| HeaderError::new("Retry-After", value.as_bytes(), reason);
    if value.len() > MAX_LEN {
        return Err(invalid("longer than 64 bytes"));
    }
    let text = value
        .to_str()
        .map_err(|_| invalid("not visible ASCII"))?
        .trim_matches(|c| c == ' ' || c == '\t');
    if text.is_empty() {
        return Err(invalid("empty"));
    }
    let delay = if text.bytes().all(|b| b.is_ascii_digit()) {
        // delta-seconds: digits only; saturate rather than overflow.
        let secs = text.bytes().fold(0u64, |acc, b| {
            acc.saturating_mul(10).saturating_add(u64::from(b - b'0'))
        });
        Duration::from_secs(secs)
    } else if text.starts_with(|c: char| c.is_ascii_alphabetic()) {
        let at = httpdate::parse_http_date(text)
            .map_err(|_| invalid("neither delta-seconds nor an HTTP-date"))?;
        at.duration_since(now).unwrap_or(Duration::ZERO)
    } else {
        return Err(invalid("neither delta-seconds nor an HTTP-date"));
    };
    Ok(delay.min(cap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::UNIX_EPOCH;

    const CAP: Duration = Duration::from_secs(300);

    fn p(v: &[u8]) -> Result<Duration, HeaderError> {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // 08:49:37 6 Nov 1994
        parse(&HeaderValue::from_bytes(v).unwrap(), now, CAP)
    }

    #[test]
    fn delta_seconds() {
        assert_eq!(p(b"0").unwrap(), Duration::ZERO);
        assert_eq!(p(b" 7 ").unwrap(), Duration::from_secs(7));
        assert_eq!(p(b"299").unwrap(), Duration::from_secs(299));
        assert_eq!(p(b"301").unwrap(), CAP);
        assert_eq!(p(b"99999999999999999999999999999999").unwrap(), CAP);
    }

    #[test]
    fn http_dates_in_all_three_forms() {
        for v in [
            "Sun, 06 Nov 1994 08:49:47 GMT",
            "Sunday, 06-Nov-94 08:49:47 GMT",
            "Sun Nov  6 08:49:47 1994",
        ] {
            assert_eq!(p(v.as_bytes()).unwrap(), Duration::from_secs(10), "{v}");
        }
        assert_eq!(p(b"Mon, 07 Nov 1994 08:49:37 GMT").unwrap(), CAP);
    }

    #[test]
    fn refusals_name_the_header_and_reason() {
        for (v, why) in [
            (&b""[..], "empty"),
            (b"-1", "neither"),
            (b"1.5", "neither"),
            (b"+3", "neither"),
            (b"Sun, 32 Nov 1994 08:49:47 GMT", "neither"),
            (b"\xff", "not visible ASCII"),
            (&[b'1'; 65][..], "longer than 64 bytes"),
        ] {
            let e = p(v).unwrap_err().to_string();
            assert!(e.starts_with("invalid Retry-After"), "{e}");
            assert!(e.contains(why), "{v:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn never_panics_and_respects_the_cap(bytes in prop::collection::vec(0x20u8..0x7f, 0..80)) {
            if let Ok(v) = HeaderValue::from_bytes(&bytes)
                && let Ok(d) = parse(&v, SystemTime::now(), CAP)
            {
                prop_assert!(d <= CAP);
            }
        }

        #[test]
        fn delta_seconds_round_trip(secs in 0u64..1_000_000) {
            let v = HeaderValue::from_str(&secs.to_string()).unwrap();
            prop_assert_eq!(parse(&v, SystemTime::now(), CAP).unwrap(), Duration::from_secs(secs).min(CAP));
        }

        #[test]
        fn future_dates_round_trip(ahead in 0u64..600) {
            let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
            let date = httpdate::fmt_http_date(now + Duration::from_secs(ahead));
            let v = HeaderValue::from_str(&date).unwrap();
            prop_assert_eq!(parse(&v, now, CAP).unwrap(), Duration::from_secs(ahead).min(CAP));
        }
    }
}
