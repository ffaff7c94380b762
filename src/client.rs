//! A connection to the server from the client's side: connect, handshake, simple calls.
//! Pipelined transfers use the reader and writer halves directly (see `sync::exec`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::protocol::*;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the server at {addr}: {err}; is `deltasync serve` running there? (set it with --server or DELTASYNC_SERVER)"
    )]
    Unreachable { addr: String, err: String },
    #[error("{0}")]
    Auth(String),
    #[error("{0}")]
    Version(String),
    #[error("the server refused the connection: {0}")]
    Rejected(String),
    #[error("lost the connection to the server: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the server refused: {0}")]
    Refused(Refusal),
    #[error("the server closed the connection: {0}")]
    Fatal(String),
    #[error("unexpected reply from the server: {0}")]
    Unexpected(String),
}

pub struct Client {
    pub rd: FrameReader,
    pub wr: FrameWriter,
    pub counters: Arc<Counters>,
    /// The account's name on the server.
    pub account: String,
    /// Set when the server just registered a new account for this client.
    pub new_token: Option<String>,
    /// The highest journal sequence the server announced (after `Subscribe`).
    pub notified: Arc<AtomicU64>,
    /// The server's data folder identity, from the handshake.
    pub server_id: [u8; 16],
    /// The account's journal sequence at the handshake.
    pub server_seq: u64,
    next_id: u64,
}

impl Client {
    pub async fn connect(addr: &str, token: Option<&str>, device: &str) -> Result<Client, ClientError> {
        let unreachable = |err: String| ClientError::Unreachable { addr: addr.to_string(), err };
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Err(_) => return Err(unreachable("timed out".into())),
            Ok(Err(e)) => return Err(unreachable(e.to_string())),
            Ok(Ok(s)) => s,
        };
        let (mut rd, mut wr, counters) = split(stream);
        let hello = Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            token: token.map(String::from),
            device: device.to_string(),
        };
        wr.send(&hello).await?;
        match rd.recv::<Welcome>().await? {
            None => Err(ClientError::Rejected("closed during the handshake".into())),
            Some(Welcome::Accepted { account, new_token, server_id, seq }) => Ok(Client {
                rd,
                wr,
                counters,
                account,
                new_token,
                notified: Arc::default(),
                server_id,
                server_seq: seq,
                next_id: 1,
            }),
            Some(Welcome::Rejected { reason: Rejection::Auth, message, .. }) => {
                Err(ClientError::Auth(message))
            }
            Some(Welcome::Rejected { reason: Rejection::Version, message, .. }) => {
                Err(ClientError::Version(message))
            }
            Some(Welcome::Rejected { message, .. }) => Err(ClientError::Rejected(message)),
        }
    }

    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Reads the next message that is not a change notice.
    pub async fn recv(&mut self) -> Result<ServerMsg, ClientError> {
        recv_reply(&mut self.rd, &self.notified).await
    }

    /// One request, one reply, for requests without content.
    pub async fn call(&mut self, req: Request) -> Result<Reply, ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req }).await?;
        match self.recv().await? {
            ServerMsg::Resp { id: i, result } if i == id => result.map_err(ClientError::Refused),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every entry changed after `since`, and the journal sequence they bring the client to.
    pub async fn changes(&mut self, since: u64) -> Result<(Vec<Entry>, u64), ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req: Request::Changes { since } }).await?;
        let mut all = Vec::new();
        loop {
            match self.recv().await? {
                ServerMsg::Resp { id: i, result: Ok(Reply::Changes { entries, seq, more }) } if i == id => {
                    all.extend(entries);
                    if !more {
                        return Ok((all, seq));
                    }
                }
                ServerMsg::Resp { result: Err(r), .. } => return Err(ClientError::Refused(r)),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Fetches the server's signature of its version of `path` (rsync's fallback when the local
    /// signature cache lost it).
    pub async fn signature(
        &mut self,
        path: &crate::path::RelPath,
    ) -> Result<(crate::hash::ContentHash, u64, Vec<u8>), ClientError> {
        let id = self.next_id();
        self.wr.send(&ClientMsg::Req { id, req: Request::Signature { path: path.clone() } }).await?;
        let (hash, size) = match self.recv().await? {
            ServerMsg::Resp { result: Ok(Reply::Signature { hash, size }), .. } => (hash, size),
            ServerMsg::Resp { result: Err(r), .. } => return Err(ClientError::Refused(r)),
            other => return Err(ClientError::Unexpected(format!("{other:?}"))),
        };
        let mut bytes = Vec::new();
        loop {
            match self.recv().await? {
                ServerMsg::Data { block, .. } => bytes.extend_from_slice(&block.bytes),
                ServerMsg::End { .. } => return Ok((hash, size, bytes)),
                other => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
        }
    }
}

/// Reads the next message that is not a change notice (those only matter to `watch`).
pub async fn recv_reply(rd: &mut FrameReader, notified: &AtomicU64) -> Result<ServerMsg, ClientError> {
    loop {
        match rd.recv::<ServerMsg>().await? {
            None => return Err(ClientError::Protocol(ProtocolError::Closed)),
            Some(ServerMsg::Notify { seq }) => {
                notified.fetch_max(seq, Ordering::Relaxed);
            }
            Some(ServerMsg::Fatal { message }) => return Err(ClientError::Fatal(message)),
            Some(m) => return Ok(m),
        }
    }
}
