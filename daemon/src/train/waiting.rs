//! Why a run waits, in words: `potluck run status`, the JSON state and the dashboard show
//! [`explain`]'s sentence, a pure function of the session's status (what it is doing, the
//! coordinator's lobby, the counts of the exchange or the reports in progress) and of the
//! pause switch. The session only records facts; this module decides what they mean to a
//! person, and is tested for every state without a run.

use serde::Serialize;

/// What a run's session is doing now; each step of the session sets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No run here yet.
    #[default]
    Idle,
    /// Joining: the coordinator has not welcomed this replica yet.
    Reaching,
    /// The run's coordinator went away; walking the succession for the next one.
    LookingForCoordinator,
    /// Getting the run's data package.
    FetchingData,
    /// Welcomed; no round is open for this replica (the coordinator waits for members, or
    /// for the round in progress without it to end).
    Lobby,
    /// Downloading the committed checkpoint this round starts from.
    FetchingCheckpoint,
    /// The inner steps of a round.
    Training,
    /// Sending this replica's update and collecting the others' for its slice.
    Exchanging,
    /// Reported; the coordinator waits for a quorum of reports.
    AwaitingCommit,
    /// Left the rounds because training is paused here.
    Paused,
    Finished,
    Failed,
}

/// The facts [`explain`] reads (the session's status carries them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    pub phase: Phase,
    pub round: u64,
    /// The coordinator's last lobby word: members, members a round needs, paused members.
    pub lobby: Option<(u32, u32, u32)>,
    /// The exchange in progress: members whose word this replica has for its slice, and
    /// the members of the round.
    pub collected: Option<(u32, u32)>,
    /// At a coordinator: reports in for the open round, and its participants.
    pub reports: Option<(u32, u32)>,
    /// Why training is paused here, when it is.
    pub paused: Option<&'static str>,
}

/// What the run waits for, or an empty string when it waits for nothing (it trains, or it
/// is over).
pub fn explain(f: &Facts) -> String {
    if let Some(why) = f.paused
        && !matches!(f.phase, Phase::Finished | Phase::Failed | Phase::Idle)
    {
        return format!(
            "{why}: this replica sits the rounds out; `potluck resume` rejoins with its state"
        );
    }
    match f.phase {
        Phase::Idle | Phase::Training | Phase::Finished | Phase::Failed => String::new(),
        Phase::Paused => "paused".into(),
        Phase::Reaching => "waiting for the coordinator to welcome this replica".into(),
        Phase::LookingForCoordinator => {
            "the coordinator went away: looking for it or its successor".into()
        }
        Phase::FetchingData => "downloading the run's data".into(),
        Phase::FetchingCheckpoint => format!(
            "downloading the committed checkpoint that round {} starts from",
            f.round
        ),
        Phase::Lobby => match f.lobby {
            Some((members, needed, paused)) if members < needed => {
                let mut s = format!(
                    "waiting for peers: {members} of {needed} peers joined (min_peers = {needed})"
                );
                if paused > 0 {
                    s.push_str(&format!(", {paused} more paused"));
                }
                s
            }
            _ => "waiting for the coordinator to open the next round".into(),
        },
        Phase::Exchanging => match f.collected {
            Some((k, n)) => format!(
                "round {}: collecting updates, {k} of {n} members' for this replica's slice",
                f.round
            ),
            None => format!("round {}: collecting updates", f.round),
        },
        Phase::AwaitingCommit => match f.reports {
            Some((k, n)) => format!(
                "round {}: waiting for the commit, {k} of {n} reports in",
                f.round
            ),
            None => format!(
                "round {}: reported, waiting for a quorum of the round's members to agree",
                f.round
            ),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(phase: Phase) -> Facts {
        Facts {
            phase,
            round: 5,
            ..Default::default()
        }
    }

    #[test]
    fn a_lobby_short_of_min_peers_counts_the_peers() {
        let f = Facts {
            lobby: Some((2, 4, 0)),
            ..facts(Phase::Lobby)
        };
        assert_eq!(
            explain(&f),
            "waiting for peers: 2 of 4 peers joined (min_peers = 4)"
        );
        let f = Facts {
            lobby: Some((1, 3, 1)),
            ..facts(Phase::Lobby)
        };
        assert!(explain(&f).ends_with("1 of 3 peers joined (min_peers = 3), 1 more paused"));
        let f = Facts {
            lobby: Some((4, 4, 0)),
            ..facts(Phase::Lobby)
        };
        assert_eq!(
            explain(&f),
            "waiting for the coordinator to open the next round"
        );
        assert_eq!(
            explain(&facts(Phase::Lobby)),
            explain(&f),
            "no lobby word yet"
        );
    }

    #[test]
    fn every_waiting_phase_says_what_it_waits_for() {
        assert_eq!(
            explain(&facts(Phase::Reaching)),
            "waiting for the coordinator to welcome this replica"
        );
        assert!(explain(&facts(Phase::LookingForCoordinator)).contains("successor"));
        assert_eq!(
            explain(&facts(Phase::FetchingData)),
            "downloading the run's data"
        );
        assert_eq!(
            explain(&facts(Phase::FetchingCheckpoint)),
            "downloading the committed checkpoint that round 5 starts from"
        );
        let f = Facts {
            collected: Some((1, 3)),
            ..facts(Phase::Exchanging)
        };
        assert_eq!(
            explain(&f),
            "round 5: collecting updates, 1 of 3 members' for this replica's slice"
        );
        assert_eq!(
            explain(&facts(Phase::Exchanging)),
            "round 5: collecting updates"
        );
        let f = Facts {
            reports: Some((2, 3)),
            ..facts(Phase::AwaitingCommit)
        };
        assert_eq!(
            explain(&f),
            "round 5: waiting for the commit, 2 of 3 reports in"
        );
        assert!(explain(&facts(Phase::AwaitingCommit)).contains("quorum"));
        assert_eq!(explain(&facts(Phase::Paused)), "paused");
    }

    #[test]
    fn training_and_the_end_wait_for_nothing() {
        for p in [Phase::Idle, Phase::Training, Phase::Finished, Phase::Failed] {
            assert_eq!(explain(&facts(p)), "", "{p:?}");
        }
    }

    #[test]
    fn a_pause_outranks_the_phase_until_the_run_ends() {
        let why = "paused by `potluck pause` (until `potluck resume`)";
        for p in [
            Phase::Lobby,
            Phase::Training,
            Phase::Paused,
            Phase::AwaitingCommit,
        ] {
            let f = Facts {
                paused: Some(why),
                ..facts(p)
            };
            assert!(explain(&f).starts_with(why), "{p:?}: {}", explain(&f));
        }
        let f = Facts {
            paused: Some(why),
            ..facts(Phase::Finished)
        };
        assert_eq!(explain(&f), "");
    }
}
