//! Every auth mode against a real nats-server: the right secret connects,
//! a wrong one is refused, unreadable or invalid inputs are typed errors.

use std::time::Duration;

use flotilla_nats::{Auth, ConnectError, Connector};
use testbed::NatsServer;

/// Connects and proves the connection is usable with a request round trip
/// to the server (`$JS.API.INFO`).
async fn connect_and_ping(servers: &str, auth: Auth) -> Result<(), ConnectError> {
    let client = Connector::new(servers, "flotilla-nats test", auth)
        .connect()
        .await?;
    tokio::time::timeout(Duration::from_secs(5), client.flush())
        .await
        .expect("flush in time")
        .expect("flush");
    assert_eq!(
        client.connection_state(),
        async_nats::connection::State::Connected
    );
    Ok(())
}

fn refused(r: Result<(), ConnectError>) -> bool {
    matches!(r, Err(ConnectError::Connect { .. }))
}

#[tokio::test]
async fn no_auth_and_a_server_list_with_a_dead_entry() {
    let server = NatsServer::start();
    connect_and_ping(&server.url(), Auth::None).await.unwrap();
    // A list: the first entry has nothing listening, the second does.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let list = format!("nats://127.0.0.1:{dead_port}, {}", server.url());
    connect_and_ping(&list, Auth::None).await.unwrap();
}

#[tokio::test]
async fn user_and_password() {
    let server = NatsServer::start_with_config(
        "authorization { users = [ { user: pi, password: s3cret } ] }",
    );
    let auth = |password: &str| Auth::UserPassword {
        user: "pi".into(),
        password: password.into(),
    };
    connect_and_ping(&server.url(), auth("s3cret"))
        .await
        .unwrap();
    assert!(refused(
        connect_and_ping(&server.url(), auth("wrong")).await
    ));
    assert!(refused(connect_and_ping(&server.url(), Auth::None).await));
}

#[tokio::test]
async fn nkey_seed_file() {
    let user = nkeys::KeyPair::new_user();
    let other = nkeys::KeyPair::new_user();
    let server = NatsServer::start_with_config(&format!(
        "authorization {{ users = [ {{ nkey: {} }} ] }}",
        user.public_key()
    ));
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("pi.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    connect_and_ping(&server.url(), Auth::NkeySeedFile(seed.clone()))
        .await
        .unwrap();
    // A key the server does not know is refused.
    let wrong = dir.path().join("other.nk");
    std::fs::write(&wrong, other.seed().unwrap()).unwrap();
    assert!(refused(
        connect_and_ping(&server.url(), Auth::NkeySeedFile(wrong)).await
    ));
    // Not a seed at all, and no file: typed, before any connection attempt.
    let garbage = dir.path().join("garbage.nk");
    std::fs::write(&garbage, "not a seed").unwrap();
    assert!(matches!(
        connect_and_ping(&server.url(), Auth::NkeySeedFile(garbage.clone())).await,
        Err(ConnectError::InvalidSeed { path, .. }) if path == garbage
    ));
    assert!(matches!(
        connect_and_ping(&server.url(), Auth::NkeySeedFile(dir.path().join("absent"))).await,
        Err(ConnectError::ReadSeed { .. })
    ));
}

#[tokio::test]
async fn credentials_file_that_cannot_be_read_is_a_typed_error() {
    let server = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("absent.creds");
    assert!(matches!(
        connect_and_ping(&server.url(), Auth::CredentialsFile(missing.clone())).await,
        Err(ConnectError::Credentials { path, .. }) if path == missing
    ));
}
