//! The pages for people (`docs/http.md`, "Pages"), against real nodes: the points page, the
//! cluster page and the player, opened in headless Chromium on a balancer in front of two
//! leaders and a follower, with assertions on the DOM (the facts of real points, the members of
//! the real cluster, a player that fits the window) and a screenshot of each page kept in
//! `target/test-artifacts/pages/`; and who may see them: a client certificate, or a signed URL
//! of the pages, which no point's signed URL opens.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use goutube::config::{Config, Role};
use goutube::proto::{ListMembersRequest, ProduceRequest};
use goutube::secret::Secret;
use goutube_tests::browser::{Browser, artifacts, tool};
use goutube_tests::{
    Pki, TestNode, connected_followers, data, eventually, eventually_some, http, owner, produce,
    url_target,
};
use serde_json::Value;

fn seeded(config: &mut Config, seed: &str) {
    config.seed_addresses = vec![seed.to_owned()];
    config.cluster.bootstrap_expect = 2;
}

/// An H.264 MP4 of 320×240, 4 s: the size the old player stretched past the window.
fn small_video(dir: &Path) -> Vec<u8> {
    let path = dir.join("small.mp4");
    let output = Command::new(tool("ffmpeg", "ffmpeg"))
        .args(["-v", "error", "-f", "lavfi", "-i"])
        .arg("testsrc=size=320x240:rate=25:duration=4")
        .args([
            "-pix_fmt",
            "yuv420p",
            "-c:v",
            "libx264",
            "-movflags",
            "+faststart",
        ])
        .arg(&path)
        .output()
        .expect("running ffmpeg");
    assert!(
        output.status.success(),
        "ffmpeg: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::fs::read(path).expect("the video")
}

/// Rows of the table `table` as (data-key attribute → the row's text), by script.
async fn rows(browser: &Browser, table: &str, key: &str) -> BTreeMap<String, String> {
    let script = format!(
        "return [...document.querySelectorAll('#{table} tbody tr')]\
         .map(r => [r.getAttribute('data-{key}'), r.innerText]);"
    );
    let value = browser.execute(&script).await;
    value
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|row| {
                    (
                        row[0].as_str().unwrap_or_default().to_owned(),
                        row[1].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The bounding box of the element `selector`, and the viewport: (top, bottom, right, inner
/// height, inner width).
async fn fits(browser: &Browser, selector: &str) -> (f64, f64, f64, f64, f64) {
    let value: Value = browser
        .execute(&format!(
            "const r = document.querySelector('{selector}').getBoundingClientRect(); \
             return [r.top, r.bottom, r.right, window.innerHeight, window.innerWidth];"
        ))
        .await;
    let n = |i: usize| value[i].as_f64().unwrap_or(f64::NAN);
    (n(0), n(1), n(2), n(3), n(4))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn points_cluster_and_player_pages_in_chromium() {
    let work = tempfile::tempdir().unwrap();
    let first = TestNode::start(|c| {
        c.node_name = "leader-1".into();
        c.role = Role::Leader;
        c.cluster.bootstrap_expect = 2;
    })
    .await;
    let seed = first.node.gossip_addr().to_string();
    let second = {
        let seed = seed.clone();
        TestNode::start(move |c| {
            c.node_name = "leader-2".into();
            c.role = Role::Leader;
            seeded(c, &seed);
        })
        .await
    };
    let follower = {
        let (seed, leader) = (seed.clone(), first.node.replication_addr().to_string());
        TestNode::start(move |c| {
            c.node_name = "follower-1".into();
            c.role = Role::Follower;
            c.leader_addresses = vec![leader];
            seeded(c, &seed);
        })
        .await
    };
    let balancer = TestNode::start(move |c| {
        c.node_name = "balancer-1".into();
        c.role = Role::Balancer;
        seeded(c, &seed);
    })
    .await;
    eventually(
        "the balancer sees the formed ring and all four members",
        || async {
            let view = balancer
                .client()
                .await
                .list_members(ListMembersRequest {})
                .await
                .unwrap()
                .into_inner();
            !view.ring.is_empty()
                && view.members.iter().filter(|m| m.owns_range).count() == 2
                && view.members.iter().filter(|m| m.live).count() == 4
        },
    )
    .await;
    eventually("the follower to connect", || async {
        connected_followers(&first.addr()).await == 1
    })
    .await;

    // Points through the balancer: a video (on leader-1, which has the follower), a log, an id
    // that would be markup.
    let mut video_id = String::new();
    for i in 0.. {
        video_id = format!("videos/small-{i}.mp4");
        if owner(&balancer, &video_id).await == "leader-1" {
            break;
        }
    }
    let video = small_video(work.path());
    let mut client = balancer.client().await;
    let typed = ProduceRequest {
        point: video_id.clone(),
        frame: video.clone().into(),
        content_type: "video/mp4".into(),
        ..Default::default()
    };
    client
        .produce_stream(tokio_stream::iter(vec![typed]))
        .await
        .unwrap();
    let markup = "videos/<b>bold</b>";
    let mut sizes = BTreeMap::from([(video_id.clone(), video.len())]);
    for (i, (point, len)) in [(markup, 3000), ("videos/z", 70_000), ("logs/x", 10)]
        .into_iter()
        .enumerate()
    {
        produce(&mut client, point, &[data(i as u64, len)])
            .await
            .unwrap();
        sizes.insert(point.to_owned(), len);
    }
    sizes.remove("logs/x");
    // Which leader holds each (its owner in the ring): the page must name it.
    let mut holders = BTreeMap::new();
    for point in sizes.keys() {
        holders.insert(point.clone(), owner(&balancer, point).await);
    }

    let browser = Browser::start(work.path(), &[]).await;
    browser.resize(1280, 800).await;
    let screenshots = artifacts("pages");
    let http = balancer.node.http_addr();

    // The points page, searched by prefix: every video, with its facts; no log.
    browser
        .open(&format!("http://{http}/v1/pages/points?prefix=videos/"))
        .await;
    let listed = rows(&browser, "points", "point").await;
    assert_eq!(
        listed.keys().collect::<Vec<_>>(),
        sizes.keys().collect::<Vec<_>>(),
        "{listed:?}"
    );
    let facts = browser
        .execute(
            "return Object.fromEntries([...document.querySelectorAll('#points tbody tr')]\
             .map(r => [r.dataset.point, [Number(r.dataset.size), \
             r.querySelector('.type').innerText, r.querySelector('.holder').innerText, \
             r.querySelector('.age').innerText, r.querySelector('.id').innerText, \
             r.querySelector('.id b') === null]]));",
        )
        .await;
    for (point, size) in &sizes {
        let row = &facts[point];
        assert_eq!(row[0].as_u64(), Some(*size as u64), "{point}: {row}");
        assert_eq!(
            row[2].as_str(),
            Some(holders[point].as_str()),
            "{point}: {row}"
        );
        assert!(
            row[3].as_str().is_some_and(|age| age.ends_with(" s ago")),
            "{point} was written seconds ago: {row}"
        );
        assert_eq!(
            row[4].as_str(),
            Some(point.as_str()),
            "the id is text: {row}"
        );
        assert_eq!(row[5], Value::Bool(true), "no markup from the id: {row}");
    }
    assert_eq!(facts[&video_id][1].as_str(), Some("video/mp4"));
    // The video, on leader-1, lists leader-1's follower and its lag, which reaches 0.
    eventually_some("the follower's lag shown as 0", || async {
        browser
            .open(&format!("http://{http}/v1/pages/points?prefix=videos/"))
            .await;
        let lag = browser
            .execute(&format!(
                "const s = document.querySelector('tr[data-point=\"{video_id}\"] \
                 .replica[data-follower=\"follower-1\"]'); return s && s.dataset.lag;"
            ))
            .await;
        (lag.as_str() == Some("0")).then_some(())
    })
    .await;
    browser.screenshot(&screenshots.join("points.png")).await;
    // A search with no match says so.
    browser
        .open(&format!("http://{http}/v1/pages/points?prefix=nothing/"))
        .await;
    let summary = browser
        .execute("return document.getElementById('summary').innerText;")
        .await;
    assert_eq!(
        summary.as_str(),
        Some("No point starts with “nothing/”."),
        "{summary}"
    );

    // The player, from the points page's link: the video and its facts fit the window.
    browser
        .open(&format!("http://{http}/v1/pages/points?prefix=videos/s"))
        .await;
    let link = browser
        .execute("return document.querySelector('#points td.id a').href;")
        .await;
    let link = link.as_str().expect("a player link").to_owned();
    assert!(link.ends_with(&format!("/v1/player/{video_id}")), "{link}");
    for (width, height) in [(1280, 800), (640, 480), (1600, 500)] {
        browser.resize(width, height).await;
        browser.open(&link).await;
        eventually_some("the video's first frame", || async {
            let value = browser
                .execute(
                    "const v = document.getElementById('player'); \
                     return [v.readyState, v.videoWidth, v.videoHeight, v.error && v.error.code];",
                )
                .await;
            assert!(value[3].is_null(), "the video failed: {value}");
            (value[0].as_u64() >= Some(2)).then_some(())
        })
        .await;
        let (top, bottom, right, inner_height, inner_width) = fits(&browser, "#player").await;
        assert!(
            top >= 0.0 && bottom <= inner_height + 0.5 && right <= inner_width + 0.5,
            "the video and its controls fit {width}×{height}: top {top}, bottom {bottom}, \
             right {right}, viewport {inner_width}×{inner_height}"
        );
        let (_, facts_bottom, _, _, _) = fits(&browser, "#facts").await;
        assert!(
            facts_bottom <= top + 0.5,
            "the facts are above the video: {facts_bottom} vs {top}"
        );
        let size = browser
            .execute("return document.getElementById('size').title;")
            .await;
        assert_eq!(
            size.as_str(),
            Some(format!("{} bytes", video.len()).as_str())
        );
        browser
            .screenshot(&screenshots.join(format!("player-{width}x{height}.png")))
            .await;
    }

    // The cluster page: every member, the two owners' shares, the groups.
    browser.resize(1280, 800).await;
    browser
        .open(&format!("http://{http}/v1/pages/cluster"))
        .await;
    let members = rows(&browser, "members", "member").await;
    assert_eq!(
        members.keys().collect::<Vec<_>>(),
        ["balancer-1", "follower-1", "leader-1", "leader-2"],
        "{members:?}"
    );
    let shares = browser
        .execute(
            "return Object.fromEntries([...document.querySelectorAll('#members tbody tr')]\
             .map(r => [r.dataset.member, [r.dataset.state, r.dataset.live, \
             r.querySelector('.share').innerText]]));",
        )
        .await;
    let mut total = 0.0;
    for leader in ["leader-1", "leader-2"] {
        let row = &shares[leader];
        assert_eq!(row[0].as_str(), Some("active"), "{leader}: {row}");
        assert_eq!(row[1].as_str(), Some("true"), "{leader}: {row}");
        let share: f64 = row[2]
            .as_str()
            .and_then(|s| s.trim_end_matches(" %").parse().ok())
            .unwrap_or_else(|| panic!("{leader}'s share: {row}"));
        assert!(share > 10.0, "{leader} owns a real share: {row}");
        total += share;
    }
    assert!((total - 100.0).abs() < 0.2, "the shares add up: {total}");
    assert_eq!(shares["balancer-1"][2].as_str(), Some("—"));
    let groups = rows(&browser, "groups", "slot").await;
    assert!(
        groups
            .get("leader-1")
            .is_some_and(|row| row.contains("follower-1")),
        "leader-1's group lists its follower: {groups:?}"
    );
    browser.screenshot(&screenshots.join("cluster.png")).await;
    // It refreshes itself: the document is replaced, and shows a member that went down.
    browser.execute("window.goutubeMark = 1;").await;
    second.shutdown().await;
    eventually_some(
        "the cluster page to refresh and show leader-2 down",
        || async {
            let value = browser
                .execute(
                    "const r = document.querySelector('tr[data-member=\"leader-2\"]'); \
                 return [window.goutubeMark === undefined, r && r.dataset.live];",
                )
                .await;
            (value[0] == Value::Bool(true) && value[1].as_str() == Some("false")).then_some(())
        },
    )
    .await;
    browser
        .screenshot(&screenshots.join("cluster-member-down.png"))
        .await;

    browser.stop().await;
    for node in [balancer, follower, first] {
        node.shutdown().await;
    }
}

fn secure(pki: &Pki, config: &mut Config) {
    config.tls = Some(pki.node("test-node"));
    config.cluster.key_file = Some(pki.cluster_key());
    config.http.url_keys = vec![Secret("the pages' url key".into())];
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_are_seen_as_the_gateway_reads_certificates_and_signed_urls() {
    let pki = Pki::new();
    let node = TestNode::start(|c| secure(&pki, c)).await;
    let root = goutube::client::Client::connect(&pki.client_options("root", &node.addr()))
        .await
        .unwrap();
    produce(&mut root.raw(), "films/f", &[data(3, 2000)])
        .await
        .unwrap();
    let addr = node.node.http_addr();
    let page = |target: String, subject: Option<&'static str>| {
        let tls = Some(pki.https(subject));
        async move { http(addr, "GET", &target, &[], tls).await }
    };

    // A certificate the policy admits sees the page; no certificate, or one it does not admit
    // for `metadata`, is refused with the reason.
    let as_root = page("/v1/pages/points".into(), Some("root")).await;
    assert_eq!(as_root.status, 200);
    let html = String::from_utf8(as_root.body).unwrap();
    assert!(html.contains("data-point=\"films/f\""), "{html}");
    let anonymous = page("/v1/pages/cluster".into(), None).await;
    assert_eq!(anonymous.status, 403);
    assert!(
        String::from_utf8_lossy(&anonymous.body).contains("goutube url --pages"),
        "the refusal says how to get in"
    );
    let nobody = page("/v1/pages/points".into(), Some("nobody")).await;
    assert_eq!(nobody.status, 403);
    assert!(String::from_utf8_lossy(&nobody.body).contains("PermissionDenied"));
    // `/` is the points page, with the same query.
    let home = page("/?prefix=films/".into(), Some("root")).await;
    assert_eq!(home.status, 307);
    assert_eq!(
        home.header("location"),
        Some("/v1/pages/points?prefix=films/")
    );

    // A signed URL of the pages lets a browser without a certificate see them, and its links
    // carry the signature on: to the cluster page, and to a player signed for the same subject.
    let (url, _) = root.sign_pages_url(Duration::from_secs(600)).await.unwrap();
    assert!(
        url.starts_with(&format!("https://{addr}/v1/pages/points?expires=")),
        "{url}"
    );
    let signed = page(url_target(&url), None).await;
    assert_eq!(signed.status, 200);
    let html = String::from_utf8(signed.body).unwrap();
    let player = html
        .split("<td class=\"id\"><a href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a player link")
        .replace("&amp;", "&");
    assert!(player.contains("/v1/player/films/f?expires="), "{player}");
    let played = page(url_target(&player), None).await;
    assert_eq!(played.status, 200, "{player}");
    let cluster = html
        .split("<a id=\"to-cluster\" href=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a link to the cluster page")
        .replace("&amp;", "&");
    let cluster = page(cluster, None).await;
    assert_eq!(cluster.status, 200);
    assert!(String::from_utf8_lossy(&cluster.body).contains("data-member=\"test-node\""));

    // A changed signature, or a point's signed URL, does not open the pages.
    let tampered = url_target(&url).replace("sig=", "sig=00");
    assert_eq!(page(tampered, None).await.status, 403);
    let (point_url, _) = root
        .sign_url("films/f", Duration::from_secs(600), false)
        .await
        .unwrap();
    let query = point_url.split_once('?').unwrap().1;
    assert_eq!(
        page(format!("/v1/pages/points?{query}"), None).await.status,
        403
    );
    // Only a subject that may see `metadata` gets a pages URL.
    let nobody = goutube::client::Client::connect(&pki.client_options("nobody", &node.addr()))
        .await
        .unwrap();
    let denied = nobody
        .sign_pages_url(Duration::from_secs(600))
        .await
        .unwrap_err();
    assert!(
        denied.to_string().contains("PermissionDenied") || denied.to_string().contains("may not"),
        "{denied}"
    );
    node.shutdown().await;
}
