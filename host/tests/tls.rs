//! The host on a nats-server that requires TLS and a client certificate (mutual TLS),
//! with a CA and certificates made for each run by rcgen. The manifest's `tls_ca`,
//! `tls_cert` and `tls_key` carry an event there and back; a certificate the server does
//! not take, or a server certificate from another CA, stops the start saying which.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(10);

/// A CA, a certificate of the server's for 127.0.0.1 and one of the host's, signed by it,
/// and a second CA that signed nothing here; all PEM files in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = certificate_authority("wasmev test CA");
        let other = certificate_authority("another CA");
        for (name, params) in [
            (
                "server",
                CertificateParams::new(vec!["127.0.0.1".to_string()]),
            ),
            ("client", CertificateParams::new(vec!["wasmev".to_string()])),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = params.unwrap().signed_by(&key, &ca).unwrap();
            write(dir.path(), &format!("{name}.pem"), &cert.pem());
            write(dir.path(), &format!("{name}-key.pem"), &key.serialize_pem());
        }
        write(dir.path(), "ca.pem", &ca.pem());
        write(dir.path(), "other-ca.pem", &other.pem());
        Self { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A server that requires TLS with its certificate, and a client certificate from
    /// the CA.
    fn server(&self) -> NatsServer {
        NatsServer::start_with_config(&format!(
            "tls {{ cert_file: {:?}, key_file: {:?}, ca_file: {:?}, verify: true }}\n",
            self.path("server.pem"),
            self.path("server-key.pem"),
            self.path("ca.pem"),
        ))
    }

    /// The manifest's TLS keys for a host that trusts the CA in `ca` and shows the client
    /// certificate.
    fn host_keys(&self, ca: &str) -> String {
        format!(
            "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
            self.path(ca),
            self.path("client.pem"),
            self.path("client-key.pem"),
        )
    }

    /// A client of `server` that shows the client certificate.
    async fn client(&self, server: &NatsServer) -> async_nats::Client {
        let connect = async_nats::ConnectOptions::new()
            .add_root_certificates(self.path("ca.pem"))
            .add_client_certificate(self.path("client.pem"), self.path("client-key.pem"))
            .require_tls(true)
            .connect(server.url());
        within("connect over TLS", WAIT, connect).await.unwrap()
    }
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

fn write(dir: &Path, name: &str, pem: &str) {
    std::fs::write(dir.join(name), pem).unwrap();
}

/// A manifest for the email-sender on `server`, with `tls` (`tls_*` keys) in its broker.
fn email_sender(server: &NatsServer, tls: &str) -> (tempfile::TempDir, wasmev::Manifest) {
    manifest(
        &(server.manifest_head()
            + tls
            + &handler_block(
                "email-sender",
                "email-sender",
                "subscribe = [\"user.created\"]\npublish = [\"email.sent\"]\n\
                 config = { from = \"hello@example.com\", subject = \"Welcome, {name}!\" }",
            )),
    )
}

/// The error `wasmev::Host::start` fails with on `m`, a manifest for `server`, whose
/// port is written `<port>`.
async fn start_error(server: &NatsServer, m: &wasmev::Manifest) -> String {
    let started = within(
        "the host start to fail",
        WAIT * 3,
        wasmev::Host::start(m, wasmev::Options::default()),
    )
    .await;
    match started {
        Ok(_) => panic!("the host started"),
        Err(e) => format!("{e:#}").replace(&server.url(), "nats://127.0.0.1:<port>"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_the_ca_and_a_client_certificate_handles_events_over_tls() {
    let pki = Pki::new();
    let server = pki.server();
    let (_dir, m) = email_sender(&server, &pki.host_keys("ca.pem"));
    let host = TestHost::start(&m).await;
    let client = pki.client(&server).await;
    let mut sent = client.subscribe("email.sent").await.unwrap();
    within("flush", WAIT, client.flush()).await.unwrap();
    let user = json!({"id": "u-1", "name": "Ada", "email": "ada@example.com"});
    client
        .publish("user.created", user.to_string().into())
        .await
        .unwrap();
    let email = next_within(&mut sent, WAIT)
        .await
        .expect("email.sent over TLS");
    let email: serde_json::Value = serde_json::from_slice(&email.payload).unwrap();
    assert_eq!(email["to"], "ada@example.com");
    host.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_client_certificate_the_start_fails_saying_so() {
    let pki = Pki::new();
    let server = pki.server();
    let (_dir, m) = email_sender(&server, &format!("tls_ca = {:?}\n", pki.path("ca.pem")));
    insta::assert_snapshot!(start_error(&server, &m).await, @r#"failed to connect to nats at nats://127.0.0.1:<port>: IO error: received fatal alert: BadCertificate: the server asks for a client certificate; set tls_cert and tls_key"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_stops_the_start_saying_so() {
    let pki = Pki::new();
    let server = pki.server();
    let (_dir, m) = email_sender(&server, &pki.host_keys("other-ca.pem"));
    insta::assert_snapshot!(start_error(&server, &m).await, @r#"failed to connect to nats at nats://127.0.0.1:<port>: IO error: invalid peer certificate: UnknownIssuer: the server's certificate did not verify against tls_ca; it must be signed by that CA and name the host in the broker url"#);
}
