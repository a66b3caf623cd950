//! Length-prefixed `TrainControl` messages on a run's control stream.
//!
//! One u32 little-endian length, then the protobuf message. The length is checked against
//! [`MAX_CONTROL_BYTES`] before anything is allocated; callers put a deadline on every read.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use potluck_proto::v1::TrainControl;
use potluck_proto::{DecodeError, PROTOCOL_VERSION, check_version, decode_limited};
use prost::Message;

/// The largest control message accepted (a welcome carries the run manifest). A round's
/// report stays far under it whatever peers send: its list of refused updates is capped
/// (`potluck_coordinator::rejections`).
pub const MAX_CONTROL_BYTES: usize = 1 << 20;

/// Why a control message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("control message of {0} bytes exceeds the limit of {MAX_CONTROL_BYTES}")]
    TooLarge(usize),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("control message carries no body")]
    Empty,
}

/// Writes one control message, stamping the protocol version.
pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut msg: TrainControl,
) -> Result<u64, ControlError> {
    msg.protocol_version = PROTOCOL_VERSION;
    let bytes = msg.encode_to_vec();
    w.write_all(&(bytes.len() as u32).to_le_bytes()).await?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(4 + bytes.len() as u64)
}

/// Reads one control message; `Ok(None)` at a clean end of stream.
pub async fn read_control<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(TrainControl, u64)>, ControlError> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = u32::from_le_bytes(len) as usize;
    if n > MAX_CONTROL_BYTES {
        return Err(ControlError::TooLarge(n));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    let msg: TrainControl = decode_limited("train control message", &buf, MAX_CONTROL_BYTES)?;
    check_version(msg.protocol_version)?;
    if msg.msg.is_none() {
        return Err(ControlError::Empty);
    }
    Ok(Some((msg, 4 + n as u64)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use potluck_proto::v1::{RunJoin, train_control::Msg};

    fn read(bytes: &[u8]) -> Result<Option<(TrainControl, u64)>, ControlError> {
        futures::executor::block_on(read_control(&mut Cursor::new(bytes)))
    }

    #[test]
    fn round_trip_and_hostile_input() {
        let msg = TrainControl {
            protocol_version: 0,
            msg: Some(Msg::Join(RunJoin {
                run_id: vec![1; 32],
                ..Default::default()
            })),
        };
        let mut out = Vec::new();
        futures::executor::block_on(write_control(&mut out, msg)).unwrap();
        let (back, n) = read(&out).unwrap().unwrap();
        assert_eq!(n, out.len() as u64);
        assert!(matches!(back.msg, Some(Msg::Join(_))));

        assert!(matches!(
            read(&u32::MAX.to_le_bytes()),
            Err(ControlError::TooLarge(_))
        ));
        assert!(matches!(
            read(&out[..out.len() - 1]),
            Err(ControlError::Io(_))
        ));
        assert!(read(&[]).unwrap().is_none());
        let mut garbage = vec![8, 0, 0, 0];
        garbage.extend_from_slice(&[0xff; 8]);
        assert!(read(&garbage).is_err());
    }
}
