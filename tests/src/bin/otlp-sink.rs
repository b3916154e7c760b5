//! `otlp-sink ADDR`: an OTLP/gRPC trace receiver that keeps what it gets and prints how many
//! spans arrived every 10 s; the collector the benchmark's traced sidecar exports to.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".into());
    let rx = agentmesh_tests::otlp::Receiver::grpc_on(&addr).await;
    eprintln!("otlp-sink: listening on {addr}");
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        eprintln!("otlp-sink: {} spans", rx.count());
    }
}
