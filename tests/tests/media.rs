//! Real media clients against the HTTP gateway, on media made at test time with ffmpeg's test
//! sources (nothing downloaded): ffprobe reads duration and codecs of an H.264/AAC MP4 whose
//! index is at its end (range requests to find it), ffmpeg seeks into it by range, and headless
//! Chromium, driven through chromedriver with plain WebDriver calls, plays that MP4 and a VP9/Opus
//! WebM through the player page and seeks in them. `scripts/test` installs ffmpeg, chromium and
//! chromium-driver (Debian packages); a missing tool fails these tests, it does not skip them.
//!
//! One test runs them in order: the gateway's request counters are process-wide.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::proto::ProduceRequest;
use goutube_tests::browser::{Browser, tool};
use goutube_tests::{DEADLINE, TestNode};
use serde_json::Value;

fn run(command: &mut Command) -> String {
    let output = command.output().expect("running a media tool");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// An H.264/AAC MP4 of 60 s (about 20 MB, so that a seek has something to skip) with its index
/// (moov) at the end, and a VP9/Opus WebM of 10 s.
fn make_media(dir: &Path) -> (PathBuf, PathBuf) {
    let ffmpeg = tool("ffmpeg", "ffmpeg");
    let mp4 = dir.join("end.mp4");
    run(Command::new(&ffmpeg)
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=640x360:rate=25:duration=60",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=60",
            "-c:v",
            "libx264",
            "-pix_fmt",
            "yuv420p",
            "-preset",
            "ultrafast",
            "-b:v",
            "3M",
            "-c:a",
            "aac",
            "-shortest",
        ])
        .arg(&mp4));
    let webm = dir.join("test.webm");
    run(Command::new(&ffmpeg)
        .args([
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=10",
            "-f",
            "lavfi",
            "-i",
            "sine=frequency=440:duration=10",
            "-c:v",
            "libvpx-vp9",
            "-b:v",
            "300k",
            "-deadline",
            "realtime",
            "-cpu-used",
            "8",
            "-c:a",
            "libopus",
            "-shortest",
        ])
        .arg(&webm));
    (mp4, webm)
}

async fn upload(node: &TestNode, point: &str, file: &Path, content_type: &str) -> usize {
    let bytes = std::fs::read(file).unwrap();
    let len = bytes.len();
    let mut content_type = Some(content_type.to_owned());
    let requests: Vec<ProduceRequest> = bytes
        .chunks(256 * 1024)
        .map(|chunk| ProduceRequest {
            point: point.into(),
            frame: Bytes::copy_from_slice(chunk),
            content_type: content_type.take().unwrap_or_default(),
            ..Default::default()
        })
        .collect();
    node.client()
        .await
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap();
    len
}

fn requests_with(status: &str) -> f64 {
    let scrape = goutube::metrics::handle().render();
    scrape
        .lines()
        .filter(|line| {
            line.starts_with(goutube::metrics::HTTP_REQUESTS)
                && line.contains(&format!("status=\"{status}\""))
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffmpeg_and_chromium_play_and_seek_through_the_gateway() {
    let work = tempfile::tempdir().unwrap();
    let (mp4, webm) = make_media(work.path());
    let node = TestNode::start(|_| {}).await;
    let mp4_len = upload(&node, "videos/end.mp4", &mp4, "video/mp4").await;
    // The WebM's type is sniffed from its first bytes.
    upload(&node, "videos/test.webm", &webm, "").await;
    let http = node.node.http_addr();
    let mp4_url = format!("http://{http}/v1/points/videos/end.mp4");

    // ffprobe finds duration and codecs; the index is at the end, so it asks for ranges.
    let ffprobe = tool("ffprobe", "ffmpeg");
    let ranged_before = requests_with("206");
    let probed = run(Command::new(&ffprobe).args([
        "-v",
        "error",
        "-show_entries",
        "format=duration:stream=codec_name",
        "-of",
        "json",
        &mp4_url,
    ]));
    let probed: Value = serde_json::from_str(&probed).unwrap();
    let duration: f64 = probed["format"]["duration"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((59.0..61.0).contains(&duration), "{probed}");
    let codecs: Vec<&str> = probed["streams"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["codec_name"].as_str())
        .collect();
    assert_eq!(codecs, ["h264", "aac"], "{probed}");
    assert!(
        requests_with("206") >= ranged_before + 2.0,
        "ffprobe read the index at the end by range"
    );

    // ffmpeg seeks to 40 s by range: it decodes the same frame as from the file, and its own
    // trace shows the request that jumped there and the answer to it.
    let ffmpeg = tool("ffmpeg", "ffmpeg");
    let frame_at_40 = |input: &str| {
        let output = Command::new(&ffmpeg)
            .args(["-v", "trace", "-ss", "40", "-i", input])
            .args(["-frames:v", "1", "-f", "framemd5", "-"])
            .output()
            .expect("running ffmpeg");
        assert!(output.status.success(), "ffmpeg -ss 40 -i {input} failed");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (local, _) = frame_at_40(mp4.to_str().unwrap());
    let (remote, trace) = frame_at_40(&mp4_url);
    assert_eq!(remote, local, "the frame at 40 s");
    let starts: Vec<u64> = trace
        .lines()
        .filter_map(|line| {
            line.strip_prefix("Range: bytes=")?
                .strip_suffix('-')?
                .parse()
                .ok()
        })
        .collect();
    let seek = starts
        .iter()
        .copied()
        .find(|&start| start > mp4_len as u64 / 2 && start < mp4_len as u64 * 9 / 10)
        .unwrap_or_else(|| panic!("no range request past the middle: {starts:?}"));
    let answer = format!("content-range: bytes {seek}-{}/{mp4_len}", mp4_len - 1);
    assert!(trace.contains(&answer), "{answer} not in the trace");

    // Chromium plays both through the player page, and seeks.
    let driver = Browser::start(work.path(), &["--autoplay-policy=no-user-gesture-required"]).await;
    for (point, minimum_duration) in [("videos/end.mp4", 59.0), ("videos/test.webm", 9.0)] {
        let page = format!("http://{http}/v1/player/{point}");
        play_and_seek(&driver, &page, minimum_duration).await;
    }
    driver.stop().await;
    node.shutdown().await;
}

/// The player element's (currentTime, readyState, duration, error code).
async fn state(browser: &Browser) -> (f64, u64, f64, Value) {
    let value = browser
        .execute(
            "const v = document.getElementById('player'); \
             return [v.currentTime, v.readyState, v.duration || 0, v.error && v.error.code];",
        )
        .await;
    (
        value[0].as_f64().unwrap_or(0.0),
        value[1].as_u64().unwrap_or(0),
        value[2].as_f64().unwrap_or(0.0),
        value[3].clone(),
    )
}

/// Waits until the player's state satisfies `check`.
async fn until(
    browser: &Browser,
    what: &str,
    check: impl Fn(f64, u64, f64) -> bool,
) -> (f64, u64, f64) {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (time, ready, duration, error) = state(browser).await;
        assert!(error.is_null(), "{what}: the media element failed: {error}");
        if check(time, ready, duration) {
            return (time, ready, duration);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: currentTime {time}, readyState {ready}, duration {duration}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn play_and_seek(browser: &Browser, page: &str, minimum_duration: f64) {
    browser.open(page).await;
    let (_, _, duration) = until(browser, page, |time, ready, duration| {
        time > 1.0 && ready == 4 && duration > 0.0
    })
    .await;
    assert!(duration >= minimum_duration, "{page}: duration {duration}");
    let middle = duration / 2.0;
    browser
        .execute(&format!(
            "document.getElementById('player').currentTime = {middle};"
        ))
        .await;
    until(
        browser,
        &format!("{page} after the seek"),
        |time, ready, _| time > middle + 1.0 && ready == 4,
    )
    .await;
}
