//! Time units and fixed windows, exactly as envoyproxy/ratelimit computes them:
//! windows are aligned to the Unix epoch, MONTH is 30 days and YEAR 365 days.

use std::fmt;

/// The unit of a rate limit. Numbers match `RateLimitResponse.RateLimit.Unit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Unit {
    /// One second.
    Second,
    /// 60 seconds.
    Minute,
    /// 3600 seconds.
    Hour,
    /// 86 400 seconds.
    Day,
    /// 30 days (not a calendar month, as upstream).
    Month,
    /// 365 days (not a calendar year, as upstream).
    Year,
    /// 7 days.
    Week,
}

impl Unit {
    /// Every unit, in wire-number order.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Month,
        Unit::Year,
        Unit::Week,
    ];

    /// Window length in seconds.
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 7 * 86_400,
            Unit::Month => 30 * 86_400,
            Unit::Year => 365 * 86_400,
        }
    }

    /// The enum number on the wire (`RateLimitResponse.RateLimit.Unit`).
    pub const fn wire(self) -> i32 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 2,
            Unit::Hour => 3,
            Unit::Day => 4,
            Unit::Month => 5,
            Unit::Year => 6,
            Unit::Week => 7,
        }
    }

    /// The unit for a wire number; `None` for UNKNOWN (0) or any unknown number.
    pub const fn from_wire(n: i32) -> Option<Unit> {
        Some(match n {
            1 => Unit::Second,
            2 => Unit::Minute,
            3 => Unit::Hour,
            4 => Unit::Day,
            5 => Unit::Month,
            6 => Unit::Year,
            7 => Unit::Week,
            _ => return None,
        })
    }

    /// Parses a config unit name, case-insensitively (`second`, `MINUTE`, ...).
    pub fn parse(name: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(name))
    }

    /// The lower-case config name.
    pub const fn name(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Month => "month",
            Unit::Year => "year",
            Unit::Week => "week",
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fixed window: `[start, end)` in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First second of the window.
    pub start: u64,
    /// First second after the window.
    pub end: u64,
}

impl Window {
    /// The epoch-aligned window of `unit` that contains `now` (Unix seconds).
    pub const fn containing(unit: Unit, now: u64) -> Window {
        let len = unit.seconds();
        let start = now / len * len;
        Window {
            start,
            end: start.saturating_add(len),
        }
    }

    /// Seconds from `now` until the window ends (`divider - now % divider` upstream).
    pub const fn until_end(&self, now: u64) -> u64 {
        self.end.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_epoch_aligned() {
        let cases = [
            (Unit::Second, 1_000_000_007, 1_000_000_007, 1),
            (Unit::Minute, 125, 120, 55),
            (Unit::Minute, 120, 120, 60),
            (Unit::Hour, 7_199, 3_600, 1),
            (Unit::Day, 86_400 * 3 + 5, 86_400 * 3, 86_395),
            (Unit::Week, 604_800 + 1, 604_800, 604_799),
            (Unit::Month, 2_592_000 * 2 + 10, 2_592_000 * 2, 2_591_990),
            (Unit::Year, 31_536_000 + 1, 31_536_000, 31_535_999),
        ];
        for (unit, now, start, until) in cases {
            let w = Window::containing(unit, now);
            assert_eq!(w.start, start, "{unit} at {now}");
            assert_eq!(w.end, start + unit.seconds(), "{unit} at {now}");
            assert_eq!(w.until_end(now), until, "{unit} at {now}");
        }
    }

    #[test]
    fn unit_names_and_wire_numbers_round_trip() {
        for u in Unit::ALL {
            assert_eq!(Unit::from_wire(u.wire()), Some(u));
            assert_eq!(Unit::parse(&u.name().to_uppercase()), Some(u));
        }
        assert_eq!(Unit::from_wire(0), None);
        assert_eq!(Unit::from_wire(99), None);
        assert_eq!(Unit::from_wire(-1), None);
        assert_eq!(Unit::parse("fortnight"), None);
        assert_eq!(Unit::parse(""), None);
    }
}
