//! Verified multi-source download of a checkpoint as a pure state machine: it decides which
//! piece to ask of which source, checks every piece against the manifest before it is
//! accepted, bans for the rest of the transfer a source that served a bad piece, and resumes
//! from the pieces already verified on disk. The daemon moves the bytes (QUIC streams) and
//! writes accepted pieces at their offsets; see [`crate::verify::verified_pieces`] for the
//! resume scan.
//!
//! Pieces are the manifest's hashed units ([`crate::manifest::Piece`]): each safetensors
//! header, each tensor chunk, each chunk of other files. Together they tile every file, so
//! a completed download is the checkpoint byte for byte.

use crate::Hash32;
use crate::manifest::{CheckpointContent, Piece};
use std::collections::BTreeMap;

/// The daemon's handle for a peer serving the checkpoint.
pub type SourceId = u64;

/// Ask `source` for the bytes of `piece`: `len` bytes of `file` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub source: SourceId,
    pub piece: usize,
    pub file: String,
    pub offset: u64,
    pub len: u64,
    /// When to give up on this request ([`Download::handle_timeout`]).
    pub deadline_ms: u64,
}

/// Why a piece was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PieceRejected {
    #[error("source {from} served a piece whose hash does not match the manifest: banned")]
    BadHash { from: SourceId, piece: usize },
    #[error("source {from} served {got} bytes for a piece of {expected}: banned")]
    BadLength {
        from: SourceId,
        piece: usize,
        expected: u64,
        got: u64,
    },
    #[error("piece {piece} was not requested from source {from}")]
    Unsolicited { from: SourceId, piece: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceState {
    Missing,
    InFlight { source: SourceId, deadline_ms: u64 },
    Verified,
}

#[derive(Debug, Clone, Default)]
struct SourceState {
    banned: bool,
    in_flight: usize,
    served: u64,
}

/// Settings of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DownloadConfig {
    /// Outstanding requests per source; also the most pieces a source can have in flight
    /// when a transfer is interrupted, hence re-fetched on resume.
    pub max_in_flight_per_source: usize,
    pub request_timeout_ms: u64,
}

impl Default for DownloadConfig {
    fn default() -> Self {
        DownloadConfig {
            max_in_flight_per_source: 4,
            request_timeout_ms: 30_000,
        }
    }
}

/// One checkpoint download.
#[derive(Debug, Clone)]
pub struct Download {
    config: DownloadConfig,
    files: Vec<String>,
    pieces: Vec<Piece>,
    state: Vec<PieceState>,
    sources: BTreeMap<SourceId, SourceState>,
    /// Lowest index that may still be missing, so polling is O(1) amortised.
    cursor: usize,
    verified_bytes: u64,
    total_bytes: u64,
}

impl Download {
    /// A download of `content`; `already_verified[i]` marks pieces found intact on disk
    /// (shorter slices count the rest as missing).
    pub fn new(
        content: &CheckpointContent,
        already_verified: &[bool],
        config: DownloadConfig,
    ) -> Self {
        let pieces = content.pieces();
        let state: Vec<PieceState> = (0..pieces.len())
            .map(|i| {
                if already_verified.get(i).copied().unwrap_or(false) {
                    PieceState::Verified
                } else {
                    PieceState::Missing
                }
            })
            .collect();
        let verified_bytes = pieces
            .iter()
            .zip(&state)
            .filter(|(_, s)| **s == PieceState::Verified)
            .map(|(p, _)| p.len)
            .sum();
        Download {
            config: DownloadConfig {
                max_in_flight_per_source: config.max_in_flight_per_source.max(1),
                ..config
            },
            files: content.files.iter().map(|f| f.path.clone()).collect(),
            total_bytes: pieces.iter().map(|p| p.len).sum(),
            pieces,
            state,
            sources: BTreeMap::new(),
            cursor: 0,
            verified_bytes,
        }
    }

    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// A peer that can serve the checkpoint.
    pub fn add_source(&mut self, source: SourceId) {
        self.sources.entry(source).or_default();
    }

    /// A source went away: its outstanding pieces are asked of others.
    pub fn remove_source(&mut self, source: SourceId) {
        self.sources.remove(&source);
        self.release(source);
    }

    pub fn is_banned(&self, source: SourceId) -> bool {
        self.sources.get(&source).is_some_and(|s| s.banned)
    }

    pub fn is_complete(&self) -> bool {
        self.verified_bytes == self.total_bytes
            && self.state.iter().all(|s| *s == PieceState::Verified)
    }

    /// (verified bytes, total bytes).
    pub fn progress(&self) -> (u64, u64) {
        (self.verified_bytes, self.total_bytes)
    }

    /// Pieces remain but no usable source is left.
    pub fn is_stalled(&self) -> bool {
        !self.is_complete() && self.sources.values().all(|s| s.banned)
    }

    /// Bytes each source served that were accepted.
    pub fn served(&self, source: SourceId) -> u64 {
        self.sources.get(&source).map_or(0, |s| s.served)
    }

    /// The next request to send, if a piece is missing and a source has room. Spreads
    /// requests over the least busy sources.
    pub fn poll_request(&mut self, now_ms: u64) -> Option<Request> {
        while self.cursor < self.state.len() && self.state[self.cursor] == PieceState::Verified {
            self.cursor += 1;
        }
        let piece =
            (self.cursor..self.state.len()).find(|i| self.state[*i] == PieceState::Missing)?;
        let (&source, st) = self
            .sources
            .iter_mut()
            .filter(|(_, s)| !s.banned && s.in_flight < self.config.max_in_flight_per_source)
            .min_by_key(|(id, s)| (s.in_flight, **id))?;
        st.in_flight += 1;
        let deadline_ms = now_ms.saturating_add(self.config.request_timeout_ms);
        self.state[piece] = PieceState::InFlight {
            source,
            deadline_ms,
        };
        let p = &self.pieces[piece];
        Some(Request {
            source,
            piece,
            file: self.files[p.file].clone(),
            offset: p.offset,
            len: p.len,
            deadline_ms,
        })
    }

    /// Bytes `data` arrived from `source` for `piece`. `Ok` means verified: write it at the
    /// piece's offset. A bad piece bans the source for this transfer and puts all its
    /// outstanding pieces back to be fetched from others.
    pub fn handle_data(
        &mut self,
        source: SourceId,
        piece: usize,
        data: &[u8],
    ) -> Result<(), PieceRejected> {
        match self.state.get(piece) {
            Some(PieceState::InFlight { source: s, .. }) if *s == source => {}
            _ => {
                return Err(PieceRejected::Unsolicited {
                    from: source,
                    piece,
                });
            }
        }
        let p = &self.pieces[piece];
        if data.len() as u64 != p.len {
            let err = PieceRejected::BadLength {
                from: source,
                piece,
                expected: p.len,
                got: data.len() as u64,
            };
            self.ban(source);
            return Err(err);
        }
        if Hash32::from(blake3::hash(data)) != p.hash {
            self.ban(source);
            return Err(PieceRejected::BadHash {
                from: source,
                piece,
            });
        }
        self.state[piece] = PieceState::Verified;
        self.verified_bytes += p.len;
        if let Some(s) = self.sources.get_mut(&source) {
            s.in_flight = s.in_flight.saturating_sub(1);
            s.served += p.len;
        }
        Ok(())
    }

    /// A request failed without data (stream reset, refusal): ask again elsewhere or later.
    pub fn handle_failure(&mut self, source: SourceId, piece: usize) {
        if let Some(PieceState::InFlight { source: s, .. }) = self.state.get(piece)
            && *s == source
        {
            self.state[piece] = PieceState::Missing;
            self.cursor = self.cursor.min(piece);
            if let Some(st) = self.sources.get_mut(&source) {
                st.in_flight = st.in_flight.saturating_sub(1);
            }
        }
    }

    /// Requests past their deadline are treated as failed.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let expired: Vec<(SourceId, usize)> = self
            .state
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                PieceState::InFlight {
                    source,
                    deadline_ms,
                } if *deadline_ms <= now_ms => Some((*source, i)),
                _ => None,
            })
            .collect();
        for (s, i) in expired {
            self.handle_failure(s, i);
        }
    }

    /// Bans `source` for the rest of the transfer and asks its outstanding pieces of the
    /// others: for misbehaviour the daemon sees before any piece data arrives (an answer
    /// that announces more bytes than were asked for, a protocol violation).
    pub fn ban(&mut self, source: SourceId) {
        if let Some(s) = self.sources.get_mut(&source) {
            s.banned = true;
        }
        self.release(source);
    }

    fn release(&mut self, source: SourceId) {
        for (i, s) in self.state.iter_mut().enumerate() {
            if matches!(s, PieceState::InFlight { source: x, .. } if *x == source) {
                *s = PieceState::Missing;
                self.cursor = self.cursor.min(i);
            }
        }
        if let Some(s) = self.sources.get_mut(&source) {
            s.in_flight = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use std::collections::HashMap;

    fn fixture() -> (
        tempfile::TempDir,
        CheckpointContent,
        HashMap<String, Vec<u8>>,
    ) {
        let t = tempfile::tempdir().unwrap();
        write_model(t.path(), 3);
        let content = CheckpointContent::scan(t.path(), CHUNK).unwrap();
        let files = content
            .files
            .iter()
            .map(|f| {
                (
                    f.path.clone(),
                    std::fs::read(t.path().join(&f.path)).unwrap(),
                )
            })
            .collect();
        (t, content, files)
    }

    /// Serves `req` from `files`; source 666 lies (flips a byte), source 667 truncates.
    fn serve(files: &HashMap<String, Vec<u8>>, req: &Request) -> Vec<u8> {
        let b = &files[&req.file][req.offset as usize..(req.offset + req.len) as usize];
        let mut v = b.to_vec();
        match req.source {
            666 => v[0] ^= 1,
            667 => {
                v.pop();
            }
            _ => {}
        }
        v
    }

    fn run_to_end(
        d: &mut Download,
        files: &HashMap<String, Vec<u8>>,
        out: &mut HashMap<String, Vec<u8>>,
        limit: Option<usize>,
    ) -> usize {
        let mut fetched = 0;
        loop {
            let mut reqs = Vec::new();
            while let Some(r) = d.poll_request(0) {
                reqs.push(r);
            }
            if reqs.is_empty() {
                return fetched;
            }
            for r in reqs {
                if limit.is_some_and(|l| fetched >= l) {
                    return fetched; // interrupted: outstanding requests are lost
                }
                fetched += 1;
                let data = serve(files, &r);
                if d.handle_data(r.source, r.piece, &data).is_ok() {
                    let f = out
                        .entry(r.file.clone())
                        .or_insert_with(|| vec![0; files[&r.file].len()]);
                    f[r.offset as usize..(r.offset + r.len) as usize].copy_from_slice(&data);
                }
            }
        }
    }

    #[test]
    fn liars_are_banned_and_the_download_completes_from_the_others() {
        let (_t, content, files) = fixture();
        let mut d = Download::new(&content, &[], DownloadConfig::default());
        for s in [1, 2, 666, 667] {
            d.add_source(s);
        }
        let mut out = HashMap::new();
        run_to_end(&mut d, &files, &mut out, None);
        assert!(d.is_complete());
        assert!(d.is_banned(666) && d.is_banned(667));
        assert!(!d.is_banned(1) && !d.is_banned(2));
        assert!(d.served(1) > 0 && d.served(2) > 0, "load is spread");
        assert_eq!(out, files);
    }

    #[test]
    fn interrupted_download_resumes_fetching_at_most_one_piece_per_source_again() {
        let (_t, content, files) = fixture();
        let cfg = DownloadConfig {
            max_in_flight_per_source: 1,
            ..DownloadConfig::default()
        };
        let mut d = Download::new(&content, &[], cfg);
        d.add_source(1);
        d.add_source(2);
        let mut out = HashMap::new();
        let half = d.pieces().len() / 2;
        run_to_end(&mut d, &files, &mut out, Some(half));
        assert!(!d.is_complete());
        // What a resume scan of the disk finds: the pieces whose bytes verify.
        let on_disk: Vec<bool> = d
            .pieces()
            .iter()
            .map(|p| {
                let name = &content.files[p.file].path;
                out.get(name).is_some_and(|b| {
                    Hash32::from(blake3::hash(
                        &b[p.offset as usize..(p.offset + p.len) as usize],
                    )) == p.hash
                })
            })
            .collect();
        let done = on_disk.iter().filter(|v| **v).count();
        let mut d2 = Download::new(&content, &on_disk, cfg);
        d2.add_source(1);
        d2.add_source(2);
        let refetched = run_to_end(&mut d2, &files, &mut out, None);
        assert!(d2.is_complete());
        assert_eq!(out, files);
        assert!(
            refetched <= d.pieces().len() - half + 2,
            "refetched {refetched}"
        );
        assert_eq!(refetched, d.pieces().len() - done);
    }

    #[test]
    fn timeouts_and_failures_requeue_and_unsolicited_data_is_refused() {
        let (_t, content, files) = fixture();
        let cfg = DownloadConfig {
            max_in_flight_per_source: 1,
            request_timeout_ms: 100,
        };
        let mut d = Download::new(&content, &[], cfg);
        d.add_source(1);
        let r = d.poll_request(0).unwrap();
        assert!(d.poll_request(0).is_none(), "one in flight per source");
        assert_eq!(
            d.handle_data(2, r.piece, &serve(&files, &r)),
            Err(PieceRejected::Unsolicited {
                from: 2,
                piece: r.piece
            })
        );
        d.handle_timeout(100);
        let r2 = d.poll_request(100).unwrap();
        assert_eq!(r2.piece, r.piece, "timed-out piece asked again");
        d.handle_failure(1, r2.piece);
        d.remove_source(1);
        assert!(d.poll_request(200).is_none());
        d.add_source(666);
        let r3 = d.poll_request(200).unwrap();
        assert!(d.handle_data(666, r3.piece, &serve(&files, &r3)).is_err());
        assert!(d.is_stalled());
    }

    #[test]
    fn a_source_banned_for_a_protocol_violation_gives_back_its_pieces() {
        let (_t, content, files) = fixture();
        let cfg = DownloadConfig {
            max_in_flight_per_source: 2,
            ..DownloadConfig::default()
        };
        let mut d = Download::new(&content, &[], cfg);
        d.add_source(1);
        let a = d.poll_request(0).unwrap();
        let b = d.poll_request(0).unwrap();
        assert!(d.poll_request(0).is_none());
        d.ban(1);
        assert!(d.is_banned(1) && d.is_stalled());
        // Late data from the banned source is refused.
        assert!(d.handle_data(1, a.piece, &serve(&files, &a)).is_err());
        d.add_source(2);
        let again: Vec<usize> = std::iter::from_fn(|| d.poll_request(0))
            .map(|r| r.piece)
            .collect();
        assert_eq!(
            again,
            vec![a.piece, b.piece],
            "its pieces go to the next source"
        );
    }
}
