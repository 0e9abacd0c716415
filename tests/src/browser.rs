//! Headless Chromium for the tests, driven through chromedriver in plain WebDriver (JSON over
//! HTTP/1.1): open a page, run a script in it, size the window, take a screenshot. `scripts/test`
//! installs chromium and chromium-driver (Debian packages); a missing tool fails the test that
//! needs it, it does not skip it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::{DEADLINE, free_port};

/// The path of `tool`, or a failure that says how to get it.
pub fn tool(name: &str, package: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|candidate| candidate.is_file())
        })
        .unwrap_or_else(|| {
            panic!("{name} is missing: scripts/test installs it (apt-get install {package})")
        })
}

/// A chromedriver process and one headless Chromium session.
pub struct Browser {
    process: std::process::Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a session whose profile lives in `work`. `extra` arguments go to
    /// Chromium after the ones every test needs on these machines.
    pub async fn start(work: &Path, extra: &[&str]) -> Browser {
        let chromium = tool("chromium", "chromium");
        let port = free_port();
        let process = Command::new(tool("chromedriver", "chromium-driver"))
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + DEADLINE;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver does not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = work.join("chromium-profile");
        // Without the background-networking flags Chromium keeps dialling hosts this machine's
        // closed network refuses.
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        args.push(format!("--user-data-dir={}", profile.display()));
        let created = webdriver(
            addr,
            "POST",
            "/session",
            Some(
                json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                    "binary": chromium,
                    "args": args,
                }}}}),
            ),
        )
        .await;
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_owned();
        Browser {
            process,
            addr,
            session,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.addr, method, &path, body).await
    }

    /// Opens `url` and waits for it to load.
    pub async fn open(&self, url: &str) {
        let answer = self.call("POST", "/url", Some(json!({ "url": url }))).await;
        assert!(
            answer["value"].is_null(),
            "opening {url}: {}",
            answer["value"]
        );
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub async fn execute(&self, script: &str) -> Value {
        let answer = self
            .call(
                "POST",
                "/execute/sync",
                Some(json!({"script": script, "args": []})),
            )
            .await;
        answer["value"].clone()
    }

    /// Sizes the window (the outer window: the page's viewport is what `innerWidth` and
    /// `innerHeight` say).
    pub async fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .await;
    }

    /// A screenshot of the viewport, written to `path` as PNG.
    pub async fn screenshot(&self, path: &Path) {
        let answer = self.call("GET", "/screenshot", None).await;
        let encoded = answer["value"].as_str().expect("a base64 screenshot");
        let png = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .expect("base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("the screenshots' directory");
        }
        std::fs::write(path, png).expect("writing a screenshot");
    }

    /// Ends the session and chromedriver.
    pub async fn stop(mut self) {
        self.call("DELETE", "", None).await;
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Where tests keep what a person may want to look at afterwards (screenshots):
/// `target/test-artifacts/<name>` of the workspace.
pub fn artifacts(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(name)
}

/// One WebDriver call: JSON in, JSON out.
async fn webdriver(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> Value {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to chromedriver");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("an HTTP/1.1 connection to chromedriver");
    tokio::spawn(connection);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body)))
        .expect("a WebDriver request");
    let response = sender
        .send_request(request)
        .await
        .expect("chromedriver answers");
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("chromedriver's answer")
        .to_bytes();
    serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&bytes)))
}
