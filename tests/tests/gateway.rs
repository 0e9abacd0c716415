//! The HTTP range gateway against real nodes: one case per rule of docs/http.md (RFC 9110
//! ranges, `If-Range`, ETags, `304`, `416`, `HEAD`), ids that need percent-encoding, a point that
//! grows between requests, `?follow=1`, content types, who may read (mTLS, signed URLs and their
//! rotation), the player page, and redirects to the replica that holds the range.

use std::net::SocketAddr;
use std::time::Duration;

use goutube::config::{Config, Role};
use goutube::proto::ProduceRequest;
use goutube::secret::Secret;
use goutube_tests::{
    HttpAnswer, Pki, TestNode, consume, data, eventually, http, http_response, metadata, produce,
    url_path, url_target, window,
};
use tonic::Code;

async fn get(node: &TestNode, target: &str, headers: &[(&str, &str)]) -> HttpAnswer {
    http(node.node.http_addr(), "GET", target, headers, None).await
}

fn points(id: &str) -> String {
    format!("/v1/points/{}", url_path(id))
}

/// A 1000-byte point of non-periodic bytes.
async fn node_with_point() -> (TestNode, Vec<u8>) {
    let node = TestNode::start(|_| {}).await;
    let bytes = data(11, 1000);
    produce(
        &mut node.client().await,
        "films/f",
        std::slice::from_ref(&bytes),
    )
    .await
    .unwrap();
    (node, bytes)
}

#[tokio::test]
async fn ranges_follow_rfc_9110() {
    let (node, bytes) = node_with_point().await;
    let full = get(&node, "/v1/points/films/f", &[]).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.body, bytes);
    assert_eq!(full.header("content-length"), Some("1000"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    assert_eq!(
        full.header("content-type"),
        Some("application/octet-stream")
    );
    let etag = full.header("etag").expect("a strong ETag").to_owned();
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    let weak = format!("W/{etag}");

    // (Range, If-Range, (status, Content-Range, body))
    type Expected<'a> = (u16, Option<&'a str>, &'a [u8]);
    let whole: Expected = (200, None, &bytes[..]);
    let cases: Vec<(&str, Option<&str>, Expected)> = vec![
        (
            "bytes=0-99",
            None,
            (206, Some("bytes 0-99/1000"), &bytes[..100]),
        ),
        (
            "bytes=900-",
            None,
            (206, Some("bytes 900-999/1000"), &bytes[900..]),
        ),
        (
            "bytes=-100",
            None,
            (206, Some("bytes 900-999/1000"), &bytes[900..]),
        ),
        // A suffix longer than the point is the whole point.
        (
            "bytes=-5000",
            None,
            (206, Some("bytes 0-999/1000"), &bytes[..]),
        ),
        // An end past the point is cut to it.
        (
            "bytes=900-5000",
            None,
            (206, Some("bytes 900-999/1000"), &bytes[900..]),
        ),
        (
            "bytes=999-999",
            None,
            (206, Some("bytes 999-999/1000"), &bytes[999..]),
        ),
        // Nothing satisfiable.
        ("bytes=1000-", None, (416, Some("bytes */1000"), &[])),
        ("bytes=5000-6000", None, (416, Some("bytes */1000"), &[])),
        ("bytes=-0", None, (416, Some("bytes */1000"), &[])),
        // Ignored: inverted, another unit, several ranges, malformed.
        ("bytes=50-10", None, whole),
        ("items=0-9", None, whole),
        ("bytes=0-9,20-29", None, whole),
        ("bytes=x-y", None, whole),
        // If-Range: the range holds only for the same strong validator.
        (
            "bytes=0-99",
            Some(&etag),
            (206, Some("bytes 0-99/1000"), &bytes[..100]),
        ),
        ("bytes=0-99", Some("\"bogus\""), whole),
        ("bytes=0-99", Some(&weak), whole),
        ("bytes=0-99", Some("Wed, 21 Oct 2015 07:28:00 GMT"), whole),
    ];
    for (range, if_range, (status, content_range, body)) in cases {
        let mut headers = vec![("range", range)];
        if let Some(if_range) = if_range {
            headers.push(("if-range", if_range));
        }
        let answer = get(&node, "/v1/points/films/f", &headers).await;
        let case = format!("{range} if-range {if_range:?}");
        assert_eq!(answer.status, status, "{case}");
        assert_eq!(answer.header("content-range"), content_range, "{case}");
        if status == 416 {
            let said = format!(
                "range not satisfiable: the point has {} bytes\n",
                bytes.len()
            );
            assert_eq!(answer.body, said.as_bytes(), "{case}");
        } else {
            assert_eq!(answer.body, body, "{case}");
        }
        if status != 416 {
            assert_eq!(
                answer.header("content-length"),
                Some(body.len().to_string().as_str()),
                "{case}"
            );
            assert_eq!(answer.header("accept-ranges"), Some("bytes"), "{case}");
            assert_eq!(answer.header("etag"), Some(etag.as_str()), "{case}");
        }
    }

    // If-None-Match with the current ETag: 304, no body.
    let cached = get(&node, "/v1/points/films/f", &[("if-none-match", &etag)]).await;
    assert_eq!(cached.status, 304);
    assert!(cached.body.is_empty());
    assert_eq!(cached.header("etag"), Some(etag.as_str()));
    let stale = get(&node, "/v1/points/films/f", &[("if-none-match", "\"old\"")]).await;
    assert_eq!(stale.status, 200);

    // HEAD: the same headers, no body.
    let addr = node.node.http_addr();
    let head = http(addr, "HEAD", "/v1/points/films/f", &[], None).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("1000"));
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    assert!(head.body.is_empty());
    let head = http(
        addr,
        "HEAD",
        "/v1/points/films/f",
        &[("range", "bytes=10-19")],
        None,
    )
    .await;
    assert_eq!(head.status, 206);
    assert_eq!(head.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(head.header("content-length"), Some("10"));
    assert!(head.body.is_empty());
    node.shutdown().await;
}

#[tokio::test]
async fn ids_travel_percent_encoded_and_hostile_ones_are_refused() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let ids = ["videos/a b%c/é☃.mp4", "q?x#y", "plain"];
    for (i, id) in ids.iter().enumerate() {
        produce(&mut client, id, &[data(i as u64, 300 + i)])
            .await
            .unwrap();
        let answer = get(&node, &points(id), &[]).await;
        assert_eq!(answer.status, 200, "{id}");
        assert_eq!(answer.body, data(i as u64, 300 + i), "{id}");
    }
    // `/` may come encoded too.
    let answer = get(
        &node,
        "/v1/points/videos%2Fa%20b%25c%2F%C3%A9%E2%98%83.mp4",
        &[],
    )
    .await;
    assert_eq!(answer.status, 200);
    for (target, status) in [
        ("/v1/points/not/there".to_owned(), 404),
        ("/v1/points/nul%00byte".to_owned(), 400),
        (format!("/v1/points/{}", "x".repeat(300)), 400),
        ("/v1/points/%FF%FE".to_owned(), 400),
    ] {
        let answer = get(&node, &target, &[]).await;
        assert_eq!(answer.status, status, "{target}");
        let text = String::from_utf8_lossy(&answer.body);
        assert_eq!(text.lines().count(), 1, "a one-line reason: {text:?}");
    }
    node.shutdown().await;
}

#[tokio::test]
async fn a_growing_point_is_served_as_it_is_and_followed() {
    let node = TestNode::start(|c| c.http.writing_window_ms = 300).await;
    let mut client = node.client().await;
    let first = data(1, 5000);
    produce(&mut client, "live/cam", std::slice::from_ref(&first))
        .await
        .unwrap();
    let before = get(&node, "/v1/points/live/cam", &[]).await;
    assert_eq!(before.body, first);
    assert_eq!(
        before.header("cache-control"),
        Some("no-cache"),
        "being written"
    );
    let etag = before.header("etag").unwrap().to_owned();

    // A follower of the point sees what comes next, as it comes.
    let follow = http_response(
        node.node.http_addr(),
        "GET",
        "/v1/points/live/cam?follow=1",
        &[],
        None,
    )
    .await;
    assert_eq!(follow.status(), 200);
    assert!(follow.headers().get("content-length").is_none(), "chunked");
    let mut body = follow.into_body();
    let mut followed = Vec::new();
    let second = data(2, 7000);
    produce(&mut client, "live/cam", std::slice::from_ref(&second))
        .await
        .unwrap();
    let expected = [first.clone(), second.clone()].concat();
    while followed.len() < expected.len() {
        use http_body_util::BodyExt;
        let frame = tokio::time::timeout(goutube_tests::DEADLINE, body.frame())
            .await
            .expect("the follower gets the new bytes")
            .expect("a frame")
            .expect("no error");
        if let Ok(data) = frame.into_data() {
            followed.extend_from_slice(&data);
        }
    }
    assert_eq!(followed, expected);
    drop(body);

    // It grew: the old ETag no longer matches, so an If-Range request gets the whole new point.
    let after = get(
        &node,
        "/v1/points/live/cam",
        &[("range", "bytes=0-9"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(after.status, 200);
    assert_eq!(after.body, expected);
    assert_ne!(after.header("etag"), Some(etag.as_str()));
    // Once nobody writes it any more, it is no longer marked as being written.
    eventually("the point to settle", || async {
        get(&node, "/v1/points/live/cam", &[("range", "bytes=0-0")])
            .await
            .header("cache-control")
            .is_none()
    })
    .await;
    node.shutdown().await;
}

fn typed(point: &str, content_type: &str, frame: Vec<u8>) -> ProduceRequest {
    ProduceRequest {
        point: point.into(),
        frame: frame.into(),
        content_type: content_type.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn content_types_are_given_or_sniffed() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    png.extend(data(3, 200));
    let requests = vec![
        typed("given", "video/webm", data(1, 100)),
        typed("given", "", data(2, 100)),
        typed("sniffed.png", "", png),
        typed("notes", "", b"plain words\n".to_vec()),
        typed("noise", "", data(4, 100)),
    ];
    client
        .produce_stream(tokio_stream::iter(requests))
        .await
        .unwrap();
    for (point, expected) in [
        ("given", "video/webm"),
        ("sniffed.png", "image/png"),
        ("notes", "text/plain; charset=utf-8"),
        ("noise", "application/octet-stream"),
    ] {
        let answer = get(&node, &points(point), &[]).await;
        assert_eq!(answer.header("content-type"), Some(expected), "{point}");
        let meta = metadata(&mut client, point).await.unwrap();
        assert_eq!(meta.content_type, expected, "{point}");
    }
    // A point keeps its type: another one is refused; so is a type for a point that has bytes.
    for (point, content_type) in [("given", "video/mp4"), ("noise", "video/mp4")] {
        let status = client
            .produce_stream(tokio_stream::iter([typed(
                point,
                content_type,
                data(5, 10),
            )]))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::FailedPrecondition,
            "{point}: {status:?}"
        );
    }
    // The same type again is fine (a retried upload).
    client
        .produce_stream(tokio_stream::iter([typed(
            "given",
            "video/webm",
            data(6, 10),
        )]))
        .await
        .unwrap();
    let status = client
        .produce_stream(tokio_stream::iter([typed(
            "bad",
            "not a type",
            data(7, 10),
        )]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    node.shutdown().await;
}

fn secure(pki: &Pki, config: &mut Config, keys: &[&str]) {
    config.tls = Some(pki.node("test-node"));
    config.cluster.key_file = Some(pki.cluster_key());
    config.http.url_keys = keys.iter().map(|k| Secret((*k).into())).collect();
}

const OLD_KEY: &str = "the first url signing key";
const NEW_KEY: &str = "the second url signing key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_read_mtls_subjects_and_signed_urls() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let node = goutube_tests::start_in(dir.path(), |c| secure(&pki, c, &[OLD_KEY])).await;
    let addr = node.http_addr();
    let mut root = pki.client("root", &node.rpc_addr().to_string()).await;
    produce(&mut root, "films/f", &[data(1, 2000)])
        .await
        .unwrap();
    produce(&mut root, "films/g", &[data(2, 2000)])
        .await
        .unwrap();

    // mTLS: root reads, nobody is refused, no certificate and no signature is refused.
    let as_root = http(
        addr,
        "GET",
        "/v1/points/films/f",
        &[],
        Some(pki.https(Some("root"))),
    )
    .await;
    assert_eq!((as_root.status, as_root.body.len()), (200, 2000));
    for subject in [Some("nobody"), None] {
        let refused = http(
            addr,
            "GET",
            "/v1/points/films/f",
            &[],
            Some(pki.https(subject)),
        )
        .await;
        assert_eq!(refused.status, 403, "{subject:?}");
        let reason = String::from_utf8_lossy(&refused.body);
        assert_eq!(reason.lines().count(), 1, "{reason}");
    }

    // A signed URL, made by root through the API, lets a browser without a certificate in.
    let client =
        goutube::client::Client::connect(&pki.client_options("root", &node.rpc_addr().to_string()))
            .await
            .unwrap();
    let browser = Some(pki.https(None));
    let (url, _) = client
        .sign_url("films/f", Duration::from_secs(600), false)
        .await
        .unwrap();
    assert!(
        url.starts_with(&format!("https://{addr}/v1/points/films/f?")),
        "{url}"
    );
    let signed = http(addr, "GET", &url_target(&url), &[], browser.clone()).await;
    assert_eq!((signed.status, signed.body), (200, data(1, 2000)));
    let ranged = http(
        addr,
        "GET",
        &url_target(&url),
        &[("range", "bytes=0-9")],
        browser.clone(),
    )
    .await;
    assert_eq!(ranged.status, 206);

    // Another point, a forged signature, a missing part: 403 with the reason.
    let other = url_target(&url).replace("films/f", "films/g");
    let forged = {
        let mut target = url_target(&url);
        let last = target.pop().unwrap();
        target.push(if last == '0' { '1' } else { '0' });
        target
    };
    let missing = url_target(&url).split("&sig=").next().unwrap().to_owned();
    for (what, target, says) in [
        ("another point", other, "does not match"),
        ("forged", forged, "does not match"),
        ("missing", missing, "needs expires, subject and sig"),
    ] {
        let answer = http(addr, "GET", &target, &[], browser.clone()).await;
        assert_eq!(answer.status, 403, "{what}");
        let reason = String::from_utf8_lossy(&answer.body);
        assert!(reason.contains(says), "{what}: {reason}");
    }
    // Signing needs consume on the point: nobody gets no URL.
    let nobody = goutube::client::Client::connect(
        &pki.client_options("nobody", &node.rpc_addr().to_string()),
    )
    .await
    .unwrap();
    let refused = nobody
        .sign_url("films/f", Duration::from_secs(60), false)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("PermissionDenied"),
        "{refused}"
    );

    // Expiry.
    let (short, _) = client
        .sign_url("films/f", Duration::from_secs(1), false)
        .await
        .unwrap();
    eventually("the URL to expire", || {
        let (target, browser) = (url_target(&short), browser.clone());
        async move {
            let answer = http(addr, "GET", &target, &[], browser).await;
            answer.status == 403 && String::from_utf8_lossy(&answer.body).contains("expired")
        }
    })
    .await;

    // Rotation: a new key first keeps the old URLs valid; retiring the old key ends them.
    node.shutdown().await.unwrap();
    let node = goutube_tests::start_in(dir.path(), |c| secure(&pki, c, &[NEW_KEY, OLD_KEY])).await;
    let addr: SocketAddr = node.http_addr();
    let url = format!("https://{addr}{}", url_target(&url));
    let still = http(addr, "GET", &url_target(&url), &[], browser.clone()).await;
    assert_eq!(still.status, 200, "the old key still verifies");
    let client =
        goutube::client::Client::connect(&pki.client_options("root", &node.rpc_addr().to_string()))
            .await
            .unwrap();
    let (fresh, _) = client
        .sign_url("films/f", Duration::from_secs(600), true)
        .await
        .unwrap();
    assert!(fresh.contains("/v1/player/films/f?"), "{fresh}");
    node.shutdown().await.unwrap();
    let node = goutube_tests::start_in(dir.path(), |c| secure(&pki, c, &[NEW_KEY])).await;
    let addr = node.http_addr();
    let old = http(addr, "GET", &url_target(&url), &[], browser.clone()).await;
    assert_eq!(old.status, 403, "the retired key no longer verifies");
    let page = http(addr, "GET", &url_target(&fresh), &[], browser.clone()).await;
    assert_eq!(page.status, 200, "signed by the new key");
    node.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_player_page_shows_the_point_in_an_element_and_escapes_its_id() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let mut mp4 = vec![0, 0, 0, 0x18];
    mp4.extend_from_slice(b"ftypisom");
    mp4.extend(data(1, 1000));
    let id = "clips/<script>alert('x')</script>.mp4";
    produce(&mut client, id, &[mp4]).await.unwrap();
    produce(&mut client, "songs/a", &[b"ID3\x04\0\0".to_vec()])
        .await
        .unwrap();
    let page = get(&node, &format!("/v1/player/{}", url_path(id)), &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<video id=\"player\""), "{html}");
    assert!(!html.contains("<script>"), "the id is escaped: {html}");
    assert!(html.contains("&lt;script&gt;"), "{html}");
    assert!(html.contains("video/mp4"), "{html}");
    // The element's source is the point itself, and it plays from the same node.
    let source = html
        .split("src=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap()
        .replace("&amp;", "&")
        .replace("&#39;", "'");
    let media = get(&node, &source, &[]).await;
    assert_eq!(media.status, 200, "{source}");
    assert_eq!(media.body.len(), 1012);
    let song = get(&node, "/v1/player/songs/a", &[]).await;
    assert!(
        String::from_utf8(song.body)
            .unwrap()
            .contains("<audio id=\"player\"")
    );
    node.shutdown().await;
}

/// In a cluster a node that does not hold a point, or not the range asked for, sends the client
/// to the owner (307, never a short answer); a follower that holds it serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_redirected_to_a_replica_that_holds_the_range() {
    let leader = TestNode::start(|c| {
        c.node_name = "leader".into();
        c.role = Role::Leader;
        // The stranger below joins the ring; it must not be handed the point (resharding.md).
        c.reshard.max_concurrent_moves = 0;
    })
    .await;
    let seed = leader.node.gossip_addr().to_string();
    let replication = leader.node.replication_addr().to_string();
    let follower = TestNode::start(move |c| {
        c.node_name = "follower".into();
        c.role = Role::Follower;
        c.leader_addresses = vec![replication];
        c.seed_addresses = vec![seed.clone()];
    })
    .await;
    let other_seed = leader.node.gossip_addr().to_string();
    let stranger = TestNode::start(move |c| {
        c.node_name = "stranger".into();
        c.seed_addresses = vec![other_seed];
    })
    .await;
    let bytes = data(9, 3000);
    produce(
        &mut leader.client().await,
        "films/f",
        std::slice::from_ref(&bytes),
    )
    .await
    .unwrap();
    eventually("the follower's copy", || async {
        metadata(&mut follower.client().await, "films/f")
            .await
            .is_ok_and(|m| m.size == 3000)
    })
    .await;
    for node in [&leader, &follower, &stranger] {
        eventually("everyone sees everyone and the ring", || async {
            let members = node
                .client()
                .await
                .list_members(goutube::proto::ListMembersRequest {})
                .await
                .unwrap()
                .into_inner();
            !members.ring.is_empty() && members.members.iter().filter(|m| m.live).count() == 3
        })
        .await;
    }
    let leader_http = leader.node.http_addr().to_string();

    // The follower holds it: it serves it.
    let served = get(&follower, "/v1/points/films/f", &[("range", "bytes=10-19")]).await;
    assert_eq!(
        (served.status, served.body.as_slice()),
        (206, &bytes[10..20])
    );
    // A range past its copy goes to the owner, which is authoritative.
    let redirect = get(&follower, "/v1/points/films/f", &[("range", "bytes=3000-")]).await;
    assert_eq!(redirect.status, 307);
    let location = redirect.header("location").unwrap().to_owned();
    assert_eq!(
        location,
        format!("http://{leader_http}/v1/points/films/f?hop=1")
    );
    let at_owner = http(
        leader.node.http_addr(),
        "GET",
        &url_target(&location),
        &[("range", "bytes=3000-")],
        None,
    )
    .await;
    assert_eq!(
        at_owner.status, 416,
        "the owner answers, and does not redirect"
    );
    // A node that does not hold the point at all sends the client to its owner.
    let redirect = get(&stranger, "/v1/points/films/f?follow=0", &[]).await;
    assert_eq!(redirect.status, 307);
    assert_eq!(
        redirect.header("location"),
        Some(format!("http://{leader_http}/v1/points/films/f?follow=0&hop=1").as_str())
    );
    // With the marker, it does not redirect again.
    let once = get(&stranger, "/v1/points/films/f?hop=1", &[]).await;
    assert_eq!(once.status, 404);
    // The player page is redirected the same way.
    let page = get(&stranger, "/v1/player/films/f", &[]).await;
    assert_eq!(page.status, 307);
    assert!(
        page.header("location")
            .unwrap()
            .contains("/v1/player/films/f?hop=1")
    );

    let read = consume(&mut leader.client().await, window("films/f", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(read.concat(), bytes);
    stranger.shutdown().await;
    follower.shutdown().await;
    leader.shutdown().await;
}
