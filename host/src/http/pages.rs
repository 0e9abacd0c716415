//! Pages for people, served on the gateway's port beside the bytes: the points page
//! (`/v1/pages/points`: search by prefix; each point's size, type, age, holder, replicas and
//! their lag; a link to its player), the cluster page (`/v1/pages/cluster`: members, lifecycle,
//! share of the ring, the controller, groups and their leaders and in-sync followers; it
//! refreshes itself) and the player (`/v1/player/{id}`: the point fitted to the window, its
//! facts beside it).
//!
//! The pages keep nothing of their own. They ask the node's own gRPC service ([`Catalog`]) as
//! the viewer, so a page shows what the viewer's `goutube ls`, `stat` and `members` would: the
//! same authorization, and on a balancer the cluster's view. The viewer is the gateway's: the
//! client certificate's subject, or a signed URL's (`goutube url --pages`), whose signature the
//! pages carry on in their links. Plain HTML and CSS, no script: one request per page, and the
//! cluster page refreshes with `<meta http-equiv="refresh">`.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tonic::Status;

use crate::net::PeerInfo;
use crate::placement::PlacementError;
use crate::proto::{
    self, ListMembersRequest, ListMembersResponse, ListPointsRequest, ListPointsResponse,
    MetadataRequest, MetadataResponse,
};
use crate::signed_url::{Grant, UrlSigner, encode_path, encode_query};

/// The points page's path.
pub(crate) const POINTS: &str = "/v1/pages/points";
/// The cluster page's path.
pub(crate) const CLUSTER: &str = "/v1/pages/cluster";

/// Points on one page of the points page.
const PAGE_SIZE: u32 = 100;
/// `GetMetadata` calls the points page makes at once.
const LOOKUPS: usize = 16;
/// How often the cluster page reloads itself, in seconds.
const REFRESH_S: u32 = 5;
/// Ids the cluster page asks the placement plugin about to estimate each owner's share.
pub(crate) const SHARE_SAMPLES: u32 = 1024;

/// The calls the pages make, answered by the node's own gRPC service (a storage node's or a
/// balancer's) exactly as a client's call: a request carries the viewer as its peer.
#[tonic::async_trait]
pub(crate) trait Catalog: Send + Sync + 'static {
    async fn points(
        &self,
        request: tonic::Request<ListPointsRequest>,
    ) -> Result<ListPointsResponse, Status>;
    async fn metadata(
        &self,
        request: tonic::Request<MetadataRequest>,
    ) -> Result<MetadataResponse, Status>;
    async fn members(
        &self,
        request: tonic::Request<ListMembersRequest>,
    ) -> Result<ListMembersResponse, Status>;
}

#[tonic::async_trait]
impl<S: proto::streaming_server::Streaming> Catalog for S {
    async fn points(
        &self,
        request: tonic::Request<ListPointsRequest>,
    ) -> Result<ListPointsResponse, Status> {
        Ok(self.list_points(request).await?.into_inner())
    }

    async fn metadata(
        &self,
        request: tonic::Request<MetadataRequest>,
    ) -> Result<MetadataResponse, Status> {
        Ok(self.get_metadata(request).await?.into_inner())
    }

    async fn members(
        &self,
        request: tonic::Request<ListMembersRequest>,
    ) -> Result<ListMembersResponse, Status> {
        Ok(self.list_members(request).await?.into_inner())
    }
}

/// Who a page is for, and the signed URL that let them in, if one did (its links carry it on).
pub(crate) struct Viewer {
    pub peer: PeerInfo,
    pub grant: Option<Grant>,
}

impl Viewer {
    /// `message` as a call of this viewer's.
    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.extensions_mut().insert(self.peer.clone());
        request
    }

    /// `target` (a page's path, with or without a query) for this viewer: with the signed URL's
    /// fields when one let them in, so that the next page lets them in too.
    fn link(&self, target: &str) -> String {
        let Some(grant) = &self.grant else {
            return target.to_owned();
        };
        let separator = if target.contains('?') { '&' } else { '?' };
        format!(
            "{target}{separator}expires={}&subject={}&sig={}",
            grant.expires,
            encode_query(&grant.subject),
            grant.sig
        )
    }

    /// Where the player of `point` is for this viewer: signed for the same subject until the
    /// same time when the viewer came by a signed URL.
    fn player_link(&self, signer: &UrlSigner, point: &str) -> String {
        let plain = format!("/v1/player/{}", encode_path(point));
        let Some(grant) = &self.grant else {
            return plain;
        };
        let left = grant.expires.saturating_sub(unix_now().as_secs());
        signer
            .sign(point, &grant.subject, Duration::from_secs(left), true)
            .map(|signed| signed.url)
            .unwrap_or(plain)
    }
}

/// A page that could not be made: the status of the call that failed, as HTTP.
pub(crate) fn failed(status: &Status) -> Response {
    let code = match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = format!(
        "<p class=\"error\" id=\"error\">{}: {}</p>",
        escape(&format!("{:?}", status.code())),
        escape(status.message())
    );
    let mut response = html("goutube", None, None, &body);
    *response.status_mut() = code;
    response
}

/// The points page: the ids under `prefix` after `after`, each with its facts.
pub(crate) async fn points(
    catalog: &dyn Catalog,
    signer: &UrlSigner,
    viewer: &Viewer,
    prefix: &str,
    after: &str,
) -> Response {
    let listed = catalog
        .points(viewer.request(ListPointsRequest {
            prefix: prefix.to_owned(),
            start_after: after.to_owned(),
            max_results: PAGE_SIZE,
        }))
        .await;
    let listed = match listed {
        Ok(listed) => listed,
        Err(status) => return failed(&status),
    };
    let facts: Vec<(String, Result<MetadataResponse, Status>)> =
        futures::stream::iter(listed.points.clone())
            .map(|id| {
                let request = viewer.request(MetadataRequest { point: id.clone() });
                async move { (id, catalog.metadata(request).await) }
            })
            .buffered(LOOKUPS)
            .collect()
            .await;
    let now = unix_now();
    let rows: String = facts
        .iter()
        .map(|(id, facts)| point_row(id, facts, &viewer.player_link(signer, id), now))
        .collect();
    let next = if listed.next.is_empty() {
        String::new()
    } else {
        let href = viewer.link(&format!(
            "{POINTS}?prefix={}&after={}",
            encode_query(prefix),
            encode_query(&listed.next)
        ));
        format!(
            "<p><a id=\"next\" href=\"{}\">next page →</a></p>",
            escape(&href)
        )
    };
    let summary = if listed.points.is_empty() {
        format!("No point starts with “{}”.", escape(prefix))
    } else {
        format!(
            "{} point(s){}{}.",
            listed.points.len(),
            if prefix.is_empty() {
                String::new()
            } else {
                format!(" starting with “{}”", escape(prefix))
            },
            if after.is_empty() {
                String::new()
            } else {
                format!(" after “{}”", escape(after))
            }
        )
    };
    let body = format!(
        "{}\n<p id=\"summary\">{summary}</p>\n\
         <table id=\"points\"><thead><tr><th>point</th><th>size</th><th>type</th>\
         <th>last write</th><th>held by</th><th>replicas (lag)</th></tr></thead>\n\
         <tbody>\n{rows}</tbody></table>\n{next}",
        search_form(viewer, prefix),
    );
    html("Points", None, Some(viewer), &body)
}

/// The points page's search: a prefix, and a signed viewer's signature in hidden fields.
fn search_form(viewer: &Viewer, prefix: &str) -> String {
    let hidden = match &viewer.grant {
        Some(grant) => format!(
            "<input type=\"hidden\" name=\"expires\" value=\"{}\">\
             <input type=\"hidden\" name=\"subject\" value=\"{}\">\
             <input type=\"hidden\" name=\"sig\" value=\"{}\">",
            grant.expires,
            escape(&grant.subject),
            escape(&grant.sig)
        ),
        None => String::new(),
    };
    format!(
        "<form method=\"get\" action=\"{POINTS}\">\
         <input id=\"prefix\" name=\"prefix\" placeholder=\"prefix, e.g. videos/\" value=\"{}\">\
         {hidden}<button type=\"submit\">search</button></form>",
        escape(prefix)
    )
}

/// A row of the points page: the point's facts, or why they could not be had.
fn point_row(
    id: &str,
    facts: &Result<MetadataResponse, Status>,
    player: &str,
    now: Duration,
) -> String {
    let name = format!(
        "<td class=\"id\"><a href=\"{}\">{}</a></td>",
        escape(player),
        escape(id)
    );
    match facts {
        Ok(meta) => format!(
            "<tr data-point=\"{point}\" data-size=\"{size}\">{name}\
             <td class=\"size\" title=\"{size} bytes\">{}</td>\
             <td class=\"type\">{}</td><td class=\"age\">{}</td>\
             <td class=\"holder\">{}</td><td class=\"replicas\">{}</td></tr>\n",
            bytes(meta.size),
            escape(&meta.content_type),
            meta.modified_ms
                .map(|ms| ago(now, ms))
                .unwrap_or_else(|| "—".into()),
            escape(&meta.node),
            replicas(&meta.replicas),
            point = escape(id),
            size = meta.size,
        ),
        Err(status) => format!(
            "<tr data-point=\"{}\">{name}<td colspan=\"5\" class=\"error\">{}</td></tr>\n",
            escape(id),
            escape(status.message())
        ),
    }
}

/// The cluster page: members, the ring's shares, the controller and the groups, as this node
/// sees them.
pub(crate) async fn cluster(
    catalog: &dyn Catalog,
    viewer: &Viewer,
    shares: Result<BTreeMap<String, f64>, PlacementError>,
) -> Response {
    let members = match catalog.members(viewer.request(ListMembersRequest {})).await {
        Ok(members) => members,
        Err(status) => return failed(&status),
    };
    // Before the ring is formed nobody has a share (the page says the ring is not formed); a
    // placement plugin that fails is said.
    let (shares, unknown) = match shares {
        Ok(shares) => (shares, String::new()),
        Err(PlacementError::NotFormed) => (BTreeMap::new(), String::new()),
        Err(error) => (
            BTreeMap::new(),
            format!(
                "<p class=\"error\">The shares of the ring are unknown: {}</p>\n",
                escape(&error.to_string())
            ),
        ),
    };
    let rows: String = members
        .members
        .iter()
        .map(|member| member_row(member, &shares))
        .collect();
    let controller = match &members.controller {
        None => "<p id=\"controller\">The controller is not known to this node yet.</p>".into(),
        Some(controller) => controller_section(controller),
    };
    let conflict = if members.conflict.is_empty() {
        String::new()
    } else {
        format!("<p class=\"error\">{}</p>", escape(&members.conflict))
    };
    let body = format!(
        "<p id=\"seen\">As <b>{}</b> sees it: ring {}, view {}. Refreshes every {REFRESH_S} s.</p>\n\
         {conflict}{unknown}<h2>Members</h2>\n<table id=\"members\"><thead><tr><th>member</th><th>role</th>\
         <th>state</th><th>live</th><th>share of the ring</th><th>follows</th><th>address</th>\
         <th>moving</th></tr></thead>\n<tbody>\n{rows}</tbody></table>\n{controller}",
        escape(&members.node),
        if members.ring.is_empty() {
            "not formed".into()
        } else {
            escape(&members.ring)
        },
        escape(&members.view),
    );
    html("Cluster", Some(REFRESH_S), Some(viewer), &body)
}

/// A row of the members table.
fn member_row(member: &proto::MemberInfo, shares: &BTreeMap<String, f64>) -> String {
    let share = shares
        .get(&member.name)
        .map(|share| format!("{:.1} %", share * 100.0))
        .unwrap_or_else(|| "—".into());
    let pages = if member.http_addr.is_empty() {
        String::new()
    } else {
        format!(
            " <a href=\"//{}{CLUSTER}\">pages</a>",
            escape(&member.http_addr)
        )
    };
    format!(
        "<tr data-member=\"{name}\" data-state=\"{state}\" data-live=\"{live}\">\
         <td class=\"name\">{name}</td><td class=\"role\">{}</td>\
         <td class=\"state\">{state}</td><td class=\"live {live_class}\">{}</td>\
         <td class=\"share\">{share}</td><td class=\"leader\">{}</td>\
         <td class=\"addr\">{}{pages}</td><td class=\"moving\">{}</td></tr>\n",
        escape(&member.role),
        if member.live { "up" } else { "down" },
        escape(&member.leader),
        escape(&member.rpc_addr),
        member.moving,
        name = escape(&member.name),
        state = escape(&member.state),
        live = member.live,
        live_class = if member.live { "up" } else { "down" },
    )
}

/// The controller's line and the groups' table.
fn controller_section(controller: &proto::ControllerInfo) -> String {
    let mut groups = String::new();
    for group in &controller.groups {
        let followers: Vec<String> = group
            .followers
            .iter()
            .map(|follower| {
                let in_sync = group.in_sync.contains(follower);
                format!(
                    "<span class=\"follower {}\" data-follower=\"{}\">{} ({})</span>",
                    if in_sync { "in-sync" } else { "behind" },
                    escape(follower),
                    escape(follower),
                    if in_sync { "in sync" } else { "catching up" }
                )
            })
            .collect();
        groups.push_str(&format!(
            "<tr data-slot=\"{slot}\" data-leader=\"{leader}\"><td class=\"slot\">{slot}</td>\
             <td class=\"leader\">{leader}{}</td><td>{}</td><td class=\"followers\">{}</td>\
             <td class=\"failover\">{}</td></tr>\n",
            if group.leader_unclean {
                " (unclean: takes no writes)"
            } else {
                ""
            },
            group.leader_epoch,
            if followers.is_empty() {
                "none".into()
            } else {
                followers.join(", ")
            },
            escape(&group.failover),
            slot = escape(&group.slot),
            leader = escape(&group.leader),
        ));
    }
    format!(
        "<p id=\"controller\">Controller: leader <b>{}</b>, voters {}, term {}, ring epoch {}.</p>\n\
         <h2>Groups</h2>\n<table id=\"groups\"><thead><tr><th>slot</th><th>leader</th>\
         <th>leader epoch</th><th>followers</th><th>failover</th></tr></thead>\n\
         <tbody>\n{groups}</tbody></table>\n",
        if controller.leader.is_empty() {
            "none (no quorum)".into()
        } else {
            escape(&controller.leader)
        },
        escape(&controller.voters.join(", ")),
        controller.term,
        controller.ring_epoch,
    )
}

/// What the player page shows of a point.
pub(crate) struct Playing<'a> {
    pub id: &'a str,
    /// The point's bytes, with the request's query (a signed URL's fields).
    pub source: String,
    pub content_type: &'a str,
    pub size: u64,
    pub crc32c: u32,
}

/// The player page: the point in a `<video>` or `<audio>` element that fits the window, with
/// its facts and links in a bar above it.
pub(crate) fn player(playing: &Playing<'_>) -> Response {
    let source = escape(&playing.source);
    let content_type = playing.content_type;
    let element = if content_type.starts_with("audio/") {
        format!("<audio id=\"player\" controls autoplay src=\"{source}\"></audio>")
    } else if content_type.starts_with("video/") || content_type == "application/ogg" {
        format!(
            "<video id=\"player\" controls autoplay muted playsinline src=\"{source}\"></video>"
        )
    } else {
        format!("<p><a id=\"player\" href=\"{source}\">download</a></p>")
    };
    let body = format!(
        "<dl id=\"facts\"><dt>type</dt><dd id=\"type\">{}</dd><dt>size</dt>\
         <dd id=\"size\" title=\"{size} bytes\">{size} bytes</dd><dt>crc32c</dt>\
         <dd id=\"crc32c\">{:08x}</dd><dd><a href=\"{source}\" download>download</a></dd></dl>\n\
         <div id=\"stage\">{element}</div>\n",
        escape(content_type),
        playing.crc32c,
        size = playing.size,
    );
    let mut response = html(playing.id, None, None, &body);
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        "no-cache".parse().expect("a header value"),
    );
    response
}

/// The links at the top of a page, for `viewer`; none on the player (whose signed URL opens
/// only its point) and on error pages.
fn nav(viewer: Option<&Viewer>) -> String {
    match viewer {
        None => String::new(),
        Some(viewer) => format!(
            "<nav><a id=\"to-points\" href=\"{}\">points</a> \
             <a id=\"to-cluster\" href=\"{}\">cluster</a></nav>",
            escape(&viewer.link(POINTS)),
            escape(&viewer.link(CLUSTER))
        ),
    }
}

/// Every page's frame: the player's stage takes the height the bar leaves, so the video and
/// its controls fit the window at any size.
const STYLE: &str = "\
*{box-sizing:border-box}\
html,body{height:100%;margin:0}\
body{display:flex;flex-direction:column;font:14px/1.4 system-ui,sans-serif;color:#222}\
header{display:flex;flex-wrap:wrap;gap:.3em 1.5em;align-items:baseline;padding:.5em 1em;\
background:#f3f3f3;border-bottom:1px solid #ddd}\
header h1{font-size:1.1em;margin:0;overflow-wrap:anywhere}\
nav a{margin-right:1em}\
main{flex:1;min-height:0;overflow:auto;padding:0 1em 1em}\
table{border-collapse:collapse;margin:.5em 0}\
th,td{text-align:left;padding:.25em .8em .25em 0;border-bottom:1px solid #eee;vertical-align:top}\
td.size,td.share{text-align:right}\
.down,.behind,.error{color:#b00}.up,.in-sync{color:#070}\
form{margin:.8em 0}input{width:20em}\
#facts{display:flex;flex-wrap:wrap;gap:0 .6em;margin:.4em 0}#facts dt{font-weight:bold}\
#facts dd{margin:0 1em 0 0}\
main:has(#stage){display:flex;flex-direction:column;padding-bottom:0}\
#stage{flex:1;min-height:0;display:flex;align-items:center;justify-content:center;\
background:#000;margin:0 -1em}\
#stage video{width:100%;height:100%;object-fit:contain}\
#stage audio{width:90%}#stage p a{color:#fff}";

/// A page: the shared frame around `body`.
fn html(title: &str, refresh: Option<u32>, viewer: Option<&Viewer>, body: &str) -> Response {
    let title = escape(title);
    let refresh = refresh
        .map(|s| format!("<meta http-equiv=\"refresh\" content=\"{s}\">\n"))
        .unwrap_or_default();
    let page = format!(
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n{refresh}\
         <title>{title} — goutube</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <header><h1>{title}</h1>{}</header>\n<main>\n{body}</main>\n</body>\n</html>\n",
        nav(viewer)
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

/// A follower's progress on a point: its name and how far behind it is.
fn replicas(replicas: &[proto::ReplicaProgress]) -> String {
    if replicas.is_empty() {
        return "—".into();
    }
    replicas
        .iter()
        .map(|replica| {
            format!(
                "<span class=\"replica {}\" data-follower=\"{}\" data-lag=\"{}\">{} ({})</span>",
                if replica.connected { "up" } else { "down" },
                escape(&replica.follower),
                replica.lag,
                escape(&replica.follower),
                bytes(replica.lag)
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `n` bytes for people: `512 B`, `3.4 KiB`, `50.0 MiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// How long before `now` the time `then_ms` (Unix milliseconds) was: `12 s ago`, `5 min ago`.
fn ago(now: Duration, then_ms: u64) -> String {
    let seconds = (now.as_millis() as u64).saturating_sub(then_ms) / 1000;
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        3600..86400 => format!("{} h ago", seconds / 3600),
        _ => format!("{} d ago", seconds / 86400),
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// `text` for HTML text and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_escapes_everything_that_could_close_a_tag_or_an_attribute() {
        assert_eq!(
            escape("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }

    #[test]
    fn sizes_and_ages_read_as_people_say_them() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(50 * 1024 * 1024), "50.0 MiB");
        let now = Duration::from_secs(1_000_000);
        assert_eq!(ago(now, 999_999_000), "1 s ago");
        assert_eq!(ago(now, 1_000_000_000 - 125_000), "2 min ago");
        assert_eq!(ago(now, 1_000_000_000 - 7_300_000), "2 h ago");
        assert_eq!(ago(now, 0), "11 d ago");
        // A clock that went back is "now", not a panic.
        assert_eq!(ago(now, 2_000_000_000), "0 s ago");
    }
}
