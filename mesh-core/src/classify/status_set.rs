//! Sets of HTTP status codes, written as `429`, `"5xx"` or `"500-504"`.

use std::fmt;
use std::str::FromStr;

use http::StatusCode;

/// A set of HTTP status codes (100–599) as a bitmap, so membership is a shift and a mask.
///
/// Written as a list whose entries are a code (`429`), a class (`"5xx"`) or an inclusive
/// range (`"500-504"`); as a string the entries are separated by commas.
///
/// ```
/// use http::StatusCode;
/// use mesh_core::classify::StatusSet;
///
/// let set: StatusSet = "5xx, 429".parse()?;
/// assert!(set.contains(StatusCode::TOO_MANY_REQUESTS));
/// assert!(set.contains(StatusCode::BAD_GATEWAY));
/// assert!(!set.contains(StatusCode::NOT_FOUND));
/// assert_eq!(set.to_string(), "429,500-599");
/// # Ok::<(), mesh_core::classify::StatusSetError>(())
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct StatusSet([u64; 8]);

const MIN: u16 = 100;
const MAX: u16 = 599;

impl StatusSet {
    /// The empty set.
    pub const EMPTY: StatusSet = StatusSet([0; 8]);
    /// 500–599.
    pub const SERVER_ERRORS: StatusSet = StatusSet::EMPTY.with_range(500, 599);
    /// 429 alone.
    pub const TOO_MANY_REQUESTS: StatusSet = StatusSet::EMPTY.with_range(429, 429);

    /// The set with `lo..=hi` added; codes outside 100–599 are ignored.
    pub const fn with_range(mut self, lo: u16, hi: u16) -> StatusSet {
        let mut code = if lo < MIN { MIN } else { lo };
        while code <= hi && code <= MAX {
            let i = (code - MIN) as usize;
            self.0[i / 64] |= 1 << (i % 64);
            code += 1;
        }
        self
    }

    /// Whether `status` is in the set.
    pub fn contains(&self, status: StatusCode) -> bool {
        self.contains_u16(status.as_u16())
    }

    fn contains_u16(&self, code: u16) -> bool {
        if !(MIN..=MAX).contains(&code) {
            return false;
        }
        let i = usize::from(code - MIN);
        self.0[i / 64] & (1 << (i % 64)) != 0
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == [0; 8]
    }

    /// The codes in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (MIN..=MAX).filter(|c| self.contains_u16(*c))
    }

    fn add_entry(self, entry: &str) -> Result<StatusSet, StatusSetError> {
        let entry = entry.trim();
        let invalid = || StatusSetError(entry.to_owned());
        let code = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|c| (MIN..=MAX).contains(c))
                .ok_or_else(invalid)
        };
        if let Some(class) = entry
            .strip_suffix("xx")
            .or_else(|| entry.strip_suffix("XX"))
        {
            return match class {
                "1" | "2" | "3" | "4" | "5" => {
                    let lo = code(&format!("{class}00"))?;
                    Ok(self.with_range(lo, lo + 99))
                }
                _ => Err(invalid()),
            };
        }
        match entry.split_once('-') {
            Some((lo, hi)) => {
                let (lo, hi) = (code(lo)?, code(hi)?);
                if lo > hi {
                    return Err(invalid());
                }
                Ok(self.with_range(lo, hi))
            }
            None => {
                let c = code(entry)?;
                Ok(self.with_range(c, c))
            }
        }
    }
}

/// An entry that is not a status code, class or range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid status `{0}`: expected a code from 100 to 599, a class such as \"5xx\", or a range such as \"500-504\""
)]
pub struct StatusSetError(String);

impl FromStr for StatusSet {
    type Err = StatusSetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.split(',')
            .filter(|e| !e.trim().is_empty())
            .try_fold(StatusSet::EMPTY, StatusSet::add_entry)
    }
}

impl fmt::Display for StatusSet {
    /// Ranges compressed: `429,500-599`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut codes = self.iter().peekable();
        while let Some(lo) = codes.next() {
            let mut hi = lo;
            while codes.peek() == Some(&(hi + 1)) {
                hi += 1;
                codes.next();
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StatusSet({self})")
    }
}

impl serde::Serialize for StatusSet {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.to_string().split(',').filter(|s| !s.is_empty()))
    }
}

impl<'de> serde::Deserialize<'de> for StatusSet {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Entry {
            Code(u16),
            Text(String),
        }
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<Entry>),
            Text(String),
        }
        let form = Form::deserialize(deserializer).map_err(|_| {
            serde::de::Error::custom(
                "expected a list of status codes, classes (\"5xx\") or ranges (\"500-504\")",
            )
        })?;
        let result = match form {
            Form::Text(s) => s.parse(),
            Form::List(entries) => {
                entries
                    .into_iter()
                    .try_fold(StatusSet::EMPTY, |set, e| match e {
                        Entry::Code(c) => set.add_entry(&c.to_string()),
                        Entry::Text(s) => set.add_entry(&s),
                    })
            }
        };
        result.map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_entries() {
        let s: StatusSet = "4xx,500-502, 599".parse().unwrap();
        assert_eq!(s.to_string(), "400-502,599");
        assert!(s.contains(StatusCode::from_u16(400).unwrap()));
        assert!(s.contains(StatusCode::from_u16(502).unwrap()));
        assert!(!s.contains(StatusCode::from_u16(503).unwrap()));
        assert!("".parse::<StatusSet>().unwrap().is_empty());
        for bad in ["6xx", "99", "600", "abc", "502-500", "5x", "-", "500-"] {
            let e = bad.parse::<StatusSet>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("100 to 599"), "{bad}: {e}");
        }
    }

    #[test]
    fn deserializes_lists_and_strings() {
        #[derive(serde::Deserialize, serde::Serialize)]
        struct T {
            s: StatusSet,
        }
        let t: T = toml::from_str(r#"s = [429, "5xx", "400-401"]"#).unwrap();
        assert_eq!(t.s.to_string(), "400-401,429,500-599");
        let back: T = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
        assert_eq!(back.s, t.s);
        let t: T = toml::from_str(r#"s = "429""#).unwrap();
        assert_eq!(t.s, StatusSet::TOO_MANY_REQUESTS);
        let e = toml::from_str::<T>(r#"s = [700]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("invalid status `700`"), "{e}");
    }

    proptest! {
        #[test]
        fn display_round_trips(ranges in prop::collection::vec((100u16..600, 0u16..50), 0..6)) {
            let set = ranges.iter().fold(StatusSet::EMPTY, |s, (lo, len)| s.with_range(*lo, lo + len));
            prop_assert_eq!(set.to_string().parse::<StatusSet>().unwrap(), set);
            for (lo, len) in ranges {
                for c in lo..=(lo + len).min(599) {
                    prop_assert!(set.contains(StatusCode::from_u16(c).unwrap()));
                }
            }
        }

        #[test]
        fn never_panics(s in "\\PC{0,30}") {
            let _ = s.parse::<StatusSet>();
        }
    }
}
