//! Issue 26, item 3 and 4: TLS on every face from one certificate (`--tls-cert` and
//! `--tls-key`: the native port and gRPC), and mutual TLS between a group's nodes
//! (`--node-tls-ca`).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use txmq_client::{Consumer, ConsumerOptions, Message, Producer, ProducerOptions, Tls};
use txmq_tests::certs::Pki;
use txmq_tests::group::TestGroup;
use txmq_tests::{TestBroker, next};

fn producer_options(tls: Option<Tls>) -> ProducerOptions {
    ProducerOptions {
        tls,
        call_timeout: Some(Duration::from_secs(10)),
        ..ProducerOptions::default()
    }
}

/// With one certificate, the native port and the gRPC endpoint both speak TLS: the
/// Rust client and the CLI trusting the certificate's authority send and receive over
/// it, and so does the official Python client on gRPC. A plaintext client, and one that
/// trusts another authority, are refused on the native port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_serves_tls_on_the_native_port_and_grpc() {
    let pki = Pki::new();
    let mut args: Vec<String> = pki.broker_args();
    args.extend(["--grpc-listen".into(), "127.0.0.1:0".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let b = TestBroker::start(&args);
    let tls = Tls::with_ca_file(&pki.ca).unwrap();

    let p = Producer::connect(b.addr(), producer_options(Some(tls.clone())))
        .await
        .unwrap_or_else(|e| panic!("a TLS client was refused: {e}\n{}", b.log_text()));
    p.send(Message::new("secure", "native")).await.unwrap();

    let plain = Producer::connect(b.addr(), producer_options(None)).await;
    assert!(plain.is_err(), "a plaintext client was served over TLS");
    let stranger = Tls::with_ca_file(&Pki::new().ca).unwrap();
    let other = Producer::connect(b.addr(), producer_options(Some(stranger))).await;
    assert!(
        other.is_err(),
        "a client trusting another authority took the broker's certificate"
    );

    let ca = pki.ca.display().to_string();
    b.cli_ok(&["--ca", &ca, "produce", "--topic", "secure", "--body", "cli"]);
    let refused = b.cli(&["produce", "--topic", "secure", "--body", "plain"]);
    assert!(!refused.status.success(), "the CLI was served without TLS");

    let grpc = b.grpc_addr().to_string();
    let roots = ca.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        txmq_tests::grpc::run(
            &grpc,
            &["produce", "secure", "1"],
            &[
                ("TXMQ_TLS", "1"),
                ("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", &roots),
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "the Python client over TLS was refused: {err}\n{out}");

    let options = ConsumerOptions {
        tls: Some(tls),
        ..ConsumerOptions::new("g", "secure")
    };
    let mut c = Consumer::subscribe(b.addr(), options).await.unwrap();
    let mut bodies = Vec::new();
    while let Some(d) = next(&mut c, Duration::from_secs(10)).await {
        bodies.push(String::from_utf8_lossy(d.body()).into_owned());
        d.ack().await.unwrap();
        if bodies.len() == 3 {
            break;
        }
    }
    bodies.sort();
    assert_eq!(bodies, ["cli", "native", "py-0"], "{}", b.log_text());
}

/// A TLS client of the node port presenting `identity` (certificate and key PEM files)
/// or none, trusting `ca`: it knocks, and returns the reply frame (a nonce when the
/// connection was taken).
async fn knock(
    peer: &str,
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<Vec<u8>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                rustls_pki_types::CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls_pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(peer)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let mut s = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        s.write_all(&[0, 0, 0, 1, 7])
            .await
            .map_err(|e| e.to_string())?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
        let mut body = vec![0u8; u32::from_be_bytes(head) as usize];
        s.read_exact(&mut body).await.map_err(|e| e.to_string())?;
        Ok(body)
    };
    tokio::time::timeout(Duration::from_secs(15), attempt)
        .await
        .unwrap_or_else(|_| Err("no answer".into()))
}

/// With `--node-tls-ca`, the nodes of a group speak mutual TLS: the group elects a
/// leader and replicates a message over it. A peer without a certificate, with one
/// another authority signed, or speaking plain TCP gets nothing from the node port; one
/// with the group's certificate gets the handshake's nonce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_nodes_speak_mutual_tls() {
    let pki = Pki::new();
    let (cert, key, ca) = (
        pki.cert.display().to_string(),
        pki.key.display().to_string(),
        pki.ca.display().to_string(),
    );
    let mut group = TestGroup::start(
        3,
        &[
            "--node-tls-cert",
            &cert,
            "--node-tls-key",
            &key,
            "--node-tls-ca",
            &ca,
            "--grpc-listen",
            "none",
        ],
    );
    let leader = group
        .leader(Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no leader elected over mutual TLS\n{}", group.logs()));
    let p = Producer::connect(&group.addrs(), producer_options(None))
        .await
        .unwrap();
    p.send(Message::new("replicated", "over mutual tls"))
        .await
        .unwrap_or_else(|e| panic!("a send was not replicated: {e}\n{}", group.logs()));
    let got = txmq_tests::drain_from(
        group.nodes[leader].addr(),
        "g",
        "replicated",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(got, vec![b"over mutual tls".to_vec()]);

    let peer = group
        .peers
        .split(',')
        .next()
        .and_then(|e| e.split_once('='))
        .unwrap()
        .1
        .to_string();
    let member = knock(&peer, &pki.ca, Some((&pki.cert, &pki.key))).await;
    assert!(
        member.as_ref().is_ok_and(|r| r.len() == 33 && r[0] == 7),
        "a peer with the group's certificate: {member:?}"
    );
    let anonymous = knock(&peer, &pki.ca, None).await;
    assert!(
        anonymous.is_err(),
        "a peer without a certificate was answered: {anonymous:?}"
    );
    let other = Pki::new();
    let stranger = knock(&peer, &pki.ca, Some((&other.cert, &other.key))).await;
    assert!(
        stranger.is_err(),
        "a peer with another authority's certificate was answered: {stranger:?}"
    );
    let mut plain = tokio::net::TcpStream::connect(&peer).await.unwrap();
    plain.write_all(&[0, 0, 0, 1, 7]).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.windows(2).any(|w| w == [0, 33]),
        "a plaintext peer got a nonce"
    );
}
