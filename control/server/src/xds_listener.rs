//! The discovery port's connections: mTLS when the client starts a TLS handshake (a sidecar with
//! an SVID), plaintext otherwise, told apart by the first byte. A stream carries the SPIFFE ID its
//! client certificate proved, which binds the sidecar's `Node` to that agent and is the only way
//! to be sent the agent's secrets.

use agentmesh_control_api::identity::{agent_id_of, AgentId};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Who a discovery stream's client proved to be (`None`: plaintext, or TLS without a
/// certificate).
#[derive(Clone, Debug, Default)]
pub struct StreamPeer(pub Option<AgentId>);

pub struct Conn {
    io: Box<dyn Io>,
    peer: StreamPeer,
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = StreamPeer;
    fn connect_info(&self) -> StreamPeer {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

async fn accept_one(tcp: TcpStream, tls: &tokio_rustls::TlsAcceptor) -> std::io::Result<Conn> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await?;
    if n == 1 && first[0] == TLS_HANDSHAKE {
        let stream = tls.accept(tcp).await?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|der| agent_id_of(der).ok());
        return Ok(Conn {
            io: Box::new(stream),
            peer: StreamPeer(peer),
        });
    }
    Ok(Conn {
        io: Box::new(tcp),
        peer: StreamPeer(None),
    })
}

/// Accepted connections, as tonic's `serve_with_incoming` takes them. Handshakes run on their
/// own tasks, so a slow client does not hold the others back.
pub fn incoming(
    listener: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let tcp = match listener.accept().await {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "discovery accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (conn_tx, tls) = (tx.clone(), tls.clone());
            tokio::spawn(async move {
                match accept_one(tcp, &tls).await {
                    Ok(conn) => {
                        let _ = conn_tx.send(Ok(conn)).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "discovery handshake failed"),
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
