//! Tests for `plans::period`. Expected boundaries are written by hand as UTC
//! instants (local midnight minus the zone's UTC offset on that day; offsets
//! and transition instants checked against `zdump -v`).

use super::*;
use jiff::civil::date;
use proptest::prelude::*;
use Period::{Day, Month, Week};

/// Unix seconds of an RFC 3339 UTC instant such as "2026-03-08T05:00:00Z".
fn utc(s: &str) -> i64 {
    s.parse::<Timestamp>().unwrap().as_second()
}

fn span(start: &str, end: &str) -> Span {
    Span {
        start: utc(start),
        end: utc(end),
    }
}

fn cal(period: Period, anchor: u32, tz: &str) -> Calendar {
    Calendar::new(period, anchor, tz).unwrap()
}

/// A calendar on a POSIX TZ rule, for transitions the tz database lacks.
fn posix_cal(period: Period, anchor: u32, rule: &str) -> Calendar {
    Calendar::with_time_zone(period, anchor, TimeZone::posix(rule).unwrap(), rule.into())
}

const H: i64 = 3600;
const D: i64 = 24 * H;

/// (period, anchor, zone, now, expected start, expected end)
type Case = (
    Period,
    u32,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

fn check_cases(cases: &[Case]) {
    for &(period, anchor, tz, now, start, end) in cases {
        let c = cal(period, anchor, tz);
        let want = span(start, end);
        let ctx = format!("{period:?} anchor {anchor} in {tz} at {now}");
        assert_eq!(c.containing(utc(now)), want, "{ctx}");
        // The whole span maps back to itself, and its neighbours abut it.
        assert_eq!(c.containing(want.start), want, "{ctx}: start");
        assert_eq!(c.containing(want.end - 1), want, "{ctx}: end - 1");
        assert_eq!(c.containing(want.end).start, want.end, "{ctx}: next");
        assert_eq!(
            c.containing(want.start - 1).end,
            want.start,
            "{ctx}: previous"
        );
    }
}

#[test]
fn supported_range_constants_match_jiff() {
    assert_eq!(MIN_SECOND, utc("0002-01-01T00:00:00Z"));
    assert_eq!(MAX_SECOND, utc("9998-12-31T23:59:59Z"));
    // Independent check of the helper: `date -u -d 2026-03-11 +%s`.
    assert_eq!(utc("2026-03-11T00:00:00Z"), 1_773_187_200);
    assert_eq!(utc("2028-02-29T00:00:00Z"), 1_835_395_200);
}

#[rustfmt::skip]
const DAY_CASES: &[Case] = &[
    // UTC: a plain 24 h day.
    (Day, 0, "UTC", "2026-03-11T13:45:00Z", "2026-03-11T00:00:00Z", "2026-03-12T00:00:00Z"),
    (Day, 0, "", "2026-03-11T00:00:00Z", "2026-03-11T00:00:00Z", "2026-03-12T00:00:00Z"),
    (Day, 0, "UTC", "2026-03-10T23:59:59Z", "2026-03-10T00:00:00Z", "2026-03-11T00:00:00Z"),
    // New York, an ordinary winter day: midnight EST is 05:00Z.
    (Day, 0, "America/New_York", "2026-03-07T12:00:00Z", "2026-03-07T05:00:00Z", "2026-03-08T05:00:00Z"),
    // 2026-03-08 02:00 EST -> 03:00 EDT: a 23 h day.
    (Day, 0, "America/New_York", "2026-03-08T12:00:00Z", "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"),
    // Just before local midnight the UTC date is already the next day.
    (Day, 0, "America/New_York", "2026-03-09T03:59:59Z", "2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z"),
    // 2026-11-01 02:00 EDT -> 01:00 EST: a 25 h day.
    (Day, 0, "America/New_York", "2026-11-01T05:30:00Z", "2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"),
    // Santiago skips midnight: 2026-09-06 00:00 -04 -> 01:00 -03 (04:00Z).
    (Day, 0, "America/Santiago", "2026-09-06T12:00:00Z", "2026-09-06T04:00:00Z", "2026-09-07T03:00:00Z"),
    (Day, 0, "America/Santiago", "2026-09-06T03:59:59Z", "2026-09-05T04:00:00Z", "2026-09-06T04:00:00Z"),
    // Santiago falls back 2026-04-05 00:00 -03 -> 2026-04-04 23:00 -04: a 25 h Saturday.
    (Day, 0, "America/Santiago", "2026-04-05T03:30:00Z", "2026-04-04T03:00:00Z", "2026-04-05T04:00:00Z"),
];

#[rustfmt::skip]
const WEEK_CASES: &[Case] = &[
    // Sunday weeks.
    (Week, 0, "UTC", "2026-03-11T13:45:00Z", "2026-03-08T00:00:00Z", "2026-03-15T00:00:00Z"),
    (Week, 0, "UTC", "2026-03-15T00:00:00Z", "2026-03-15T00:00:00Z", "2026-03-22T00:00:00Z"),
    (Week, 0, "UTC", "2026-03-14T23:59:59Z", "2026-03-08T00:00:00Z", "2026-03-15T00:00:00Z"),
    // Monday weeks.
    (Week, 1, "UTC", "2026-03-11T13:45:00Z", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
    (Week, 1, "UTC", "2026-03-16T00:00:00Z", "2026-03-16T00:00:00Z", "2026-03-23T00:00:00Z"),
    (Week, 1, "UTC", "2026-03-15T23:59:59Z", "2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z"),
    // Saturday weeks; the anchor day itself starts a week.
    (Week, 6, "UTC", "2026-03-11T13:45:00Z", "2026-03-07T00:00:00Z", "2026-03-14T00:00:00Z"),
    (Week, 3, "UTC", "2026-03-11T13:45:00Z", "2026-03-11T00:00:00Z", "2026-03-18T00:00:00Z"),
    // Week crossing a year end: 2026-01-01 is a Thursday.
    (Week, 1, "UTC", "2026-01-01T08:00:00Z", "2025-12-29T00:00:00Z", "2026-01-05T00:00:00Z"),
    // Tokyo (UTC+9): 2026-03-15T16:00Z is Sunday in UTC but Monday
    // 01:00 in Tokyo, so it starts a new Monday week there.
    (Week, 1, "Asia/Tokyo", "2026-03-15T16:00:00Z", "2026-03-15T15:00:00Z", "2026-03-22T15:00:00Z"),
    (Week, 1, "Asia/Tokyo", "2026-03-15T14:59:59Z", "2026-03-08T15:00:00Z", "2026-03-15T15:00:00Z"),
    // New York week containing the spring change: 7 days minus 1 h.
    (Week, 0, "America/New_York", "2026-03-10T12:00:00Z", "2026-03-08T05:00:00Z", "2026-03-15T04:00:00Z"),
];

#[rustfmt::skip]
const MONTH_CASES: &[Case] = &[
    // Anchor 1 (and 0, which means 1).
    (Month, 1, "UTC", "2026-03-11T13:45:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
    (Month, 0, "UTC", "2026-03-11T13:45:00Z", "2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
    (Month, 1, "UTC", "2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
    (Month, 1, "UTC", "2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),
    // Anchor 15.
    (Month, 15, "UTC", "2026-03-11T13:45:00Z", "2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z"),
    (Month, 15, "UTC", "2026-03-15T00:00:00Z", "2026-03-15T00:00:00Z", "2026-04-15T00:00:00Z"),
    (Month, 15, "UTC", "2026-03-14T23:59:59Z", "2026-02-15T00:00:00Z", "2026-03-15T00:00:00Z"),
    (Month, 15, "UTC", "2026-01-05T00:00:00Z", "2025-12-15T00:00:00Z", "2026-01-15T00:00:00Z"),
    // Anchor 31, leap year 2028: Jan 31, Feb 29, Mar 31, Apr 30, May 31.
    (Month, 31, "UTC", "2028-02-10T00:00:00Z", "2028-01-31T00:00:00Z", "2028-02-29T00:00:00Z"),
    (Month, 31, "UTC", "2028-02-29T00:00:00Z", "2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z"),
    (Month, 31, "UTC", "2028-03-30T12:00:00Z", "2028-02-29T00:00:00Z", "2028-03-31T00:00:00Z"),
    (Month, 31, "UTC", "2028-04-15T00:00:00Z", "2028-03-31T00:00:00Z", "2028-04-30T00:00:00Z"),
    (Month, 31, "UTC", "2028-04-30T00:00:00Z", "2028-04-30T00:00:00Z", "2028-05-31T00:00:00Z"),
    (Month, 31, "UTC", "2028-01-15T00:00:00Z", "2027-12-31T00:00:00Z", "2028-01-31T00:00:00Z"),
    // Anchor 31, common year 2027: Jan 31, Feb 28, Mar 31.
    (Month, 31, "UTC", "2027-02-10T00:00:00Z", "2027-01-31T00:00:00Z", "2027-02-28T00:00:00Z"),
    (Month, 31, "UTC", "2027-02-28T12:00:00Z", "2027-02-28T00:00:00Z", "2027-03-31T00:00:00Z"),
    (Month, 31, "UTC", "2027-03-31T00:00:00Z", "2027-03-31T00:00:00Z", "2027-04-30T00:00:00Z"),
    // Anchor 30 in February.
    (Month, 30, "UTC", "2027-02-27T00:00:00Z", "2027-01-30T00:00:00Z", "2027-02-28T00:00:00Z"),
    (Month, 30, "UTC", "2027-03-01T00:00:00Z", "2027-02-28T00:00:00Z", "2027-03-30T00:00:00Z"),
    (Month, 30, "UTC", "2028-02-29T05:00:00Z", "2028-02-29T00:00:00Z", "2028-03-30T00:00:00Z"),
    // Anchor 29: Feb 29 in a leap year, Feb 28 otherwise.
    (Month, 29, "UTC", "2028-02-29T00:00:00Z", "2028-02-29T00:00:00Z", "2028-03-29T00:00:00Z"),
    (Month, 29, "UTC", "2028-02-28T23:59:59Z", "2028-01-29T00:00:00Z", "2028-02-29T00:00:00Z"),
    (Month, 29, "UTC", "2027-02-28T00:00:00Z", "2027-02-28T00:00:00Z", "2027-03-29T00:00:00Z"),
    (Month, 29, "UTC", "2027-02-27T00:00:00Z", "2027-01-29T00:00:00Z", "2027-02-28T00:00:00Z"),
    // Berlin: March 2026 loses an hour (03-29 02:00 CET -> 03:00 CEST),
    // October gains one (10-25 03:00 CEST -> 02:00 CET).
    (Month, 1, "Europe/Berlin", "2026-03-15T12:00:00Z", "2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z"),
    (Month, 1, "Europe/Berlin", "2026-10-15T12:00:00Z", "2026-09-30T22:00:00Z", "2026-10-31T23:00:00Z"),
    // 2026-02-28T23:30Z is already March 1st in Berlin.
    (Month, 1, "Europe/Berlin", "2026-02-28T23:30:00Z", "2026-02-28T23:00:00Z", "2026-03-31T22:00:00Z"),
    (Month, 15, "Europe/Berlin", "2026-03-20T00:00:00Z", "2026-03-14T23:00:00Z", "2026-04-14T22:00:00Z"),
];

#[test]
fn day_periods() {
    check_cases(DAY_CASES);
    let ny = cal(Period::Day, 0, "America/New_York");
    let short = ny.containing(utc("2026-03-08T12:00:00Z"));
    assert_eq!(short.end - short.start, 23 * H);
    let long = ny.containing(utc("2026-11-01T12:00:00Z"));
    assert_eq!(long.end - long.start, 25 * H);
}

#[test]
fn week_periods() {
    // 2026-03-11 is a Wednesday.
    assert_eq!(date(2026, 3, 11).weekday(), jiff::civil::Weekday::Wednesday);
    check_cases(WEEK_CASES);
    // Same instant in UTC belongs to the previous Monday week.
    assert_eq!(
        cal(Week, 1, "UTC").containing(utc("2026-03-15T16:00:00Z")),
        span("2026-03-09T00:00:00Z", "2026-03-16T00:00:00Z")
    );
}

#[test]
fn month_periods() {
    check_cases(MONTH_CASES);
    let berlin = cal(Month, 1, "Europe/Berlin");
    let march = berlin.containing(utc("2026-03-15T12:00:00Z"));
    assert_eq!(march.end - march.start, 31 * D - H);
    let october = berlin.containing(utc("2026-10-15T12:00:00Z"));
    assert_eq!(october.end - october.start, 31 * D + H);
}

#[test]
fn day_containing_date_of_and_day_span() {
    // Monthly calendar, but days are still local days.
    let ny = cal(Period::Month, 1, "America/New_York");
    let now = utc("2026-03-09T03:30:00Z"); // 2026-03-08 23:30 EDT
    assert_eq!(ny.date_of(now), date(2026, 3, 8));
    let day = span("2026-03-08T05:00:00Z", "2026-03-09T04:00:00Z");
    assert_eq!(ny.day_containing(now), day);
    assert_eq!(ny.day_span(date(2026, 3, 8)), day);
    assert_eq!(
        ny.day_span(date(2026, 11, 1)),
        span("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z")
    );

    let tokyo = cal(Period::Week, 1, "Asia/Tokyo");
    assert_eq!(
        tokyo.date_of(utc("2026-03-15T16:00:00Z")),
        date(2026, 3, 16)
    );
    assert_eq!(
        tokyo.date_of(utc("2026-03-15T14:59:59Z")),
        date(2026, 3, 15)
    );
    assert_eq!(
        tokyo.day_span(date(2026, 3, 16)),
        span("2026-03-15T15:00:00Z", "2026-03-16T15:00:00Z")
    );

    // Santiago's day without a midnight starts at 01:00 -03.
    let scl = cal(Period::Day, 0, "America/Santiago");
    assert_eq!(
        scl.day_span(date(2026, 9, 6)),
        span("2026-09-06T04:00:00Z", "2026-09-07T03:00:00Z")
    );
    assert_eq!(scl.date_of(utc("2026-09-06T04:00:00Z")), date(2026, 9, 6));
    assert_eq!(scl.date_of(utc("2026-09-06T03:59:59Z")), date(2026, 9, 5));
}

#[test]
fn skipped_local_date_has_an_empty_span() {
    // Apia jumped from 2011-12-29 23:59:59 -10 to 2011-12-31 00:00 +14
    // at 2011-12-30T10:00Z: Dec 30 never happened there.
    let apia = cal(Period::Day, 0, "Pacific/Apia");
    let jump = utc("2011-12-30T10:00:00Z");
    assert_eq!(
        apia.day_span(date(2011, 12, 30)),
        Span {
            start: jump,
            end: jump
        }
    );
    assert_eq!(
        apia.containing(jump - 1),
        span("2011-12-29T10:00:00Z", "2011-12-30T10:00:00Z")
    );
    assert_eq!(
        apia.containing(jump),
        span("2011-12-30T10:00:00Z", "2011-12-31T10:00:00Z")
    );
    assert_eq!(apia.date_of(jump), date(2011, 12, 31));
    // A Friday week (anchor 5) would start on the skipped Friday Dec 30:
    // it starts at the jump and is 6 days long, ending on Friday
    // 2012-01-06 00:00 +14.
    let weeks = cal(Period::Week, 5, "Pacific/Apia");
    let week = weeks.containing(jump);
    assert_eq!(
        week,
        Span {
            start: jump,
            end: utc("2012-01-05T10:00:00Z")
        }
    );
    assert_eq!(week.end - week.start, 6 * D);
    assert_eq!(weeks.containing(jump - 1).end, jump);
}

#[test]
fn gap_straddling_midnight_starts_the_day_at_the_transition() {
    // UTC-3 standard, UTC-2 summer; summer time starts on the second
    // Sunday of March at 23:30 local (2026-03-08 23:30 -03 ->
    // 2026-03-09 00:30 -02, at 2026-03-09T02:30Z), so 03-09 00:00 never
    // happens and the day starts at 00:30. `compatible()` would say 01:00.
    let c = posix_cal(Period::Day, 0, "XST3XDT,M3.2.0/23:30,M11.1.0/0:30");
    let jump = utc("2026-03-09T02:30:00Z");
    assert_eq!(
        c.day_span(date(2026, 3, 9)),
        span("2026-03-09T02:30:00Z", "2026-03-10T02:00:00Z")
    );
    assert_eq!(
        c.day_span(date(2026, 3, 8)),
        span("2026-03-08T03:00:00Z", "2026-03-09T02:30:00Z")
    );
    assert_eq!(c.containing(jump), c.day_span(date(2026, 3, 9)));
    assert_eq!(c.containing(jump - 1), c.day_span(date(2026, 3, 8)));
    assert_eq!(c.date_of(jump), date(2026, 3, 9));
    assert_eq!(c.date_of(jump - 1), date(2026, 3, 8));
}

#[test]
fn fold_straddling_midnight_keeps_spans_containing_now() {
    // Same zone; summer time ends on the first Sunday of November at 00:30
    // local (2026-11-01 00:30 -02 -> 2026-10-31 23:30 -03, at
    // 2026-11-01T02:30Z). Local midnight of 11-01 first happens at 02:00Z;
    // from 02:30Z to 03:00Z the local date is 10-31 again.
    let c = posix_cal(Period::Day, 0, "XST3XDT,M3.2.0/23:30,M11.1.0/0:30");
    let nov1 = span("2026-11-01T02:00:00Z", "2026-11-02T03:00:00Z");
    assert_eq!(c.day_span(date(2026, 11, 1)), nov1);
    assert_eq!(
        c.day_span(date(2026, 10, 31)),
        span("2026-10-31T02:00:00Z", "2026-11-01T02:00:00Z")
    );
    let back_in_october = utc("2026-11-01T02:40:00Z");
    assert_eq!(c.date_of(back_in_october), date(2026, 10, 31));
    // The instant still lies in the span that tiles time: November 1st.
    assert_eq!(c.containing(back_in_october), nov1);
    assert_eq!(c.day_containing(back_in_october), nov1);
    let weeks = posix_cal(Period::Week, 0, "XST3XDT,M3.2.0/23:30,M11.1.0/0:30");
    let week = weeks.containing(back_in_october);
    assert_eq!(week, span("2026-11-01T02:00:00Z", "2026-11-08T03:00:00Z"));
}

#[test]
fn from_offset_matches_new() {
    let cases: &[(Period, u32, u32)] = &[
        (Period::Day, 0, 0),
        (Period::Week, 0, 0),
        (Period::Week, 1, 1),
        (Period::Week, 6, 6),
        (Period::Month, 0, 1),
        (Period::Month, 14, 15),
        (Period::Month, 30, 31),
    ];
    for &(period, offset, anchor) in cases {
        let by_offset = Calendar::from_offset(period, offset, "Europe/Berlin").unwrap();
        assert_eq!(
            by_offset,
            cal(period, anchor, "Europe/Berlin"),
            "{period:?} offset {offset}"
        );
        assert_eq!(by_offset.anchor(), anchor);
        assert_eq!(by_offset.period(), period);
    }
}

#[test]
fn accessors() {
    let c = cal(Period::Month, 0, "");
    assert_eq!(c.period(), Period::Month);
    assert_eq!(c.anchor(), 1);
    assert_eq!(c.time_zone(), "UTC");
    assert_eq!(c, cal(Period::Month, 1, "UTC"));
    assert_eq!(cal(Period::Week, 6, "Asia/Tokyo").time_zone(), "Asia/Tokyo");
    assert_ne!(
        cal(Period::Week, 6, "Asia/Tokyo"),
        cal(Period::Week, 6, "UTC")
    );
}

#[test]
fn invalid_calendars_name_the_field() {
    let anchor_errors = [
        Calendar::new(Period::Day, 1, "UTC"),
        Calendar::new(Period::Week, 7, "UTC"),
        Calendar::new(Period::Month, 32, "UTC"),
    ];
    for result in anchor_errors {
        let message = result.unwrap_err().to_string();
        assert!(message.starts_with("quota.anchor_day: "), "{message}");
    }
    // An offset's error names the offset, the field the caller set.
    let offset_errors = [
        Calendar::from_offset(Period::Month, 31, "UTC"),
        Calendar::from_offset(Period::Day, 1, "UTC"),
        Calendar::from_offset(Period::Week, 7, "UTC"),
    ];
    for result in offset_errors {
        let message = result.unwrap_err().to_string();
        assert!(message.starts_with("quota.offset: "), "{message}");
    }
    assert_eq!(
        Calendar::new(Period::Week, 7, "UTC").unwrap_err(),
        CalendarError::AnchorOutOfRange {
            period: Period::Week,
            anchor: 7
        }
    );
    assert_eq!(
        Calendar::new(Period::Month, 32, "UTC")
            .unwrap_err()
            .to_string(),
        "quota.anchor_day: 32 is out of range for a MONTH period \
         (expected 1..=31, the day of the month the period starts on)"
    );
    assert_eq!(
        Calendar::from_offset(Period::Month, 31, "UTC")
            .unwrap_err()
            .to_string(),
        "quota.offset: 31 is out of range for a MONTH period \
         (expected 0..=30, days after the 1st)"
    );

    let err = Calendar::new(Period::Day, 0, "Mars/Olympus").unwrap_err();
    assert_eq!(err, CalendarError::UnknownTimeZone("Mars/Olympus".into()));
    let message = err.to_string();
    assert!(message.starts_with("quota.time_zone: "), "{message}");
    assert!(message.contains("\"Mars/Olympus\""), "{message}");
    let err = Calendar::from_offset(Period::Week, 1, "Mars/Olympus").unwrap_err();
    assert!(err.to_string().starts_with("quota.time_zone: "));
    // The anchor is checked first.
    let err = Calendar::new(Period::Week, 9, "Mars/Olympus").unwrap_err();
    assert!(err.to_string().starts_with("quota.anchor_day: "));
}

#[test]
fn parse_date_accepts_only_yyyy_mm_dd() {
    assert_eq!(
        parse_date("start_date", "2026-02-28"),
        Ok(date(2026, 2, 28))
    );
    assert_eq!(
        parse_date("start_date", "2028-02-29"),
        Ok(date(2028, 2, 29))
    );
    assert_eq!(parse_date("d", "0001-01-01"), Ok(date(1, 1, 1)));
    for bad in [
        "2026-2-28",
        "2026-02-30",
        "2027-02-29",
        "",
        "2026-02-28T00:00",
        "2026-13-01",
        "2026-00-10",
        "2026-01-00",
        "20260228",
        "2026/02/28",
        " 2026-02-28",
        "2026-02-28 ",
        "+2026-02-28",
        "2026-02-2a",
        "２０２６-02-28",
    ] {
        let message = parse_date("start_date", bad).unwrap_err();
        assert_eq!(
            message,
            format!("start_date: expected YYYY-MM-DD, got {bad:?}")
        );
    }
    assert_eq!(
        parse_date("start_date", "2026-13-01").unwrap_err(),
        "start_date: expected YYYY-MM-DD, got \"2026-13-01\""
    );
    assert!(parse_date("end_date", "x")
        .unwrap_err()
        .starts_with("end_date: "));
}

#[test]
fn extreme_instants_are_clamped_without_panicking() {
    let calendars = [
        cal(Period::Day, 0, "UTC"),
        cal(Period::Week, 3, "Pacific/Kiritimati"),
        cal(Period::Month, 31, "America/New_York"),
        cal(Period::Month, 1, "Asia/Tokyo"),
        cal(Period::Month, 31, "Etc/GMT+12"),
        cal(Period::Month, 31, "Etc/GMT-14"),
    ];
    for c in &calendars {
        for now in [
            i64::MIN,
            MIN_SECOND - 1,
            MIN_SECOND,
            MAX_SECOND,
            MAX_SECOND + 1,
            i64::MAX,
        ] {
            let clamped = now.clamp(MIN_SECOND, MAX_SECOND);
            for s in [c.containing(now), c.day_containing(now)] {
                // A real period (not the 1 s fallback) containing the clamped instant.
                assert!(s.start <= clamped && clamped < s.end, "{c:?} {now}: {s:?}");
                assert!(s.end - s.start >= 23 * H, "{c:?} {now}: {s:?}");
            }
            let day = c.date_of(now);
            let s = c.day_span(day);
            assert!(s.start <= clamped && clamped < s.end, "{c:?} {now}: {s:?}");
        }
        for d in [
            jiff::civil::Date::MIN,
            jiff::civil::Date::MAX,
            MIN_DATE,
            MAX_DATE,
        ] {
            let s = c.day_span(d);
            assert!(s.end - s.start >= 23 * H, "{c:?} {d}: {s:?}");
        }
        assert_eq!(c.day_span(jiff::civil::Date::MAX), c.day_span(MAX_DATE));
        assert_eq!(c.day_span(jiff::civil::Date::MIN), c.day_span(MIN_DATE));
    }
}

/// Zones for the property tests: plain, both hemispheres' DST, midnight
/// skipped (Santiago, São Paulo until 2019), 30 minute DST (Lord Howe),
/// half-hour offset (Kolkata), a skipped date (Apia), far east/west.
const ZONES: &[&str] = &[
    "UTC",
    "America/New_York",
    "Europe/Berlin",
    "Asia/Tokyo",
    "America/Santiago",
    "America/Sao_Paulo",
    "Australia/Lord_Howe",
    "Asia/Kolkata",
    "Pacific/Apia",
    "Pacific/Kiritimati",
];

fn calendar_strategy() -> impl Strategy<Value = Calendar> {
    let period_anchor = prop_oneof![
        Just((Period::Day, 0u32)),
        (0u32..=6).prop_map(|a| (Period::Week, a)),
        (0u32..=31).prop_map(|a| (Period::Month, a)),
    ];
    (period_anchor, proptest::sample::select(ZONES))
        .prop_map(|((period, anchor), tz)| cal(period, anchor, tz))
}

/// Checks that `f` cuts time into a span containing `now` that tiles with
/// its neighbours.
fn check_tiling(c: &Calendar, now: i64, f: impl Fn(i64) -> Span, max_len: i64) {
    let s = f(now);
    assert!(s.start <= now && now < s.end, "{c:?} at {now}: {s:?}");
    assert_eq!(f(s.start), s, "{c:?} at {now}: start");
    assert_eq!(f(s.end - 1), s, "{c:?} at {now}: end - 1");
    let next = f(s.end);
    assert_eq!(next.start, s.end, "{c:?} at {now}: next {next:?}");
    let prev = f(s.start - 1);
    assert_eq!(prev.end, s.start, "{c:?} at {now}: previous {prev:?}");
    let len = s.end - s.start;
    assert!(
        (23 * H..=max_len).contains(&len),
        "{c:?} at {now}: length {len}"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn periods_tile_time(c in calendar_strategy(), now in 0i64..7_258_118_400) {
        let max_len = match c.period() {
            Period::Day => 25 * H,
            Period::Week => 7 * D + H,
            Period::Month => 31 * D + H,
        };
        check_tiling(&c, now, |t| c.containing(t), max_len);
        // The period starts at the first instant of its first local day.
        let s = c.containing(now);
        prop_assert_eq!(c.day_containing(s.start).start, s.start);
        prop_assert_eq!(c.day_containing(s.end).start, s.end);
        // Anchor days: the period starts on the anchor weekday / day.
        let first = c.date_of(s.start);
        match c.period() {
            Period::Day => {}
            Period::Week => {
                let wd = u32::try_from(first.weekday().to_sunday_zero_offset()).unwrap();
                // A skipped anchor date (Apia) shifts the start to the next day.
                prop_assert!(wd == c.anchor() || c.day_span(first.yesterday().unwrap()).start == s.start);
            }
            Period::Month => {
                let want = u32::try_from(first.days_in_month()).unwrap().min(c.anchor());
                prop_assert!(u32::try_from(first.day()).unwrap() == want
                    || c.day_span(first.yesterday().unwrap()).start == s.start);
            }
        }
    }

    #[test]
    fn days_tile_time(c in calendar_strategy(), now in 0i64..7_258_118_400) {
        check_tiling(&c, now, |t| c.day_containing(t), 25 * H);
        let s = c.day_containing(now);
        prop_assert_eq!(c.day_span(c.date_of(now)), s);
        prop_assert_eq!(c.date_of(s.start), c.date_of(now));
    }

    #[test]
    fn remembered_spans_equal_fresh_ones(
        c in calendar_strategy(),
        times in proptest::collection::vec(0i64..7_258_118_400, 1..20),
        nudges in proptest::collection::vec(-2 * D..2 * D, 1..20),
    ) {
        // The calendar remembers its last spans; a clone starts empty and
        // computes from scratch. Times jump around, and step near the
        // remembered span's ends, in both directions.
        for (&t, &n) in times.iter().zip(nudges.iter().cycle()) {
            for now in [t, t + n, c.containing(t).end, c.containing(t).end - 1, c.day_containing(t).start - 1] {
                prop_assert_eq!(c.containing(now), c.clone().containing(now), "period at {}", now);
                prop_assert_eq!(c.day_containing(now), c.clone().day_containing(now), "day at {}", now);
            }
        }
    }

    #[test]
    fn parse_date_round_trips(y in 1i16..=9999, m in 1i8..=12, d in 1i8..=31) {
        match jiff::civil::Date::new(y, m, d) {
            Ok(want) => {
                let text = format!("{y:04}-{m:02}-{d:02}");
                prop_assert_eq!(parse_date("f", &text), Ok(want));
                prop_assert_eq!(want.to_string(), text);
            }
            Err(_) => {
                let text = format!("{y:04}-{m:02}-{d:02}");
                prop_assert!(parse_date("f", &text).is_err());
            }
        }
    }
}

#[test]
fn span_cache_hands_out_only_whole_spans_it_was_given() {
    let slot = SpanSlot::default();
    assert_eq!(slot.get(0), None, "empty");
    slot.set(Span { start: 10, end: 20 });
    assert_eq!(slot.get(15), Some(Span { start: 10, end: 20 }));
    assert_eq!(slot.get(20), None, "end is exclusive");
    assert_eq!(slot.get(9), None);
    // Writers race to store spans [10k, 10k + 10); a reader that got a start
    // of one and an end of another would see a length other than 10.
    let slot = std::sync::Arc::new(SpanSlot::default());
    let hits = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..3i64 {
            let slot = &slot;
            let hits = &hits;
            s.spawn(move || {
                for i in 0..200_000i64 {
                    let k = (i * 7 + t * 13) % 50;
                    slot.set(Span {
                        start: 10 * k,
                        end: 10 * k + 10,
                    });
                    let now = 10 * ((i * 11 + t) % 50) + 5;
                    if let Some(sp) = slot.get(now) {
                        assert_eq!(sp.end - sp.start, 10, "torn span {sp:?}");
                        assert!(sp.start <= now && now < sp.end);
                        hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            });
        }
    });
    assert!(hits.into_inner() > 0, "the cache answered at least once");
}
