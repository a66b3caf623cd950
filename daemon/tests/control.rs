//! The control API: the Unix socket serves the CLI; the optional loopback TCP endpoint
//! requires the token from the data dir; a second daemon on the same data dir is refused.
#![allow(clippy::unwrap_used)]

mod common;

use common::config;
use potluck_daemon::Node;
use potluck_daemon::control::{self, ControlError};
use potluck_proto::v1;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_control_needs_the_token_and_data_dir_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = config(dir.path(), vec![]);
    c.control_tcp = Some(addr);
    let node = Node::start(c.clone()).await.unwrap();
    let me = node.client().local_peer_id().to_base58();

    let mut unix = control::connect_unix(dir.path()).await.unwrap();
    let id = unix.id(v1::IdRequest {}).await.unwrap().into_inner();
    assert_eq!(id.peer_id, me);

    let token = std::fs::read_to_string(dir.path().join(control::TOKEN_FILE)).unwrap();
    let mut good = None;
    for _ in 0..50 {
        if let Ok(c) = control::connect_tcp(addr, token.trim().to_string()).await {
            good = Some(c);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut good = good.expect("TCP control API never came up");
    let s = good
        .status(v1::StatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.peer_id, me);
    assert_eq!(s.swarm, "public");
    assert_eq!(s.inbound.map(|i| i.denied), Some(0));

    let mut bad = control::connect_tcp(addr, "wrong".into()).await.unwrap();
    let err = bad.status(v1::StatusRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // The control socket locks the data dir against a second daemon.
    let err = Node::start(c).await.unwrap_err();
    assert!(err.to_string().contains("already running"), "{err}");

    node.shutdown().await;
    assert!(matches!(
        control::connect_unix(dir.path()).await,
        Err(ControlError::NoDaemon { .. })
    ));
}

/// `potluck pause` / `potluck resume` through the control API: the pause shows in `status`
/// and `run status`, survives a restart of the daemon, and a resume ends it; with a pause
/// schedule whose windows cover the whole week, the daemon starts paused by the schedule, a
/// resume skips the window, and a pause is a command pause again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_and_resume_show_in_the_status_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path(), vec![]);
    c.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let node = Node::start(c.clone()).await.unwrap();
    let mut api = control::connect_unix(dir.path()).await.unwrap();
    let status = |s: v1::StatusResponse| s.paused;
    assert_eq!(
        status(api.status(v1::StatusRequest {}).await.unwrap().into_inner()),
        ""
    );
    let r = api.pause(v1::PauseRequest {}).await.unwrap().into_inner();
    assert!(r.paused && r.reason.contains("potluck pause"), "{r:?}");
    assert!(r.schedule.is_empty(), "{r:?}");
    let s = api.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert!(s.paused.contains("potluck pause"), "{s:?}");
    let rs = api
        .run_status(v1::RunStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(rs.paused.contains("potluck pause"), "{rs:?}");
    // The metric and the JSON state behind the dashboard.
    let http = node.http_addr().unwrap();
    let metrics = http_get(http, "/metrics").await;
    assert!(
        metrics.lines().any(|l| l == "potluck_paused 1"),
        "{metrics}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&http_get(http, "/api/state").await).unwrap();
    let paused = state["run"]["paused"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(paused.contains("potluck pause"), "{state}");
    node.shutdown().await;

    // A restarted daemon stays paused.
    let node = Node::start(c.clone()).await.unwrap();
    let mut api = control::connect_unix(dir.path()).await.unwrap();
    let s = api.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert!(s.paused.contains("potluck pause"), "{s:?}");
    let r = api.resume(v1::ResumeRequest {}).await.unwrap().into_inner();
    assert!(!r.paused && r.reason.is_empty(), "{r:?}");
    let s = api.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.paused, "");
    node.shutdown().await;
    let node = Node::start(c.clone()).await.unwrap();
    let mut api = control::connect_unix(dir.path()).await.unwrap();
    let s = api.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(s.paused, "", "a resume survives a restart too");
    node.shutdown().await;

    // A schedule that covers the whole week.
    let mut c = c;
    c.pause_schedule =
        potluck_daemon::train::pause::Schedule::parse(&["daily 00:00-12:00", "daily 12:00-00:00"])
            .unwrap();
    let node = Node::start(c).await.unwrap();
    let mut api = control::connect_unix(dir.path()).await.unwrap();
    let s = api.status(v1::StatusRequest {}).await.unwrap().into_inner();
    assert!(s.paused.contains("pause_schedule"), "{s:?}");
    let r = api.resume(v1::ResumeRequest {}).await.unwrap().into_inner();
    assert!(!r.paused, "a resume skips the window in progress: {r:?}");
    assert!(r.schedule.contains("daily 00:00-12:00"), "{r:?}");
    let r = api.pause(v1::PauseRequest {}).await.unwrap().into_inner();
    assert!(r.reason.contains("potluck pause"), "{r:?}");
    node.shutdown().await;
}

/// The body of a plain HTTP GET on loopback (the daemon's web listener sends sized bodies).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(buf).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// `potluck pause`, `potluck status`, `potluck run status` and `potluck resume`, the binary
/// against a running daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pauses_and_resumes_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(config(dir.path(), vec![])).await.unwrap();
    let data_dir = dir.path().to_path_buf();
    let cli = move |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_potluck"))
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let run = |args: &'static [&'static str]| {
        let cli = cli.clone();
        tokio::task::spawn_blocking(move || cli(args))
    };
    let out = run(&["pause"]).await.unwrap();
    assert!(out.starts_with("training paused"), "{out}");
    let status: serde_json::Value =
        serde_json::from_str(&run(&["status", "--json"]).await.unwrap()).unwrap();
    assert!(
        status["paused"].as_str().unwrap().contains("potluck pause"),
        "{status}"
    );
    let out = run(&["run", "status"]).await.unwrap();
    assert!(
        out.contains("paused:     paused by `potluck pause`"),
        "{out}"
    );
    let out = run(&["resume"]).await.unwrap();
    assert!(out.starts_with("training resumed"), "{out}");
    let out = run(&["status"]).await.unwrap();
    assert!(!out.contains("training:"), "{out}");
    node.shutdown().await;
}
