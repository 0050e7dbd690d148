//! Serde helpers for types written as strings (`FromStr` + `Display`).

use std::fmt::Display;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serializer};

/// Deserializes a string through `T::from_str`, keeping the parser's message.
pub(crate) fn deserialize<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: Display,
{
    let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    s.parse().map_err(serde::de::Error::custom)
}

/// The same for an `Option`.
pub(crate) mod option {
    use super::*;

    pub(crate) fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr,
        T::Err: Display,
    {
        let s = <Option<std::borrow::Cow<'de, str>>>::deserialize(deserializer)?;
        s.map(|s| s.parse().map_err(serde::de::Error::custom))
            .transpose()
    }

    pub(crate) fn serialize<S: Serializer, T: Display>(
        value: &Option<T>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => serializer.collect_str(v),
            None => serializer.serialize_none(),
        }
    }
}

/// Durations written as humantime strings (`"250ms"`, `"10s"`, `"1m 30s"`).
pub(crate) mod duration {
    use std::time::Duration;

    use super::*;

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        let d = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format_args!(
                "invalid duration `{s}`: {e} (write e.g. \"250ms\", \"10s\", \"1m\")"
            ))
        })?;
        // Far past any timeout's use, and `Instant + d` would overflow (a panic where a
        // clock reading meets it).
        if d > MAX {
            return Err(serde::de::Error::custom(format_args!(
                "duration `{s}` is too long: at most 10 years (use \"0s\" where a key allows none)"
            )));
        }
        Ok(d)
    }

    /// The longest duration a configuration takes: 10 years (of 365.25 days, as humantime
    /// counts `10y`).
    pub(crate) const MAX: Duration = Duration::from_secs(10 * 31_557_600);

    pub(crate) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*value))
    }

    /// The same for an `Option`.
    pub(crate) mod option {
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Duration>, D::Error> {
            #[derive(Deserialize)]
            struct W(#[serde(deserialize_with = "super::deserialize")] Duration);
            Ok(<Option<W>>::deserialize(deserializer)?.map(|W(d)| d))
        }

        pub(crate) fn serialize<S: Serializer>(
            value: &Option<Duration>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match value {
                Some(d) => super::serialize(d, serializer),
                None => serializer.serialize_none(),
            }
        }
    }
}
