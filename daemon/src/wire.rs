//! Length-prefixed protobuf frames for the daemon's own request/response protocols
//! (capability exchange, membership). A frame is a 4-byte big-endian length followed by that
//! many bytes of one protobuf message. The length is checked against a per-protocol limit
//! before anything is allocated, so a peer claiming 2^32 bytes costs us four bytes of reading.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use libp2p::request_response;

/// Reads one frame of at most `limit` bytes and decodes it as `M`.
pub async fn read_frame<M, T>(io: &mut T, what: &'static str, limit: usize) -> io::Result<M>
where
    M: prost::Message + Default,
    T: AsyncRead + Unpin + Send,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{what} frame of {len} bytes exceeds the {limit}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len];
    io.read_exact(&mut buf).await?;
    potluck_proto::decode_limited(what, &buf, limit)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Encodes `msg` as one frame, refusing to send what the peer would refuse to read.
pub async fn write_frame<M, T>(io: &mut T, msg: &M, limit: usize) -> io::Result<()>
where
    M: prost::Message,
    T: AsyncWrite + Unpin + Send,
{
    let bytes = msg.encode_to_vec();
    if bytes.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "frame of {} bytes exceeds the {limit}-byte limit",
                bytes.len()
            ),
        ));
    }
    let len = u32::try_from(bytes.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame too large"))?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.flush().await
}

/// A `request_response` codec for one request and one response protobuf type.
pub struct ProtoCodec<Req, Resp> {
    what: &'static str,
    limit: usize,
    _types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> ProtoCodec<Req, Resp> {
    pub fn new(what: &'static str, limit: usize) -> Self {
        Self {
            what,
            limit,
            _types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for ProtoCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.what, self.limit)
    }
}

impl<Req, Resp> request_response::Codec for ProtoCodec<Req, Resp>
where
    Req: prost::Message + Default + Send + 'static,
    Resp: prost::Message + Default + Send + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Req;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Req>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.what, self.limit).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_frame(io, self.what, self.limit).await
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Req) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &req, self.limit).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_frame(io, &res, self.limit).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use potluck_proto::v1;
    use proptest::prelude::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        let mut bytes: &[u8] = &[0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let err = block_on(read_frame::<v1::CapabilityExchange, _>(
            &mut bytes, "x", 1024,
        ))
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn truncated_frame_is_an_error() {
        let mut bytes: &[u8] = &[0, 0, 0, 10, 1, 2];
        let err = block_on(read_frame::<v1::CapabilityExchange, _>(
            &mut bytes, "x", 1024,
        ))
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let mut short: &[u8] = &[0, 0];
        assert!(
            block_on(read_frame::<v1::CapabilityExchange, _>(
                &mut short, "x", 1024
            ))
            .is_err()
        );
    }

    #[test]
    fn frame_round_trips() {
        let msg = v1::CapabilityExchange {
            protocol_version: 1,
            record: None,
        };
        let mut buf = Vec::new();
        block_on(write_frame(
            &mut futures::io::Cursor::new(&mut buf),
            &msg,
            1024,
        ))
        .unwrap();
        let back: v1::CapabilityExchange =
            block_on(read_frame(&mut buf.as_slice(), "x", 1024)).unwrap();
        assert_eq!(back, msg);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = block_on(read_frame::<v1::MembershipRequest, _>(&mut bytes.as_slice(), "x", 1024));
        }
    }
}
