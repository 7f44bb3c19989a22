//! `--users` and `--tls`: the broker the bench starts has users (its clients log in as
//! a normal user whose rules every request is checked against) and serves TLS (a
//! self-signed certificate its clients trust), so that the cost of authentication and
//! encryption can be measured against a broker without them.

use std::sync::OnceLock;

use txmq_client::{Admin, ConsumerOptions, ProducerOptions, RuleSpec, Tls, User};

/// The super user the bench's broker is started with.
const ROOT: (&str, &str) = ("root", "bench-root-secret");
/// The user the clients are.
const BENCH: (&str, &str) = ("bench", "bench-user-secret");

/// How the clients reach the broker.
#[derive(Debug, Default, Clone)]
pub struct Access {
    pub user: Option<User>,
    pub tls: Option<Tls>,
}

static ACCESS: OnceLock<Access> = OnceLock::new();

/// The clients' access (none until [`setup`]).
pub fn get() -> Access {
    ACCESS.get().cloned().unwrap_or_default()
}

/// The broker flags for `--users` and `--tls`, and the directory holding their files
/// (keep it while the broker runs); sets the clients' TLS.
pub fn broker_args(users: bool, tls: bool) -> anyhow::Result<(Vec<String>, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    let mut args = Vec::new();
    let mut access = Access::default();
    if users {
        let admin = dir.path().join("admin");
        std::fs::write(&admin, format!("{} {}\n", ROOT.0, ROOT.1))?;
        args.extend(["--bootstrap-admin-file".into(), admin.display().to_string()]);
        access.user = Some(User::new(BENCH.0, BENCH.1));
    }
    if tls {
        let key = rcgen::KeyPair::generate()?;
        let cert =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?.self_signed(&key)?;
        let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert_file, cert.pem())?;
        std::fs::write(&key_file, key.serialize_pem())?;
        args.extend([
            "--tls-cert".into(),
            cert_file.display().to_string(),
            "--tls-key".into(),
            key_file.display().to_string(),
        ]);
        access.tls = Some(Tls::with_ca_pem(cert.pem().as_bytes())?);
    }
    let _ = ACCESS.set(access);
    Ok((args, dir))
}

/// With `--users`, makes the clients' user (as the super user) with the rules the
/// scenarios need: `pub`, `sub` and `create` on the bench topics, `sub` on their groups, `txn` on
/// the bench producer groups.
pub async fn setup(addr: &str, users: bool) -> anyhow::Result<()> {
    if !users {
        return Ok(());
    }
    let root = User::new(ROOT.0, ROOT.1);
    let tls = get().tls;
    let mut attempt = 0;
    let admin = loop {
        match Admin::connect_secure(addr, "", Some(&root), tls.as_ref()).await {
            Ok(admin) => break admin,
            // Until the broker has made its first user.
            Err(_) if attempt < 100 => {
                attempt += 1;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    admin.user_create(BENCH.0, BENCH.1, false).await?;
    for (resource, actions) in [
        ("topic:bench*", &["pub", "sub", "create"][..]),
        ("group:bench*", &["sub"][..]),
        ("producer-group:bench*", &["txn"][..]),
    ] {
        admin
            .acl_grant(&RuleSpec {
                user: BENCH.0.into(),
                resource: resource.into(),
                actions: actions.iter().map(|a| a.to_string()).collect(),
                ..Default::default()
            })
            .await?;
    }
    Ok(())
}

/// Producer options for a plain producer, as the bench's clients.
pub fn producer() -> ProducerOptions {
    let a = get();
    ProducerOptions {
        user: a.user,
        tls: a.tls,
        ..ProducerOptions::default()
    }
}

/// `options` as the bench's clients.
pub fn transactional(mut options: ProducerOptions) -> ProducerOptions {
    let a = get();
    options.user = a.user;
    options.tls = a.tls;
    options
}

/// `options` as the bench's clients.
pub fn consumer(options: ConsumerOptions) -> ConsumerOptions {
    let a = get();
    ConsumerOptions {
        user: a.user,
        tls: a.tls,
        ..options
    }
}
