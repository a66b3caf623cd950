//! Pausing a daemon's training: the weekly schedule of the config (`pause_schedule`), the
//! switch that combines it with `potluck pause` / `potluck resume`, and the coordinator's
//! rule for runs whose members are paused. Pure: the time is passed in (Unix seconds), so
//! every decision is tested without a clock; the training service carries them out (a
//! paused replica leaves the round set through the coordinator, saves its state, drops its
//! model and optimizer, and rejoins with them on resume).
//!
//! # The schedule
//! Each entry is `DAYS HH:MM-HH:MM [OFFSET]`: `DAYS` is a day (`Mon`), a range (`Mon-Fri`,
//! wrapping: `Sat-Mon`), a comma list of either (`Mon,Wed,Fri-Sun`) or `daily`; the window
//! starts on each listed day and may run past midnight (`Fri 22:00-02:00` ends on Saturday
//! morning); `OFFSET` is `UTC` (the default) or a fixed offset such as `+02:00`. Fixed
//! offsets do not follow daylight saving time: a daemon in a zone with DST needs its entries
//! moved twice a year, or a system timer that calls `potluck pause` / `potluck resume`.
//! UTC and fixed offsets keep the daemon free of a time zone database and its surprises in
//! containers, which usually run in UTC anyway.
//!
//! # The switch
//! `potluck pause` pauses until `potluck resume`, whatever the schedule says. `potluck
//! resume` ends a manual pause and, inside a scheduled window, resumes until that window
//! ends; the schedule's next window pauses again.

use std::collections::BTreeSet;
use std::fmt;

/// Entries a schedule may hold.
pub const MAX_ENTRIES: usize = 64;
/// Longest entry read; checked before parsing.
const MAX_ENTRY_CHARS: usize = 128;
const MINUTES_PER_DAY: u32 = 24 * 60;
const MINUTES_PER_WEEK: u32 = 7 * MINUTES_PER_DAY;
const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// Why a schedule entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("at most {MAX_ENTRIES} schedule entries, got {0}")]
    TooMany(usize),
    #[error("entry '{0}' is longer than {MAX_ENTRY_CHARS} characters")]
    TooLong(String),
    #[error(
        "entry '{0}' is not `DAYS HH:MM-HH:MM [OFFSET]` (e.g. `Mon-Fri 18:00-23:00` or `Sat 10:00-02:00 +01:00`)"
    )]
    Shape(String),
    #[error("entry '{entry}': `{day}` is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun, or daily)")]
    Day { entry: String, day: String },
    #[error("entry '{entry}': `{time}` is not a time of day HH:MM (00:00 to 23:59)")]
    Time { entry: String, time: String },
    #[error("entry '{entry}': the window starts and ends at the same time")]
    Empty { entry: String },
    #[error(
        "entry '{entry}': `{offset}` is not `UTC` or an offset from +HH:MM to -HH:MM (at most 14 h)"
    )]
    Offset { entry: String, offset: String },
}

/// One window, in minutes of the UTC week (Monday 00:00 UTC is 0); `end` may be past the
/// week's end (a Sunday window past midnight, or an offset that moves it) and wraps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Window {
    start: u32,
    len: u32,
}

impl Window {
    fn contains(&self, minute_of_week: u32) -> bool {
        let since = (minute_of_week + MINUTES_PER_WEEK - self.start) % MINUTES_PER_WEEK;
        since < self.len
    }
}

/// The weekly windows in which training pauses. Empty: never.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    windows: Vec<Window>,
    /// The entries as written, for status displays.
    entries: Vec<String>,
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.entries.join("; "))
    }
}

impl Schedule {
    /// Parses the config's entries; the first bad one is the error.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, ScheduleError> {
        if entries.len() > MAX_ENTRIES {
            return Err(ScheduleError::TooMany(entries.len()));
        }
        let mut s = Schedule::default();
        for e in entries {
            let e = e.as_ref();
            s.windows.extend(parse_entry(e)?);
            s.entries.push(e.trim().to_string());
        }
        Ok(s)
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }

    /// Whether `unix_secs` falls in a window.
    pub fn active_at(&self, unix_secs: u64) -> bool {
        let m = minute_of_week(unix_secs);
        self.windows.iter().any(|w| w.contains(m))
    }
}

/// Minutes since Monday 00:00 UTC of the week of `unix_secs` (1970-01-01 was a Thursday).
fn minute_of_week(unix_secs: u64) -> u32 {
    let minutes = unix_secs / 60;
    // Thursday is day 3 of a Monday-first week.
    ((minutes + 3 * u64::from(MINUTES_PER_DAY)) % u64::from(MINUTES_PER_WEEK)) as u32
}

fn parse_entry(entry: &str) -> Result<Vec<Window>, ScheduleError> {
    if entry.chars().count() > MAX_ENTRY_CHARS {
        return Err(ScheduleError::TooLong(
            entry.chars().take(MAX_ENTRY_CHARS).collect(),
        ));
    }
    let shape = || ScheduleError::Shape(entry.to_string());
    let parts: Vec<&str> = entry.split_whitespace().collect();
    let (days, span, offset) = match parts.as_slice() {
        [d, s] => (*d, *s, None),
        [d, s, o] => (*d, *s, Some(*o)),
        _ => return Err(shape()),
    };
    let (from, to) = span.split_once('-').ok_or_else(shape)?;
    let time = |t: &str| {
        parse_time(t).ok_or_else(|| ScheduleError::Time {
            entry: entry.to_string(),
            time: t.to_string(),
        })
    };
    let (from, to) = (time(from)?, time(to)?);
    if from == to {
        return Err(ScheduleError::Empty {
            entry: entry.to_string(),
        });
    }
    let len = (to + MINUTES_PER_DAY - from) % MINUTES_PER_DAY;
    let offset = match offset {
        None => 0,
        Some(o) => parse_offset(o).ok_or_else(|| ScheduleError::Offset {
            entry: entry.to_string(),
            offset: o.to_string(),
        })?,
    };
    let mut windows = Vec::new();
    for day in parse_days(entry, days)? {
        // Local minute of the week, moved to UTC.
        let local = day * MINUTES_PER_DAY + from;
        let start = (i64::from(local) - i64::from(offset)).rem_euclid(i64::from(MINUTES_PER_WEEK));
        windows.push(Window {
            start: start as u32,
            len,
        });
    }
    Ok(windows)
}

/// `HH:MM` as minutes of the day.
fn parse_time(t: &str) -> Option<u32> {
    let (h, m) = t.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// `UTC`, `Z` or `+HH:MM` / `-HH:MM`, as minutes east of UTC.
fn parse_offset(o: &str) -> Option<i32> {
    if o.eq_ignore_ascii_case("utc") || o == "Z" {
        return Some(0);
    }
    let (sign, rest) = match o.as_bytes().first()? {
        b'+' => (1, &o[1..]),
        b'-' => (-1, &o[1..]),
        _ => return None,
    };
    let minutes = parse_time(rest)? as i32;
    (minutes <= 14 * 60).then_some(sign * minutes)
}

/// The days an entry's windows start on (0 = Monday).
fn parse_days(entry: &str, days: &str) -> Result<Vec<u32>, ScheduleError> {
    let bad = |d: &str| ScheduleError::Day {
        entry: entry.to_string(),
        day: d.to_string(),
    };
    if days.eq_ignore_ascii_case("daily") {
        return Ok((0..7).collect());
    }
    let day = |d: &str| {
        let l = d.to_ascii_lowercase();
        DAY_NAMES
            .iter()
            .zip(FULL_DAY_NAMES)
            .position(|(short, full)| l == *short || l == full)
            .map(|i| i as u32)
            .ok_or_else(|| bad(d))
    };
    let mut out = Vec::new();
    for item in days.split(',') {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    if !out.contains(&d) {
                        out.push(d);
                    }
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => {
                let d = day(item)?;
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
    }
    Ok(out)
}

/// Why training is paused, when it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// `potluck pause`; lasts until `potluck resume`.
    Command,
    /// A window of the config's schedule.
    Schedule,
}

impl PauseCause {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Command => "paused by `potluck pause` (until `potluck resume`)",
            PauseCause::Schedule => "paused by the config's pause_schedule",
        }
    }
}

/// `potluck pause` / `potluck resume` combined with the schedule.
#[derive(Debug, Clone, Default)]
pub struct PauseSwitch {
    schedule: Schedule,
    /// `Some(true)`: paused by command. `Some(false)`: resumed by command inside a window,
    /// until the schedule is next inactive.
    manual: Option<bool>,
}

impl PauseSwitch {
    /// A switch on `schedule`, paused by command when `paused` (a pause that survived a
    /// restart).
    pub fn new(schedule: Schedule, paused: bool) -> Self {
        PauseSwitch {
            schedule,
            manual: paused.then_some(true),
        }
    }

    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// `potluck pause`.
    pub fn pause(&mut self) {
        self.manual = Some(true);
    }

    /// `potluck resume` at `now`: a manual pause ends, and a scheduled window is skipped
    /// until it ends.
    pub fn resume(&mut self, now: u64) {
        self.manual = self.schedule.active_at(now).then_some(false);
    }

    /// Whether a command paused training (what survives a restart).
    pub fn paused_by_command(&self) -> bool {
        self.manual == Some(true)
    }

    /// Why training is paused at `now`, or `None` when it runs. Call it regularly (the
    /// service does every few seconds): a resume inside a window lapses once the window
    /// has ended.
    pub fn poll(&mut self, now: u64) -> Option<PauseCause> {
        let scheduled = self.schedule.active_at(now);
        match self.manual {
            Some(true) => Some(PauseCause::Command),
            Some(false) if scheduled => None,
            Some(false) => {
                self.manual = None;
                None
            }
            None => scheduled.then_some(PauseCause::Schedule),
        }
    }
}

/// What a coordinator does about a member's pause notice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseStep {
    /// Take it out of the member set; with `announce`, tell the open round's other members
    /// it is gone (it is a participant that has not reported), so they stop waiting for it.
    Leave { announce: bool },
    /// Admit it again: it takes part from the next round on.
    Rejoin,
    /// Nothing now (a repeated notice, or a resume deferred until the open round is over).
    Nothing,
}

/// The coordinator's register of paused members: who is paused (still linked, expected
/// back), and who resumed while still a participant of the open round without a report.
/// Such a member rejoins only once that round is over: admitted at once, it would count as
/// a participant still to report, and the round would wait for a report that cannot come.
/// Bounded by the members a run admits (a notice comes on a member's control stream).
#[derive(Debug, Clone)]
pub struct PausedMembers<P> {
    paused: BTreeSet<P>,
    deferred: BTreeSet<P>,
}

impl<P> Default for PausedMembers<P> {
    fn default() -> Self {
        PausedMembers {
            paused: BTreeSet::new(),
            deferred: BTreeSet::new(),
        }
    }
}

impl<P: Ord + Clone> PausedMembers<P> {
    /// `peer` pauses (`paused`) or resumes; `pending` says whether it is a participant of
    /// the open round that has not reported.
    pub fn handle_notice(&mut self, peer: P, paused: bool, pending: bool) -> PauseStep {
        if paused {
            self.deferred.remove(&peer);
            if self.paused.insert(peer) {
                PauseStep::Leave { announce: pending }
            } else {
                PauseStep::Nothing
            }
        } else if self.paused.remove(&peer) {
            if pending {
                self.deferred.insert(peer);
                PauseStep::Nothing
            } else {
                PauseStep::Rejoin
            }
        } else {
            PauseStep::Nothing
        }
    }

    /// The resumed members that may rejoin now (`pending`: still a participant of the open
    /// round without a report); they leave the register.
    pub fn poll_rejoin(&mut self, pending: impl Fn(&P) -> bool) -> Vec<P> {
        let ready: Vec<P> = self
            .deferred
            .iter()
            .filter(|p| !pending(p))
            .cloned()
            .collect();
        for p in &ready {
            self.deferred.remove(p);
        }
        ready
    }

    /// `peer`'s control stream ended: it is gone, not paused.
    pub fn handle_closed(&mut self, peer: &P) {
        self.paused.remove(peer);
        self.deferred.remove(peer);
    }

    /// Members paused now.
    pub fn paused(&self) -> usize {
        self.paused.len()
    }

    /// Whether resumed members wait for the open round to end.
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }
}

/// Whether a coordinator whose open round cannot start for lack of members keeps waiting
/// (instead of ending the run on its last commit) because paused members will come back:
/// only when they would make up the minimum.
pub fn wait_for_paused(members: usize, paused: usize, min_members: usize) -> bool {
    paused > 0 && members + paused >= min_members
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix seconds of a day of the week of 2024-01-01 (a Monday) at `h:m` UTC.
    fn at(day: u64, h: u64, m: u64) -> u64 {
        const MONDAY_2024_01_01: u64 = 1_704_067_200;
        MONDAY_2024_01_01 + day * 86_400 + h * 3600 + m * 60
    }

    #[test]
    fn the_week_starts_on_monday_utc() {
        assert_eq!(minute_of_week(at(0, 0, 0)), 0);
        assert_eq!(minute_of_week(at(6, 23, 59)), MINUTES_PER_WEEK - 1);
        assert_eq!(minute_of_week(at(7, 0, 0)), 0);
        assert_eq!(
            minute_of_week(0),
            3 * MINUTES_PER_DAY,
            "1970-01-01 was a Thursday"
        );
    }

    #[test]
    fn weekday_evenings_pause_and_weekends_do_not() {
        let s = Schedule::parse(&["Mon-Fri 18:00-23:00"]).unwrap();
        assert!(s.active_at(at(0, 18, 0)));
        assert!(s.active_at(at(4, 22, 59)));
        assert!(!s.active_at(at(4, 23, 0)), "the end is exclusive");
        assert!(!s.active_at(at(2, 17, 59)));
        assert!(!s.active_at(at(5, 19, 0)), "Saturday");
        assert!(!s.active_at(at(6, 19, 0)), "Sunday");
    }

    #[test]
    fn a_window_past_midnight_ends_the_next_day_and_sunday_wraps_to_monday() {
        let s = Schedule::parse(&["Sun 22:00-02:00"]).unwrap();
        assert!(s.active_at(at(6, 23, 0)));
        assert!(s.active_at(at(7, 1, 59)), "Monday morning of the next week");
        assert!(s.active_at(at(0, 1, 0)), "any Monday morning");
        assert!(!s.active_at(at(0, 2, 0)));
        assert!(!s.active_at(at(5, 23, 0)), "Saturday");
    }

    #[test]
    fn offsets_move_windows_to_utc() {
        // 18:00-20:00 at UTC+02:00 is 16:00-18:00 UTC.
        let s = Schedule::parse(&["Wed 18:00-20:00 +02:00"]).unwrap();
        assert!(s.active_at(at(2, 16, 0)));
        assert!(!s.active_at(at(2, 18, 0)));
        // Monday 00:30 at UTC+01:00 is Sunday 23:30 UTC: the window wraps the week.
        let s = Schedule::parse(&["Mon 00:30-01:00 +01:00"]).unwrap();
        assert!(s.active_at(at(6, 23, 30)));
        assert!(!s.active_at(at(0, 0, 30)));
        let s = Schedule::parse(&["daily 09:00-10:00 -05:30"]).unwrap();
        assert!(s.active_at(at(3, 14, 30)));
        assert!(!s.active_at(at(3, 9, 0)));
        assert_eq!(
            Schedule::parse(&["daily 09:00-10:00 UTC"]).unwrap().windows,
            Schedule::parse(&["daily 09:00-10:00"]).unwrap().windows
        );
    }

    #[test]
    fn day_lists_ranges_and_names() {
        let s = Schedule::parse(&["mon,Wednesday,Fri-sun 12:00-13:00"]).unwrap();
        let on: Vec<u64> = (0..7).filter(|d| s.active_at(at(*d, 12, 30))).collect();
        assert_eq!(on, vec![0, 2, 4, 5, 6]);
        let s = Schedule::parse(&["Sat-Mon 12:00-13:00"]).unwrap();
        let on: Vec<u64> = (0..7).filter(|d| s.active_at(at(*d, 12, 30))).collect();
        assert_eq!(on, vec![0, 5, 6], "a range wraps the week");
        assert_eq!(
            Schedule::parse(&["daily 00:00-23:59"])
                .unwrap()
                .windows
                .len(),
            7
        );
        assert!(Schedule::parse::<&str>(&[]).unwrap().is_empty());
    }

    #[test]
    fn malformed_entries_say_what_is_wrong() {
        let err = |e: &str| Schedule::parse(&[e]).unwrap_err();
        assert!(matches!(err("Mon-Fri"), ScheduleError::Shape(_)));
        assert!(matches!(err("Mon-Fri 18:00"), ScheduleError::Shape(_)));
        assert!(matches!(
            err("Mon 18:00-19:00 UTC extra"),
            ScheduleError::Shape(_)
        ));
        assert!(
            matches!(err("Mondy 18:00-19:00"), ScheduleError::Day { day, .. } if day == "Mondy")
        );
        assert!(matches!(err("Mo 18:00-19:00"), ScheduleError::Day { .. }));
        assert!(matches!(
            err("Mon-Xyz 18:00-19:00"),
            ScheduleError::Day { .. }
        ));
        assert!(
            matches!(err("Mon 24:00-01:00"), ScheduleError::Time { time, .. } if time == "24:00")
        );
        assert!(matches!(err("Mon 18:60-19:00"), ScheduleError::Time { .. }));
        assert!(matches!(err("Mon 18-19"), ScheduleError::Time { .. }));
        assert!(matches!(
            err("Mon 18:00-18:00"),
            ScheduleError::Empty { .. }
        ));
        assert!(matches!(
            err("Mon 18:00-19:00 CET"),
            ScheduleError::Offset { .. }
        ));
        assert!(matches!(
            err("Mon 18:00-19:00 +15:00"),
            ScheduleError::Offset { .. }
        ));
        assert!(matches!(err(&"x".repeat(500)), ScheduleError::TooLong(_)));
        let many = vec!["Mon 18:00-19:00"; MAX_ENTRIES + 1];
        assert_eq!(
            Schedule::parse(&many).unwrap_err(),
            ScheduleError::TooMany(65)
        );
        let msg = err("Mon 25:00-26:00").to_string();
        assert!(msg.contains("25:00") && msg.contains("HH:MM"), "{msg}");
    }

    #[test]
    fn a_command_pause_holds_until_resume_whatever_the_schedule() {
        let s = Schedule::parse(&["Mon 18:00-20:00"]).unwrap();
        let mut sw = PauseSwitch::new(s, false);
        assert_eq!(sw.poll(at(0, 12, 0)), None);
        sw.pause();
        assert_eq!(sw.poll(at(0, 12, 0)), Some(PauseCause::Command));
        assert_eq!(sw.poll(at(0, 19, 0)), Some(PauseCause::Command));
        assert_eq!(
            sw.poll(at(0, 21, 0)),
            Some(PauseCause::Command),
            "the window's end does not resume it"
        );
        assert!(sw.paused_by_command());
        sw.resume(at(0, 21, 0));
        assert_eq!(sw.poll(at(0, 21, 0)), None);
        assert!(!sw.paused_by_command());
        assert_eq!(
            sw.poll(at(7, 18, 30)),
            Some(PauseCause::Schedule),
            "next week's window"
        );
    }

    #[test]
    fn a_resume_inside_a_window_lasts_until_the_window_ends() {
        let s = Schedule::parse(&["Mon 18:00-20:00", "Tue 18:00-20:00"]).unwrap();
        let mut sw = PauseSwitch::new(s, false);
        assert_eq!(sw.poll(at(0, 18, 30)), Some(PauseCause::Schedule));
        sw.resume(at(0, 18, 30));
        assert_eq!(sw.poll(at(0, 19, 0)), None);
        assert_eq!(sw.poll(at(0, 20, 0)), None);
        assert_eq!(
            sw.poll(at(1, 18, 0)),
            Some(PauseCause::Schedule),
            "the next window pauses again"
        );
    }

    #[test]
    fn a_pause_survives_a_restart_as_a_command_pause() {
        let mut sw = PauseSwitch::new(Schedule::default(), true);
        assert_eq!(sw.poll(at(0, 0, 0)), Some(PauseCause::Command));
    }

    #[test]
    fn a_paused_member_leaves_once_and_is_announced_only_when_the_round_waits_for_it() {
        let mut m = PausedMembers::default();
        assert_eq!(
            m.handle_notice(1, true, true),
            PauseStep::Leave { announce: true }
        );
        assert_eq!(
            m.handle_notice(1, true, true),
            PauseStep::Nothing,
            "a repeat"
        );
        assert_eq!(
            m.handle_notice(2, true, false),
            PauseStep::Leave { announce: false }
        );
        assert_eq!(m.paused(), 2);
        assert_eq!(
            m.handle_notice(3, false, false),
            PauseStep::Nothing,
            "never paused"
        );
    }

    #[test]
    fn a_resume_mid_round_waits_for_the_round_to_end() {
        let mut m = PausedMembers::default();
        m.handle_notice(1, true, true);
        m.handle_notice(2, true, false);
        assert_eq!(
            m.handle_notice(2, false, false),
            PauseStep::Rejoin,
            "no round waits"
        );
        assert_eq!(
            m.handle_notice(1, false, true),
            PauseStep::Nothing,
            "deferred"
        );
        assert_eq!(m.paused(), 0);
        assert!(m.has_deferred());
        assert!(
            m.poll_rejoin(|_| true).is_empty(),
            "the round is still open"
        );
        assert_eq!(m.poll_rejoin(|_| false), vec![1]);
        assert!(!m.has_deferred());
        assert!(m.poll_rejoin(|_| false).is_empty(), "once");
    }

    #[test]
    fn a_closed_stream_forgets_a_paused_or_deferred_member_and_a_pause_cancels_a_resume() {
        let mut m = PausedMembers::default();
        m.handle_notice(1, true, false);
        m.handle_notice(2, true, true);
        m.handle_notice(2, false, true);
        m.handle_closed(&1);
        m.handle_closed(&2);
        assert_eq!(m.paused(), 0);
        assert!(!m.has_deferred());
        m.handle_notice(3, true, true);
        m.handle_notice(3, false, true);
        assert_eq!(
            m.handle_notice(3, true, true),
            PauseStep::Leave { announce: true }
        );
        assert!(!m.has_deferred(), "paused again before it rejoined");
    }

    #[test]
    fn the_coordinator_waits_only_for_paused_members_that_would_make_up_the_minimum() {
        assert!(wait_for_paused(1, 1, 2));
        assert!(wait_for_paused(0, 3, 3));
        assert!(
            !wait_for_paused(1, 0, 2),
            "nobody paused: nobody to wait for"
        );
        assert!(
            !wait_for_paused(0, 1, 3),
            "not enough even with the paused ones"
        );
    }
}
