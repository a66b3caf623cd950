//! The data plane's wire format: framed, length-limited, compressed tensor messages.
//!
//! A frame is `u32 header length | FrameHeader (protobuf) | payload`, where the header says
//! how long the payload is on the wire and once decompressed, how it is compressed (zstd or
//! not at all, whichever is smaller) and its blake3 hash. Every length is checked against
//! [`Limits`] before anything is allocated, the payload buffer grows only as bytes arrive
//! (to at most 1 MiB or 8 times what has arrived), and zstd is told the exact output size,
//! so a peer cannot make us allocate what it only claims. An uncompressed payload is sent
//! without a copy and hashed as it arrives. Frames travel on QUIC streams opened through libp2p, so the remote peer id is
//! already authenticated; the header is additionally signed by its sender so that a reducer
//! can prove to the others who contributed what.
//!
//! The functions here are generic over `futures` I/O traits and carry no deadlines of their
//! own: callers wrap them in `tokio::time::timeout`.

use std::borrow::Cow;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use potluck_proto::v1::{FrameHeader, FrameKind, PayloadCompression};
use potluck_proto::{DecodeError, PROTOCOL_VERSION, check_version, decode_limited};
use prost::Message;

/// Size limits for one frame.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The largest encoded header accepted.
    pub max_header: usize,
    /// The largest payload accepted, on the wire and decompressed.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_header: 64 * 1024,
            max_payload: 1 << 30,
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame header of {len} bytes exceeds the limit of {limit}")]
    HeaderTooLarge { len: usize, limit: usize },
    #[error("frame payload of {len} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { len: u64, limit: usize },
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("payload is truncated: {got} of {want} bytes arrived")]
    Truncated { got: usize, want: u64 },
    #[error("payload does not decompress to its declared {want} bytes: {reason}")]
    Decompress { want: u64, reason: String },
    #[error("payload hash does not match its header: the payload was corrupted")]
    HashMismatch,
    #[error("frame kind {0} is unknown")]
    UnknownKind(i32),
}

/// A frame as read: its header and decompressed, hash-checked payload.
#[derive(Debug)]
pub struct Frame {
    pub header: FrameHeader,
    pub payload: Vec<u8>,
    /// Bytes this frame took on the wire, prefix and header included.
    pub wire_bytes: u64,
}

impl Frame {
    /// The frame's kind; unknown kinds are refused when the frame is read.
    pub fn kind(&self) -> FrameKind {
        FrameKind::try_from(self.header.kind).unwrap_or(FrameKind::Unspecified)
    }
}

/// The bytes a frame's sender signs: every header field that says what the payload is,
/// in a fixed layout (protobuf encodings are not canonical, so they are never signed).
pub fn signing_bytes(h: &FrameHeader) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + h.run_id.len());
    out.extend_from_slice(b"potluck-frame-v1");
    let put = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u64).to_le_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(&h.protocol_version.to_le_bytes());
    put(&mut out, &h.run_id);
    out.extend_from_slice(&h.round.to_le_bytes());
    out.extend_from_slice(&h.kind.to_le_bytes());
    out.extend_from_slice(&h.group.to_le_bytes());
    out.extend_from_slice(&h.slice.to_le_bytes());
    out.extend_from_slice(&h.offset.to_le_bytes());
    out.extend_from_slice(&h.len.to_le_bytes());
    out.extend_from_slice(&h.tokens.to_le_bytes());
    out.extend_from_slice(&h.payload_len.to_le_bytes());
    put(&mut out, &h.payload_hash);
    out.extend_from_slice(&(h.contributors.len() as u64).to_le_bytes());
    for c in &h.contributors {
        put(&mut out, c);
    }
    put(&mut out, &h.public_key);
    // Appended only when set, so that the frames of a round's first exchange sign the same
    // bytes as before the field existed.
    if h.part != 0 {
        out.extend_from_slice(&h.part.to_le_bytes());
    }
    out
}

/// Fills in the payload fields of `header` (length, hash, compression) for `payload`,
/// compressing it with zstd at `level` when that makes it smaller. Returns the bytes to send
/// as the payload: `payload` itself (no copy) when it goes uncompressed. Call this before
/// signing the header.
pub fn seal_payload<'a>(
    header: &mut FrameHeader,
    payload: &'a [u8],
    level: Option<i32>,
) -> Cow<'a, [u8]> {
    header.protocol_version = PROTOCOL_VERSION;
    header.payload_len = payload.len() as u64;
    header.payload_hash = blake3::hash(payload).as_bytes().to_vec();
    let compressed = level
        .filter(|l| worth_compressing(payload, *l))
        .and_then(|l| zstd::bulk::compress(payload, l).ok());
    let wire = match compressed {
        Some(c) if c.len() < payload.len() => {
            header.compression = PayloadCompression::Zstd as i32;
            Cow::Owned(c)
        }
        _ => {
            header.compression = PayloadCompression::None as i32;
            Cow::Borrowed(payload)
        }
    };
    header.payload_wire_len = wire.len() as u64;
    wire
}

/// Payloads above this size are compressed only when a sample of them compresses.
const SAMPLE_ABOVE: usize = 256 << 10;
/// Large enough for zstd's entropy stage to show what a dense code would gain; small enough
/// that trying it costs well under 1% of sending an incompressible frame (64 KiB cost about
/// 1.5% of the CPU of a loopback transfer of 4 MiB frames).
const SAMPLE_LEN: usize = 16 << 10;

/// Whether zstd is worth trying on `payload`: a large payload (already dense int8 or top-k
/// codes, usually) is compressed only when a sample from its middle shrinks by at least 3%,
/// so incompressible frames skip a full pass of the compressor.
fn worth_compressing(payload: &[u8], level: i32) -> bool {
    if payload.len() <= SAMPLE_ABOVE {
        return true;
    }
    let start = payload.len() / 2 - SAMPLE_LEN / 2;
    let sample = &payload[start..start + SAMPLE_LEN];
    zstd::bulk::compress(sample, level)
        .map(|c| c.len() * 100 < SAMPLE_LEN * 97)
        .unwrap_or(false)
}

/// Writes one frame: a sealed header (see [`seal_payload`]) and its wire payload. Returns
/// the bytes written.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    header: &FrameHeader,
    wire_payload: &[u8],
) -> Result<u64, FrameError> {
    // The length prefix and the header go out in one write, the payload in another.
    let hlen = header.encoded_len();
    let mut head = Vec::with_capacity(4 + hlen);
    head.extend_from_slice(&(hlen as u32).to_le_bytes());
    header.encode_raw(&mut head);
    w.write_all(&head).await?;
    w.write_all(wire_payload).await?;
    w.flush().await?;
    Ok(head.len() as u64 + wire_payload.len() as u64)
}

/// Reads one frame, checking every length against `limits` before allocating and the
/// payload against its hash. `Ok(None)` means the stream ended cleanly before a frame began.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    limits: &Limits,
) -> Result<Option<Frame>, FrameError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let hlen = u32::from_le_bytes(len) as usize;
    if hlen > limits.max_header {
        return Err(FrameError::HeaderTooLarge {
            len: hlen,
            limit: limits.max_header,
        });
    }
    let mut head = vec![0u8; hlen];
    r.read_exact(&mut head).await?;
    let header: FrameHeader = decode_limited("frame header", &head, limits.max_header)?;
    check_version(header.protocol_version)?;
    if FrameKind::try_from(header.kind).is_err() || header.kind == 0 {
        return Err(FrameError::UnknownKind(header.kind));
    }
    for len in [header.payload_len, header.payload_wire_len] {
        if len > limits.max_payload as u64 {
            return Err(FrameError::PayloadTooLarge {
                len,
                limit: limits.max_payload,
            });
        }
    }
    let want = header.payload_wire_len as usize;
    let payload = match PayloadCompression::try_from(header.compression) {
        Ok(PayloadCompression::None) => {
            if header.payload_wire_len != header.payload_len {
                return Err(FrameError::Decompress {
                    want: header.payload_len,
                    reason: "uncompressed payload with a different wire length".into(),
                });
            }
            // Hashed piece by piece as it arrives, while the bytes are still in cache.
            let mut hasher = blake3::Hasher::new();
            let payload = read_payload(r, want, Some(&mut hasher)).await?;
            check_hash(&hasher, &header)?;
            payload
        }
        Ok(PayloadCompression::Zstd) => {
            let wire = read_payload(r, want, None).await?;
            let out = decompress(&wire, header.payload_len)?;
            if out.len() as u64 != header.payload_len {
                return Err(FrameError::Decompress {
                    want: header.payload_len,
                    reason: format!("got {} bytes", out.len()),
                });
            }
            let mut hasher = blake3::Hasher::new();
            hasher.update(&out);
            check_hash(&hasher, &header)?;
            out
        }
        Err(_) => {
            return Err(FrameError::Decompress {
                want: header.payload_len,
                reason: format!("unknown compression {}", header.compression),
            });
        }
    };
    Ok(Some(Frame {
        wire_bytes: 4 + hlen as u64 + header.payload_wire_len,
        header,
        payload,
    }))
}

/// The first buffer a payload is read into, at most.
const FIRST_READ_BUF: usize = 1 << 20;
/// How far ahead of the bytes received a payload buffer may grow: a peer has to send an
/// eighth of the payload it declares before the whole of it is allocated.
const READ_BUF_GROWTH: usize = 8;
/// Arrived bytes are hashed once this many have accumulated (and at the end).
const HASH_PIECE: usize = 256 << 10;

/// Reads exactly `want` payload bytes. The buffer starts at [`FIRST_READ_BUF`] and grows
/// only as bytes arrive, in few steps (so few reallocations) and straight to its final size,
/// and every read goes into it directly (no intermediate buffer, each byte zeroed once).
/// With `hasher`, the bytes are hashed in [`HASH_PIECE`]s as they arrive.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    want: usize,
    mut hasher: Option<&mut blake3::Hasher>,
) -> Result<Vec<u8>, FrameError> {
    let mut buf = Vec::new();
    let mut filled = 0;
    let mut hashed = 0;
    while filled < want {
        if filled == buf.len() {
            let next = want.min(FIRST_READ_BUF.max(filled.saturating_mul(READ_BUF_GROWTH)));
            buf.reserve_exact(next - buf.len());
            buf.resize(next, 0);
        }
        let n = match r.read(&mut buf[filled..]).await {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got: filled,
                    want: want as u64,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        filled += n;
        if let Some(h) = hasher.as_deref_mut()
            && (filled - hashed >= HASH_PIECE || filled == want)
        {
            h.update(&buf[hashed..filled]);
            hashed = filled;
        }
    }
    Ok(buf)
}

/// Decompresses a zstd payload that the header says holds `declared` bytes. The buffer
/// grows with the bytes the payload actually produces, as [`read_payload`]'s does, never
/// straight to `declared` (nor to the content size the zstd frame claims): a 100-byte frame
/// claiming a gigabyte costs what it decompresses to. One byte past `declared` is read, so
/// that a longer payload is seen and refused.
fn decompress(wire: &[u8], declared: u64) -> Result<Vec<u8>, FrameError> {
    use std::io::Read;
    let failed = |reason: String| FrameError::Decompress {
        want: declared,
        reason,
    };
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(wire).map_err(|e| failed(e.to_string()))?;
    let cap = usize::try_from(declared)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut buf = Vec::new();
    let mut filled = 0;
    while filled < cap {
        if filled == buf.len() {
            let next = cap.min(FIRST_READ_BUF.max(filled.saturating_mul(READ_BUF_GROWTH)));
            buf.reserve_exact(next - buf.len());
            buf.resize(next, 0);
        }
        match decoder.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(e.to_string())),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

fn check_hash(hasher: &blake3::Hasher, header: &FrameHeader) -> Result<(), FrameError> {
    if hasher.finalize().as_bytes().as_slice() == header.payload_hash.as_slice() {
        Ok(())
    } else {
        Err(FrameError::HashMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use proptest::prelude::*;

    fn header() -> FrameHeader {
        FrameHeader {
            run_id: vec![7; 32],
            round: 3,
            kind: FrameKind::Contribution as i32,
            len: 10,
            tokens: 99,
            ..Default::default()
        }
    }

    fn framed(payload: &[u8], level: Option<i32>) -> Vec<u8> {
        let mut h = header();
        let wire = seal_payload(&mut h, payload, level);
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &h, &wire)).unwrap();
        out
    }

    fn read(bytes: &[u8], limits: Limits) -> Result<Option<Frame>, FrameError> {
        futures::executor::block_on(read_frame(&mut Cursor::new(bytes), &limits))
    }

    #[test]
    fn round_trip_compressed_and_raw() {
        let compressible = vec![5u8; 100_000];
        let bytes = framed(&compressible, Some(1));
        assert!(
            bytes.len() < 10_000,
            "zstd should shrink a constant payload"
        );
        let f = read(&bytes, Limits::default()).unwrap().unwrap();
        assert_eq!(f.payload, compressible);
        assert_eq!(f.wire_bytes, bytes.len() as u64);
        assert_eq!(f.header.compression, PayloadCompression::Zstd as i32);

        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let f = read(&framed(&random, None), Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(f.payload, random);
        assert_eq!(f.header.compression, PayloadCompression::None as i32);
    }

    #[test]
    fn large_payloads_are_compressed_only_when_a_sample_compresses() {
        use rand::{RngCore, SeedableRng};
        let mut noise = vec![0u8; 1 << 20];
        rand_chacha::ChaCha8Rng::seed_from_u64(7).fill_bytes(&mut noise);
        let mut h = header();
        let wire = seal_payload(&mut h, &noise, Some(1));
        assert_eq!(h.compression, PayloadCompression::None as i32);
        assert_eq!(wire, noise);
        // Compressible in the middle (where the sample is taken) and overall.
        let mut mixed = noise.clone();
        mixed[1 << 18..3 << 18].fill(9);
        let wire = seal_payload(&mut h, &mixed, Some(1));
        assert_eq!(h.compression, PayloadCompression::Zstd as i32);
        assert!(wire.len() < mixed.len() * 3 / 4);
        let f = read(&framed(&mixed, Some(1)), Limits::default())
            .unwrap()
            .unwrap();
        assert_eq!(f.payload, mixed);
        // int8 codes of a peaked distribution (most near zero) compress by their entropy
        // alone, with no repeats for zstd to find: the sample must still say so.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let peaked: Vec<u8> = (0..1 << 20)
            .map(|_| {
                let r = rng.next_u32();
                (128 + (r & 7) as i32 - (r >> 3 & 7) as i32) as u8
            })
            .collect();
        let wire = seal_payload(&mut h, &peaked, Some(1));
        assert_eq!(h.compression, PayloadCompression::Zstd as i32);
        assert!(wire.len() < peaked.len() * 3 / 4, "{}", wire.len());
    }

    /// A reader that hands out at most `step` bytes per read, as a QUIC stream does.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl futures::AsyncRead for Trickle<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut [u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            std::task::Poll::Ready(Ok(n))
        }
    }

    #[test]
    fn payloads_arriving_in_pieces_cross_buffer_growth_and_hash_pieces() {
        use rand::{RngCore, SeedableRng};
        // Larger than the first buffer and not a multiple of any piece size.
        let mut payload = vec![0u8; FIRST_READ_BUF * 3 + 12_345];
        rand_chacha::ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut payload);
        let bytes = framed(&payload, Some(1));
        for step in [1000, 65_536, 1 << 22] {
            let mut r = Trickle {
                bytes: &bytes,
                step,
            };
            let f = futures::executor::block_on(read_frame(&mut r, &Limits::default()))
                .unwrap()
                .unwrap();
            assert_eq!(f.header.compression, PayloadCompression::None as i32);
            assert!(f.payload == payload, "step {step}");
            // The second frame on the stream starts cleanly after the first.
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes);
            let mut r = Trickle { bytes: &two, step };
            for _ in 0..2 {
                let f = futures::executor::block_on(read_frame(&mut r, &Limits::default()));
                assert!(f.unwrap().unwrap().payload == payload);
            }
        }
        // A flipped bit in the last piece is still caught.
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        let mut r = Trickle {
            bytes: &bad,
            step: 65_536,
        };
        assert!(matches!(
            futures::executor::block_on(read_frame(&mut r, &Limits::default())),
            Err(FrameError::HashMismatch)
        ));
    }

    #[test]
    fn a_large_claim_with_few_bytes_is_truncated() {
        let mut h = header();
        seal_payload(&mut h, b"abc", None);
        h.payload_len = 512 << 20;
        h.payload_wire_len = 512 << 20;
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &h, b"abc")).unwrap();
        assert!(matches!(
            read(&out, Limits::default()),
            Err(FrameError::Truncated { got: 3, .. })
        ));
    }

    #[test]
    fn clean_end_of_stream_is_none() {
        assert!(read(&[], Limits::default()).unwrap().is_none());
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        let bytes = u32::MAX.to_le_bytes();
        assert!(matches!(
            read(&bytes, Limits::default()),
            Err(FrameError::HeaderTooLarge { .. })
        ));
    }

    #[test]
    fn claimed_payload_larger_than_limit_is_refused() {
        let mut h = header();
        seal_payload(&mut h, b"abc", None);
        h.payload_len = 1 << 40;
        h.payload_wire_len = 1 << 40;
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &h, b"abc")).unwrap();
        assert!(matches!(
            read(&out, Limits::default()),
            Err(FrameError::PayloadTooLarge { .. })
        ));
    }

    #[test]
    fn truncated_payload_and_corruption_are_caught() {
        let bytes = framed(&[1, 2, 3, 4, 5, 6, 7, 8], None);
        assert!(matches!(
            read(&bytes[..bytes.len() - 2], Limits::default()),
            Err(FrameError::Truncated { .. })
        ));
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            read(&bad, Limits::default()),
            Err(FrameError::HashMismatch)
        ));
    }

    #[test]
    fn zip_bomb_is_bounded_by_the_declared_length() {
        // A payload that decompresses to far more than it declares is refused.
        let big = vec![0u8; 1 << 20];
        let mut h = header();
        let wire = seal_payload(&mut h, &big, Some(3));
        h.payload_len = 1024;
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &h, &wire)).unwrap();
        assert!(matches!(
            read(&out, Limits::default()),
            Err(FrameError::Decompress { .. })
        ));
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut h = header();
        let wire = seal_payload(&mut h, b"x", None);
        h.protocol_version = 99;
        let mut out = Vec::new();
        futures::executor::block_on(write_frame(&mut out, &h, &wire)).unwrap();
        assert!(matches!(
            read(&out, Limits::default()),
            Err(FrameError::Decode(DecodeError::Version { .. }))
        ));
    }

    #[test]
    fn signing_bytes_cover_the_payload_identity() {
        let mut a = header();
        seal_payload(&mut a, b"one", None);
        let mut b = header();
        seal_payload(&mut b, b"two", None);
        assert_ne!(signing_bytes(&a), signing_bytes(&b));
        let mut c = a.clone();
        c.round += 1;
        assert_ne!(signing_bytes(&a), signing_bytes(&c));
        let mut d = a.clone();
        d.part = 1;
        assert_ne!(signing_bytes(&a), signing_bytes(&d));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = read(&bytes, Limits { max_header: 1024, max_payload: 1 << 16 });
        }

        #[test]
        fn mutated_frames_never_panic(
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            pos in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let mut bytes = framed(&payload, Some(1));
            let i = pos.index(bytes.len());
            bytes[i] = byte;
            if let Ok(Some(f)) = read(&bytes, Limits::default()) {
                let hash = blake3::hash(&f.payload);
                prop_assert_eq!(hash.as_bytes().as_slice(), f.header.payload_hash.as_slice());
            }
        }
    }
}
