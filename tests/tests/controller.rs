//! The controller, a Raft group of voters on real nodes: a standalone node is its own voter and
//! keeps its decisions across a restart; three voters (child processes, mTLS) elect a leader,
//! decide through any of them, survive a `kill -9` of the leader, and stop deciding without a
//! quorum, with a clear status, until a voter returns; only voters of the same controller speak
//! its Raft; an operator replaces a lost voter (`goutube members voters`) and recovers from a
//! quorum lost for good (`goutube controller recover`).

use std::collections::BTreeMap;
use std::time::Instant;

use goutube::cluster::ring::RingMember;
use goutube::cluster::{Lifecycle, Role};
use goutube::controller::{Applied, Command, ProposeError, Rejected, Topology};
use goutube::proto::ListMembersResponse;
use goutube::proto::controller::controller_client::ControllerClient;
use goutube::proto::controller::{ProposeRequest, RaftMessage, StatusRequest, StatusResponse};
use goutube_tests::{
    DEADLINE, NodeProcess, Pki, TestNode, append_at, consume, data, eventually, goutube_bin,
    owner_through, produce, window, write_node_config,
};
use tempfile::TempDir;
use tonic::Code;
use tonic::transport::Channel;

fn record(role: Role) -> RingMember {
    RingMember {
        lifecycle: Lifecycle::Joining,
        role,
        rpc_addr: "127.0.0.1:1".into(),
        replication_addr: "127.0.0.1:2".into(),
        virtual_nodes: 64,
        tags: BTreeMap::new(),
        version: 0,
    }
}

fn form(names: &[&str]) -> Command {
    Command::Form {
        founders: names
            .iter()
            .map(|name| ((*name).to_owned(), record(Role::Leader)))
            .collect(),
    }
}

fn join(name: &str) -> Command {
    Command::Join {
        name: name.into(),
        record: record(Role::Leader),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_node_is_its_own_controller_and_keeps_its_decisions() {
    let node = TestNode::start(|c| c.node_name = "solo".into()).await;
    let controller = node
        .node
        .controller()
        .expect("a standalone node is a voter")
        .clone();
    eventually("the lone voter to lead", || {
        let controller = controller.clone();
        async move { controller.status().leader.as_deref() == Some("solo") }
    })
    .await;
    // The node imports the ring it formed at start: the controller decides it from then on,
    // and the node uses the committed ring.
    eventually("the ring to be committed", || {
        let controller = controller.clone();
        async move {
            let topology = controller.topology().borrow().clone();
            topology
                .ring
                .members
                .get("solo")
                .is_some_and(|m| m.lifecycle == Lifecycle::Active)
        }
    })
    .await;
    let formed = controller.topology().borrow().ring_epoch;
    assert!(formed > 0);
    // The membership adopts each committed ring (the node may commit its addresses right after
    // the import, so wait for the two to agree rather than compare one instant).
    eventually("the node to use the committed ring", || {
        let (membership, topology) = (node.node.membership(), controller.topology());
        async move { membership.borrow().ring == topology.borrow().ring }
    })
    .await;
    // A rule of the state machine refuses, typed, and the state stays.
    let refused = controller.propose(form(&["other"])).await;
    assert!(
        matches!(refused, Err(ProposeError::Refused(Rejected::Formed))),
        "{refused:?}"
    );
    let Applied::Changed { epoch: joined } = controller.propose(join("j")).await.unwrap() else {
        panic!("a join changes the state");
    };
    assert!(joined > formed);
    let before: Topology = (*controller.topology().borrow().clone()).clone();

    // The log and the vote are on disk: a restarted node holds the same decisions, and what it
    // decides next has a higher epoch.
    // (Its ports change at the restart, so it commits its new addresses too: compare what
    // the decisions were about, not the addresses.)
    let node = node.restart(|c| c.node_name = "solo".into()).await;
    let controller = node.node.controller().unwrap().clone();
    let decided = |topology: &Topology| {
        let lifecycles: Vec<(String, Lifecycle)> = topology
            .ring
            .members
            .iter()
            .map(|(name, member)| (name.clone(), member.lifecycle))
            .collect();
        (
            topology.ring.id.clone(),
            lifecycles,
            topology.groups.clone(),
        )
    };
    eventually("the decisions to be applied again", || {
        let now = controller.topology().borrow().clone();
        let same = now.applied >= before.applied && decided(&now) == decided(&before);
        async move { same }
    })
    .await;
    assert!(before.ring.members.contains_key("j"), "the join decided");
    let Applied::Changed { epoch } = controller.propose(join("k")).await.unwrap() else {
        panic!("a join changes the state");
    };
    assert!(epoch > joined, "{epoch} after {joined}");
    node.shutdown().await;
}

/// Three voters as child processes, each a leader with mTLS and a sealed gossip.
struct Voters {
    root: TempDir,
    pki: Pki,
    nodes: BTreeMap<&'static str, NodeProcess>,
}

impl Voters {
    fn new() -> Voters {
        Voters {
            root: tempfile::tempdir().unwrap(),
            pki: Pki::new(),
            nodes: BTreeMap::new(),
        }
    }

    /// Voters a, b and c, once they agree on a leader; and the leader.
    async fn three() -> (Voters, String) {
        let mut voters = Voters::new();
        for name in ["a", "b", "c"] {
            voters.spawn(name);
        }
        let leader = voters.agreed_leader(&["a", "b", "c"]).await;
        (voters, leader)
    }

    /// Stops every node running, gracefully.
    fn stop(self) {
        for (name, node) in self.nodes {
            assert!(node.terminate(), "{name}: a graceful stop");
        }
    }

    /// Starts (or restarts, on its data) primary `name`, seeded with the nodes running: a
    /// voter if it is a, b or c.
    fn spawn(&mut self, name: &'static str) {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let running: Vec<String> = self
            .nodes
            .values()
            .map(|node| format!("\"{}\"", node.addresses.gossip))
            .collect();
        let seeds = format!("seed_addresses = [{}]\n", running.join(", "));
        let config = write_node_config(
            &dir,
            name,
            &format!(
                "role = \"leader\"\n{seeds}[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
                 propose_timeout_ms = 3000\n{}bootstrap_expect = 3\n",
                self.pki.node_toml(name)
            ),
        );
        self.nodes.insert(name, NodeProcess::spawn(&config));
    }

    async fn members(&self, name: &str) -> ListMembersResponse {
        self.operator(name).await.members().await.unwrap()
    }

    /// An operator's client (`root`) of node `name`.
    async fn operator(&self, name: &str) -> goutube::client::Client {
        let options = self.pki.client_options("root", &self.nodes[name].rpc);
        goutube::client::Client::connect(&options).await.unwrap()
    }

    /// The voters `name` reports in `goutube members`.
    async fn voters_seen(&self, name: &str) -> Vec<String> {
        let members = self.members(name).await;
        members.controller.map(|c| c.voters).unwrap_or_default()
    }

    async fn client(&self, name: &str, subject: &str) -> ControllerClient<Channel> {
        let options = self.pki.client_options(subject, &self.nodes[name].rpc);
        ControllerClient::new(goutube::client::channel(&options).await.unwrap())
    }

    async fn status(&self, name: &str) -> Option<StatusResponse> {
        let mut client = self.client(name, "root").await;
        Some(client.status(StatusRequest {}).await.ok()?.into_inner())
    }

    /// The leader every running voter in `among` names, once they all name the same one.
    async fn agreed_leader(&self, among: &[&str]) -> String {
        let agreed = std::sync::Mutex::new(String::new());
        eventually("the voters to agree on a leader", || {
            let agreed = &agreed;
            async move {
                let mut leaders = Vec::new();
                for name in among {
                    match self.status(name).await {
                        Some(status) if !status.leader.is_empty() => leaders.push(status.leader),
                        _ => return false,
                    }
                }
                leaders.dedup();
                let leader = leaders.pop().unwrap_or_default();
                let one = leaders.is_empty() && among.contains(&leader.as_str());
                *agreed.lock().unwrap() = leader;
                one
            }
        })
        .await;
        agreed.into_inner().unwrap()
    }

    /// Proposes `command` through voter `name` as member `node:name`.
    async fn propose(&self, name: &str, command: &Command) -> Result<Applied, tonic::Status> {
        let mut client = self.client(name, &format!("node:{name}")).await;
        let request = ProposeRequest {
            command: serde_json::to_vec(command).unwrap().into(),
        };
        let answer = client.propose(request).await?.into_inner();
        let outcome: Result<Applied, Rejected> = serde_json::from_slice(&answer.outcome).unwrap();
        Ok(outcome.expect("the command is allowed"))
    }

    async fn topology(&self, name: &str) -> Option<Topology> {
        let status = self.status(name).await?;
        Some(serde_json::from_slice(&status.topology).unwrap())
    }

    /// The topology of voter `name` once it holds the ring the voters formed, all three active
    /// (imported by the controller from their gossip formation).
    async fn formed(&self, name: &str) -> Topology {
        eventually("the formed ring to be committed", || async move {
            self.topology(name).await.is_some_and(|t| {
                t.ring.owners().map(|(n, _)| n.as_str()).collect::<Vec<_>>() == ["a", "b", "c"]
            })
        })
        .await;
        self.topology(name).await.unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_voters_decide_through_any_of_them_and_survive_a_kill_of_the_leader() {
    let (mut voters, leader) = Voters::three().await;
    let other = ["a", "b", "c"].into_iter().find(|n| *n != leader).unwrap();
    let formed = voters.formed(other).await.ring_epoch;
    // Through a voter that does not lead: forwarded to the leader.
    let Applied::Changed { epoch: decided } = voters.propose(other, &join("x")).await.unwrap()
    else {
        panic!("a join changes the state");
    };
    assert!(decided > formed);
    let term = voters.status(other).await.unwrap().term;

    // kill -9 the leader: the two others elect another and go on deciding.
    let killed = Instant::now();
    voters.nodes.remove(leader.as_str()).unwrap().kill();
    let survivors: Vec<&str> = ["a", "b", "c"]
        .into_iter()
        .filter(|n| *n != leader)
        .collect();
    let next = voters.agreed_leader(&survivors).await;
    eprintln!(
        "a new controller leader ({next}) {:?} after the kill",
        killed.elapsed()
    );
    assert!(voters.status(&next).await.unwrap().term > term);
    let Applied::Changed { epoch } = voters.propose(survivors[0], &join("d")).await.unwrap() else {
        panic!("a join changes the state");
    };
    assert!(epoch > decided);

    // The killed voter returns and holds the same decisions.
    let leader: &'static str = ["a", "b", "c"].into_iter().find(|n| *n == leader).unwrap();
    voters.spawn(leader);
    // (It proposes its new addresses as it returns: compare with the leader's state now.)
    eventually("the returning voter to catch up", || {
        let voters = &voters;
        let next = next.clone();
        async move {
            let (Some(there), Some(here)) =
                (voters.topology(&next).await, voters.topology(leader).await)
            else {
                return false;
            };
            here.ring == there.ring
                && here.groups == there.groups
                && here.ring.members.contains_key("d")
        }
    })
    .await;
    voters.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_decisions_wait_with_a_clear_status_until_a_voter_returns() {
    let (mut voters, _) = Voters::three().await;
    voters.formed("a").await;
    // A point a owns, written before the voters go.
    let mut client = voters.pki.client("root", &voters.nodes["a"].rpc).await;
    let mut point = String::new();
    for i in 0.. {
        point = format!("settled/{i}");
        if owner_through(client.clone(), &point).await == "a" {
            break;
        }
    }
    let first = data(23, 70_001);
    produce(&mut client, &point, std::slice::from_ref(&first))
        .await
        .unwrap();

    voters.nodes.remove("b").unwrap().kill();
    voters.nodes.remove("c").unwrap().kill();
    let asked = Instant::now();
    let status = voters.propose("a", &join("x")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no controller quorum"),
        "{}",
        status.message()
    );
    assert!(asked.elapsed() < DEADLINE);
    // An operator sees why: no controller leader.
    eventually("members to say there is no controller leader", || async {
        let members = voters.members("a").await;
        members
            .controller
            .is_some_and(|c| c.leader.is_empty() && c.voters == ["a", "b", "c"])
    })
    .await;
    // A primary that arrives meanwhile waits to join: nothing decides it.
    voters.spawn("d");
    // Reads and writes on the settled ring go on.
    let more = data(24, 30_011);
    append_at(&mut client, &point, first.len() as u64, &more)
        .await
        .unwrap();
    let held = consume(&mut client, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(
        held == [first, more].concat(),
        "the point is what was written"
    );
    assert!(
        !voters
            .members("a")
            .await
            .members
            .iter()
            .any(|m| m.name == "d" && m.in_ring),
        "no join is decided without a quorum"
    );
    let written = held.len() as u64;

    // a restarts (killed) while there is still no quorum: it holds the rings it stopped with,
    // which may be stale (it may have been forgotten meanwhile), so it takes no write until it
    // has heard the controller. It still serves what it holds.
    voters.nodes.remove("a").unwrap().kill();
    voters.spawn("a");
    let mut client = voters.pki.client("root", &voters.nodes["a"].rpc).await;
    let refused = append_at(&mut client, &point, written, b"not yet")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("has had no session with the controller since it started"),
        "{refused:?}"
    );
    let read = consume(&mut client, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(read == held, "a serves what it holds");

    // One voter back: a quorum again, and what waited is decided (the entry that timed out
    // may be the one committed: the retry then changes nothing).
    voters.spawn("b");
    // a heard the controller: it takes writes again, where the point ended.
    eventually("a to take writes once it heard the controller", || {
        let mut client = client.clone();
        let point = point.clone();
        async move {
            append_at(&mut client, &point, written, b"heard")
                .await
                .is_ok()
        }
    })
    .await;
    let read = consume(&mut client, window(&point, 0, 0, 0))
        .await
        .unwrap()
        .concat();
    assert!(
        read == [&held[..], b"heard"].concat(),
        "a holds the point and the write it took"
    );
    eventually("a decision once a quorum is back", || {
        let voters = &voters;
        async move { voters.propose("a", &join("x")).await.is_ok() }
    })
    .await;
    eventually("the waiting primary to be joining", || async {
        voters
            .members("a")
            .await
            .members
            .iter()
            .any(|m| m.name == "d" && m.in_ring && m.state == "joining")
    })
    .await;
    let decided = voters.topology("a").await.unwrap();
    assert_eq!(decided.ring.members["x"].lifecycle, Lifecycle::Joining);
    voters.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_voters_of_this_controller_speak_its_raft() {
    let pki = Pki::new();
    let tls = pki.node("solo");
    let key = pki.cluster_key();
    let node = TestNode::start(move |c| {
        c.node_name = "solo".into();
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
    })
    .await;
    let addr = node.addr();
    let raft = |subject: &str, from: &str, cluster: &str, voters: &[&str]| {
        let options = pki.client_options(subject, &addr);
        let message = RaftMessage {
            kind: "vote".into(),
            from: from.into(),
            body: b"{}".to_vec().into(),
            cluster: cluster.into(),
            voters: voters.iter().map(|v| v.to_string()).collect(),
        };
        async move {
            let channel = goutube::client::channel(&options).await.unwrap();
            ControllerClient::new(channel)
                .raft(message)
                .await
                .unwrap_err()
        }
    };
    let cluster = node.node.config().cluster.name.clone();
    // Until its controller started (just after the node answers), every message is refused
    // as Unavailable.
    eventually("solo's controller to start", || async {
        raft("root", "solo", &cluster, &["solo"]).await.code() != Code::Unavailable
    })
    .await;
    let cases = [
        // A client certificate cannot speak for a voter.
        (
            "root",
            "solo",
            cluster.as_str(),
            &["solo"][..],
            Code::PermissionDenied,
        ),
        // A node certificate speaks for its own node only.
        (
            "node:other",
            "solo",
            &cluster,
            &["solo"],
            Code::PermissionDenied,
        ),
        // Another cluster's controller.
        (
            "node:solo",
            "solo",
            "elsewhere",
            &["solo"],
            Code::FailedPrecondition,
        ),
        // A node that names other voters.
        (
            "node:solo",
            "solo",
            &cluster,
            &["solo", "x", "y"],
            Code::FailedPrecondition,
        ),
        // Not a voter of this controller.
        ("node:z", "z", &cluster, &["solo"], Code::PermissionDenied),
    ];
    for (subject, from, cluster, voters, code) in cases {
        let status = raft(subject, from, cluster, voters).await;
        assert_eq!(status.code(), code, "{subject} as {from}: {status:?}");
    }
    let named = raft("node:solo", "solo", &cluster, &["solo", "x", "y"]).await;
    assert!(
        named.message().contains("controller.voters differ"),
        "{}",
        named.message()
    );
    // A proposal needs a node certificate.
    let mut client = ControllerClient::new(
        goutube::client::channel(&pki.client_options("root", &addr))
            .await
            .unwrap(),
    );
    let refused = client
        .propose(ProposeRequest {
            command: serde_json::to_vec(&join("x")).unwrap().into(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    node.shutdown().await;
}

/// The status code of a client error.
fn code_of(error: goutube::client::ClientError) -> (Code, String) {
    match error {
        goutube::client::ClientError::Status(status) => (status.code(), status.message().into()),
        other => panic!("{other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_replaces_a_lost_voter_and_the_new_one_counts_in_the_quorum() {
    let (mut voters, _) = Voters::three().await;
    voters.formed("a").await;
    // d, a fourth primary: joins the ring (the voters stay a, b and c).
    voters.spawn("d");
    eventually("d to be active", || async {
        let members = voters.members("a").await;
        members
            .members
            .iter()
            .any(|m| m.name == "d" && m.state == "active")
    })
    .await;
    assert_eq!(voters.voters_seen("d").await, ["a", "b", "c"]);

    // c is lost for good. Whichever of a and b leads the controller judges the lists below
    // by what it sees: both see c down first.
    voters.nodes.remove("c").unwrap().kill();
    for name in ["a", "b"] {
        eventually(&format!("{name} to see c down"), || async {
            let members = voters.members(name).await;
            members.members.iter().any(|m| m.name == "c" && !m.live)
        })
        .await;
    }
    let operator = voters.operator("a").await;
    let wanted = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    // Lists the rules refuse, naming why.
    for (list, says) in [
        (&["a", "b"][..], "2 voters"),
        (&["a", "b", "nobody"], "nobody is not an active primary"),
        (&["a", "b", "c"], "c is not live"),
    ] {
        let (code, message) = code_of(operator.set_voters(&wanted(list)).await.unwrap_err());
        assert_eq!(code, Code::FailedPrecondition, "{list:?}: {message}");
        assert!(message.contains(says), "{list:?}: {message}");
    }
    // d replaces c: it catches the log up, then the new set is committed.
    let now = operator
        .set_voters(&wanted(&["a", "b", "d"]))
        .await
        .unwrap();
    assert_eq!(now, ["a", "b", "d"]);
    for name in ["a", "b", "d"] {
        eventually("every member to report the new voters", || async {
            voters.voters_seen(name).await == ["a", "b", "d"]
        })
        .await;
    }

    // b goes too: a and d are a quorum of the new voters, and decide.
    voters.nodes.remove("b").unwrap().kill();
    let leader = voters.agreed_leader(&["a", "d"]).await;
    assert!(["a", "d"].contains(&leader.as_str()), "{leader}");
    eventually("a decision by a and d", || {
        let voters = &voters;
        async move { voters.propose("d", &join("x")).await.is_ok() }
    })
    .await;
    let decided = voters.topology("a").await.unwrap();
    assert_eq!(decided.ring.members["x"].lifecycle, Lifecycle::Joining);
    voters.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_lost_for_good_is_recovered_by_an_operator_on_a_surviving_voter() {
    let (mut voters, _) = Voters::three().await;
    let before = voters.formed("a").await;
    voters.propose("a", &join("x")).await.unwrap();

    // b and c are lost for good; a is stopped for the recovery.
    voters.nodes.remove("b").unwrap().kill();
    voters.nodes.remove("c").unwrap().kill();
    assert!(voters.nodes.remove("a").unwrap().terminate());
    let config = voters.root.path().join("a").join("node.toml");
    let recover = |yes: bool| {
        let mut command = std::process::Command::new(goutube_bin());
        command
            .args(["controller", "recover", "--config"])
            .arg(&config);
        if yes {
            command.arg("--yes");
        }
        command.output().unwrap()
    };
    // Loudly warned, and nothing done without --yes.
    let refused = recover(false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(
        stderr.contains("WARNING") && stderr.contains("LOST") && stderr.contains("--yes"),
        "{stderr}"
    );
    let recovered = recover(true);
    let stdout = String::from_utf8_lossy(&recovered.stdout);
    assert!(
        recovered.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&recovered.stderr)
    );
    assert!(
        stdout.contains("a: the controller's only voter now (was: a,b,c)"),
        "{stdout}"
    );

    // Started again, a leads alone with every decision it held, and decides again.
    voters.spawn("a");
    assert_eq!(voters.agreed_leader(&["a"]).await, "a");
    assert_eq!(voters.voters_seen("a").await, ["a"]);
    let kept = voters.topology("a").await.unwrap();
    assert!(kept.ring.members.contains_key("x"), "the join it held");
    assert!(kept.applied > before.applied);
    let Applied::Changed { epoch } = voters.propose("a", &join("y")).await.unwrap() else {
        panic!("a join changes the state");
    };
    assert!(epoch > kept.ring_epoch, "epochs only grow");
    voters.stop();
}
