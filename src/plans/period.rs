//! Calendar periods for usage-plan quotas.
//!
//! A quota counts requests per calendar [`Period`] (a day, a week or a
//! month) in an IANA time zone, starting on an anchor day. A [`Calendar`]
//! bundles the period kind, the anchor and the time zone, and cuts time into
//! consecutive half-open [`Span`]s of Unix seconds.
//!
//! This module is pure: no I/O and no clock reads; every instant is an
//! argument. All calendar and time zone arithmetic is done by `jiff` with its
//! bundled tz database.
//!
//! # Boundaries
//!
//! Every period starts at the first instant of a local day (in the
//! calendar's time zone) and ends where the next period starts, so
//! consecutive periods tile time without gaps or overlaps. The first instant
//! of a local day is local midnight, except where the zone skips midnight
//! (for example `America/Santiago`, whose clocks jump from 00:00 to 01:00 on
//! the day daylight saving time starts): there it is the instant at which the
//! clocks jump into that day. Days therefore last 23 or 25 hours around
//! daylight saving time changes (23.5 or 24.5 in zones with 30 minute
//! changes), and a local date that a zone skips entirely (`Pacific/Apia`
//! skipped 2011-12-30) has an empty span.
//!
//! # Supported range
//!
//! Instants are clamped to 0002-01-01T00:00:00Z ..= 9998-12-31T23:59:59Z
//! and dates to 0001-01-01 ..= 9999-12-01 before any conversion, which keeps
//! every neighbouring period inside what `jiff` can represent. Within that
//! range the spans returned always contain the (clamped) instant; outside it
//! they are the spans of the clamped instant, and nothing panics.

use std::sync::atomic::{fence, AtomicI64, AtomicU64, Ordering};

use jiff::civil::{Date, Time};
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::Timestamp;

/// The earliest supported instant: 0002-01-01T00:00:00Z.
const MIN_SECOND: i64 = -62_104_060_800;
/// The latest supported instant: 9998-12-31T23:59:59Z.
const MAX_SECOND: i64 = 253_370_764_799;
/// The earliest supported local date. Local dates of supported instants are
/// never earlier (UTC offsets stay within 26 hours).
const MIN_DATE: Date = jiff::civil::date(1, 1, 1);
/// The latest supported local date. Local dates of supported instants are
/// never later, and the next day still starts inside jiff's range in every
/// zone.
const MAX_DATE: Date = jiff::civil::date(9999, 12, 1);
/// How many neighbouring periods [`Calendar::containing`] may step over when
/// the period of an instant's local date does not contain the instant (only
/// possible where a zone's clocks fall back across midnight, so that local
/// dates are not monotonic in time). One step is always enough in practice.
const MAX_STEPS: usize = 8;

/// A quota period kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    /// One local calendar day.
    Day,
    /// Seven local calendar days, starting on the anchor weekday.
    Week,
    /// One local calendar month, starting on the anchor day of the month.
    Month,
}

/// A half-open span of Unix seconds `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    /// The first second in the span (inclusive).
    pub start: i64,
    /// The first second after the span (exclusive).
    pub end: i64,
}

/// Why a calendar is invalid. The messages are shown to API users and start
/// with the name of the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalendarError {
    /// The time zone is not an IANA time zone name known to the bundled tz
    /// database.
    #[error("quota.time_zone: unknown IANA time zone {0:?} (expected a name such as \"UTC\" or \"Europe/Berlin\")")]
    UnknownTimeZone(String),
    /// The anchor day is out of range for the period kind.
    #[error(
        "quota.anchor_day: {anchor} is out of range for a {} period (expected {})",
        period_name(*period),
        anchor_range(*period)
    )]
    AnchorOutOfRange {
        /// The period kind.
        period: Period,
        /// The anchor as given.
        anchor: u32,
    },
    /// The offset (days after the natural start of the period, as AWS usage
    /// plans count) is out of range for the period kind.
    #[error(
        "quota.offset: {offset} is out of range for a {} period (expected {})",
        period_name(*period),
        offset_range(*period)
    )]
    OffsetOutOfRange {
        /// The period kind.
        period: Period,
        /// The offset as given.
        offset: u32,
    },
}

/// The period kind as written in plan documents.
fn period_name(period: Period) -> &'static str {
    match period {
        Period::Day => "DAY",
        Period::Week => "WEEK",
        Period::Month => "MONTH",
    }
}

/// The valid anchors of a period kind, in words.
fn anchor_range(period: Period) -> &'static str {
    match period {
        Period::Day => "0",
        Period::Week => "0..=6, the weekday the week starts on, 0 = Sunday",
        Period::Month => "1..=31, the day of the month the period starts on",
    }
}

/// The valid offsets of a period kind, in words.
fn offset_range(period: Period) -> &'static str {
    match period {
        Period::Day => "0",
        Period::Week => "0..=6, days after Sunday",
        Period::Month => "0..=30, days after the 1st",
    }
}

/// A period kind, anchor and time zone: everything needed to cut time into
/// quota periods.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    period: Period,
    /// Day: 0; Week: 0..=6 (0 = Sunday); Month: 1..=31.
    anchor: u32,
    tz: TimeZone,
    tz_name: String,
    /// The last period and day spans computed: every decision of a plan
    /// asks for the same ones until they end.
    recent: Recent,
}

/// The last [`Span`]s a calendar computed (its period's, a day's). A cache:
/// clones start empty and it takes no part in equality.
#[derive(Debug, Default)]
struct Recent([SpanSlot; 2]);

/// One cached span, read by every thread without a lock (a seqlock: a
/// writer makes `seq` odd while it stores, and a reader keeps what it read
/// only if `seq` was even and unchanged around its reads). Decisions read it
/// on every call; it changes once per period, so an uncontended mutex here
/// was most of the cost of finding a span.
#[derive(Debug, Default)]
struct SpanSlot {
    seq: AtomicU64,
    start: AtomicI64,
    end: AtomicI64,
}

impl SpanSlot {
    /// The cached span if it contains `now`.
    fn get(&self, now: i64) -> Option<Span> {
        let before = self.seq.load(Ordering::Acquire);
        if before % 2 == 1 {
            return None;
        }
        let start = self.start.load(Ordering::Relaxed);
        let end = self.end.load(Ordering::Relaxed);
        // Orders the loads above before the check below: if they read a
        // store of a writer that began after `before`, `seq` has moved on.
        fence(Ordering::Acquire);
        let after = self.seq.load(Ordering::Relaxed);
        (before == after && before != 0 && start <= now && now < end).then_some(Span { start, end })
    }

    /// Caches `span`, unless another thread is storing one right now (the
    /// next call will store it then).
    fn set(&self, span: Span) {
        let seq = self.seq.load(Ordering::Relaxed);
        if seq % 2 == 1
            || self
                .seq
                .compare_exchange(seq, seq + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        // Orders the odd `seq` before the stores: a reader that sees either
        // store then sees `seq` changed.
        fence(Ordering::Release);
        self.start.store(span.start, Ordering::Relaxed);
        self.end.store(span.end, Ordering::Relaxed);
        self.seq.store(seq + 2, Ordering::Release);
    }
}

impl Clone for Recent {
    fn clone(&self) -> Self {
        Recent::default()
    }
}

impl PartialEq for Recent {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Recent {}

impl Calendar {
    /// Builds a calendar.
    ///
    /// `anchor` means:
    /// - [`Period::Day`]: must be 0.
    /// - [`Period::Week`]: the day of the week the period starts on,
    ///   0 = Sunday, 1 = Monday ... 6 = Saturday (AWS usage-plan `offset`
    ///   semantics).
    /// - [`Period::Month`]: the day of the month the period starts on,
    ///   1..=31; a month shorter than the anchor starts on its last day
    ///   (anchor 31 gives Jan 31, Feb 28 or 29, Mar 31, Apr 30, ...). 0 is
    ///   accepted and means 1.
    ///
    /// `time_zone` is an IANA name such as `"Europe/Berlin"`; `""` means
    /// `"UTC"`.
    ///
    /// # Errors
    ///
    /// [`CalendarError::AnchorOutOfRange`] for an anchor outside the ranges
    /// above, [`CalendarError::UnknownTimeZone`] for a name the bundled tz
    /// database does not know.
    pub fn new(period: Period, anchor: u32, time_zone: &str) -> Result<Calendar, CalendarError> {
        let anchor = match (period, anchor) {
            (Period::Day, 0) | (Period::Week, 0..=6) | (Period::Month, 1..=31) => anchor,
            (Period::Month, 0) => 1,
            _ => return Err(CalendarError::AnchorOutOfRange { period, anchor }),
        };
        let name = if time_zone.is_empty() {
            "UTC"
        } else {
            time_zone
        };
        let tz = TimeZone::get(name)
            .map_err(|_| CalendarError::UnknownTimeZone(time_zone.to_owned()))?;
        Ok(Calendar::with_time_zone(
            period,
            anchor,
            tz,
            name.to_owned(),
        ))
    }

    /// Builds a calendar from AWS's `offset`: the number of days after the
    /// natural start of the period (Day: 0; Week: 0..=6 days after Sunday;
    /// Month: 0..=30 days after the 1st, so offset 0 is anchor 1). A month
    /// shorter than the anchor starts on its last day, as in
    /// [`Calendar::new`].
    ///
    /// # Errors
    ///
    /// [`CalendarError::OffsetOutOfRange`] for an offset outside the ranges
    /// above, [`CalendarError::UnknownTimeZone`] for an unknown time zone.
    pub fn from_offset(
        period: Period,
        offset: u32,
        time_zone: &str,
    ) -> Result<Calendar, CalendarError> {
        let anchor = match (period, offset) {
            (Period::Day, 0) | (Period::Week, 0..=6) => offset,
            (Period::Month, 0..=30) => offset + 1,
            _ => return Err(CalendarError::OffsetOutOfRange { period, offset }),
        };
        Calendar::new(period, anchor, time_zone)
    }

    /// Builds a calendar from an already validated anchor and a resolved
    /// time zone.
    fn with_time_zone(period: Period, anchor: u32, tz: TimeZone, tz_name: String) -> Calendar {
        Calendar {
            period,
            anchor,
            tz,
            tz_name,
            recent: Recent::default(),
        }
    }

    /// The period kind.
    pub fn period(&self) -> Period {
        self.period
    }

    /// The anchor in the [`Calendar::new`] meaning (a Month anchor of 0 is
    /// normalised to 1).
    pub fn anchor(&self) -> u32 {
        self.anchor
    }

    /// The time zone name as given (`"UTC"` when given `""`).
    pub fn time_zone(&self) -> &str {
        &self.tz_name
    }

    /// The period containing instant `now` (Unix seconds).
    ///
    /// It starts at local midnight (in the calendar's time zone) of the
    /// anchor day and ends at local midnight of the next period's anchor
    /// day; where a zone skips midnight, "midnight" is the first instant of
    /// that local day. `start <= now < end` holds for every `now` in the
    /// supported range (see the module docs; `now` is clamped to it), and
    /// `containing(span.end)` starts at `span.end`.
    pub fn containing(&self, now: i64) -> Span {
        self.span_containing(self.period, now)
    }

    /// The local calendar day (in this calendar's time zone) containing
    /// `now`, as a span. `now` is clamped to the supported range.
    pub fn day_containing(&self, now: i64) -> Span {
        self.span_containing(Period::Day, now)
    }

    /// The local date of instant `now`. `now` is clamped to the supported
    /// range.
    pub fn date_of(&self, now: i64) -> Date {
        self.tz.to_datetime(timestamp(now)).date()
    }

    /// The span of a local date: from its first instant (local midnight) to
    /// the first instant of the next date. A date the zone skips entirely
    /// gets an empty span. `date` is clamped to 0001-01-01 ..= 9999-12-01.
    pub fn day_span(&self, date: Date) -> Span {
        let date = date.clamp(MIN_DATE, MAX_DATE);
        let span = self.first_instant(date).and_then(|start| {
            let end = self.first_instant(date.tomorrow().ok()?)?;
            Some(Span { start, end })
        });
        // Unreachable: dates are clamped well inside jiff's range, so the
        // next date and both instants always exist. A degenerate span beats
        // a panic in a server.
        span.unwrap_or(Span { start: 0, end: 0 })
    }

    /// The `period` span containing `now`, stepping to a neighbouring period
    /// when the local date's period does not contain `now` (possible only
    /// where clocks fall back across midnight).
    fn span_containing(&self, period: Period, now: i64) -> Span {
        let slot = &self.recent.0[usize::from(period == Period::Day)];
        if let Some(span) = slot.get(now) {
            return span;
        }
        let span = self.compute_span_containing(period, now);
        slot.set(span);
        span
    }

    fn compute_span_containing(&self, period: Period, now: i64) -> Span {
        let now = now.clamp(MIN_SECOND, MAX_SECOND);
        // `None` is unreachable: all dates involved are within a couple of
        // months of a clamped instant, far inside jiff's range. The fallback
        // still contains `now`, so callers never see a broken span.
        self.try_span_containing(period, now).unwrap_or(Span {
            start: now,
            end: now + 1,
        })
    }

    fn try_span_containing(&self, period: Period, now: i64) -> Option<Span> {
        let mut start_date = self.period_start_date(period, self.date_of(now))?;
        let mut start = self.first_instant(start_date)?;
        let mut next_date = self.next_start_date(period, start_date)?;
        let mut end = self.first_instant(next_date)?;
        for _ in 0..MAX_STEPS {
            if now < start {
                next_date = start_date;
                end = start;
                start_date = self.prev_start_date(period, start_date)?;
                start = self.first_instant(start_date)?;
            } else if now >= end {
                start_date = next_date;
                start = end;
                next_date = self.next_start_date(period, start_date)?;
                end = self.first_instant(next_date)?;
            } else {
                return Some(Span { start, end });
            }
        }
        None
    }

    /// The local date on which the `period` containing local date `date`
    /// starts.
    fn period_start_date(&self, period: Period, date: Date) -> Option<Date> {
        match period {
            Period::Day => Some(date),
            Period::Week => {
                let weekday = i64::from(date.weekday().to_sunday_zero_offset());
                let back = (weekday - i64::from(self.anchor)).rem_euclid(7);
                date.checked_sub(jiff::Span::new().days(back)).ok()
            }
            Period::Month => {
                let this_month = self.month_start(date.first_of_month())?;
                if date >= this_month {
                    Some(this_month)
                } else {
                    self.month_start(date.first_of_month().checked_sub(month()).ok()?)
                }
            }
        }
    }

    /// The start date of the period after the one starting on `start`.
    fn next_start_date(&self, period: Period, start: Date) -> Option<Date> {
        match period {
            Period::Day => start.tomorrow().ok(),
            Period::Week => start.checked_add(jiff::Span::new().days(7)).ok(),
            Period::Month => self.month_start(start.first_of_month().checked_add(month()).ok()?),
        }
    }

    /// The start date of the period before the one starting on `start`.
    fn prev_start_date(&self, period: Period, start: Date) -> Option<Date> {
        match period {
            Period::Day => start.yesterday().ok(),
            Period::Week => start.checked_sub(jiff::Span::new().days(7)).ok(),
            Period::Month => self.month_start(start.first_of_month().checked_sub(month()).ok()?),
        }
    }

    /// The anchor day of the month beginning on `first`, clamped to the
    /// month's last day.
    fn month_start(&self, first: Date) -> Option<Date> {
        let anchor = i8::try_from(self.anchor).ok()?;
        Date::new(
            first.year(),
            first.month(),
            anchor.min(first.days_in_month()),
        )
        .ok()
    }

    /// The first instant (Unix seconds) of local date `date`: local
    /// midnight, or, where the zone skips midnight, the instant its clocks
    /// jump into `date`.
    fn first_instant(&self, date: Date) -> Option<i64> {
        let midnight = date.to_datetime(Time::midnight());
        let ambiguous = self.tz.to_ambiguous_timestamp(midnight);
        let ts = match ambiguous.offset() {
            // Midnight happens once, or twice (clocks fall back over it):
            // the day starts at the first one.
            AmbiguousOffset::Unambiguous { offset }
            | AmbiguousOffset::Fold { before: offset, .. } => offset.to_timestamp(midnight).ok()?,
            // Midnight is skipped: the day starts at the transition out of
            // the gap. `compatible()` (what `Date::to_zoned` uses) agrees
            // when the gap starts exactly at midnight, the usual case, but
            // lands inside the day when the gap straddles midnight.
            AmbiguousOffset::Gap { before, after } => {
                // Midnight read with the later offset is an instant before
                // the transition; midnight read with the earlier offset is
                // at or after it.
                let low = after.to_timestamp(midnight).ok()?;
                let high = before.to_timestamp(midnight).ok()?;
                match self.tz.following(low).next() {
                    Some(transition) if transition.timestamp() <= high => transition.timestamp(),
                    _ => high,
                }
            }
        };
        Some(ts.as_second())
    }
}

/// One calendar month, for date arithmetic.
fn month() -> jiff::Span {
    jiff::Span::new().months(1)
}

/// `now` clamped to the supported range, as a timestamp.
fn timestamp(now: i64) -> Timestamp {
    let now = now.clamp(MIN_SECOND, MAX_SECOND);
    // Unreachable fallback: the clamped range lies inside Timestamp::MIN ..=
    // Timestamp::MAX.
    Timestamp::from_second(now).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Parses a date written exactly as `YYYY-MM-DD`.
///
/// # Errors
///
/// A message naming `field`, e.g.
/// `start_date: expected YYYY-MM-DD, got "2026-13-01"`, when `s` is not of
/// that form or is not a real date.
pub fn parse_date(field: &str, s: &str) -> Result<Date, String> {
    let error = || format!("{field}: expected YYYY-MM-DD, got {s:?}");
    let bytes = s.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
    if !shape_ok {
        return Err(error());
    }
    // The shape check guarantees ASCII digits at these positions, so the
    // slices are on char boundaries and parse; `?` only guards the types.
    let year: i16 = s[0..4].parse().map_err(|_| error())?;
    let month: i8 = s[5..7].parse().map_err(|_| error())?;
    let day: i8 = s[8..10].parse().map_err(|_| error())?;
    Date::new(year, month, day).map_err(|_| error())
}

#[cfg(test)]
#[path = "period_tests.rs"]
mod tests;
