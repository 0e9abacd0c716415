//! A bench cluster of child processes: primaries a, b and c (the controller's voters), their
//! followers and a balancer, started by name on 127.0.0.1 (or each in a network namespace of
//! its own, so that links can be cut), each seeded with those before it; stopped, killed,
//! paused or restarted on its data by name. `bench failover` and `bench transfer` stand on it.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use goutube::client::Client;
use goutube::netns::Namespaces;

use super::failover::group_of;
use super::{Server, connect};

/// A set of bench nodes by name, started one after the other (each seeded with those before).
pub(super) struct Fleet {
    dir: tempfile::TempDir,
    nodes: Vec<(String, Server, String)>,
    /// Each node in a network namespace of its own (links can be cut); `None`: 127.0.0.1.
    namespaces: Option<Namespaces>,
}

impl Fleet {
    pub(super) fn new() -> anyhow::Result<Fleet> {
        Ok(Fleet {
            dir: tempfile::tempdir()?,
            nodes: Vec::new(),
            namespaces: None,
        })
    }

    /// A fleet whose nodes each run in a network namespace of their own (needs root).
    pub(super) fn partitionable() -> anyhow::Result<Fleet> {
        Ok(Fleet {
            namespaces: Some(Namespaces::new("gtf", [198, 18])?),
            ..Fleet::new()?
        })
    }

    /// Starts node `name` with `settings` (and the others' gossip addresses as seeds).
    pub(super) fn start(&mut self, name: &str, settings: &str) -> anyhow::Result<()> {
        let settings_with_seeds = format!(
            "seed_addresses = [{}]\n{settings}\n[cluster]\nbootstrap_expect = 3\n",
            seeds(self.nodes.iter().map(|(_, server, _)| server))
        );
        let (ip, namespace) = match &mut self.namespaces {
            Some(namespaces) => {
                let ip = namespaces.add(name)?;
                (ip.to_string(), Some(namespaces.namespace(name)))
            }
            None => ("127.0.0.1".to_owned(), None),
        };
        let server = Server::node_at(
            self.dir.path(),
            name,
            &ip,
            namespace.as_deref(),
            &settings_with_seeds,
        )?;
        self.nodes
            .push((name.to_owned(), server, settings.to_owned()));
        Ok(())
    }

    /// Starts primary `name`, a voter if it is a, b or c, acknowledging once a follower has a
    /// write (`ack = { replicas = 1 }`).
    pub(super) fn primary(&mut self, name: &str) -> anyhow::Result<()> {
        self.start(
            name,
            "role = \"leader\"\n[controller]\nvoters = [\"a\", \"b\", \"c\"]\n\
             [replication]\nack = { replicas = 1 }",
        )
    }

    /// Starts follower `name` of primary `leader`.
    pub(super) fn follower(&mut self, name: &str, leader: &str) -> anyhow::Result<()> {
        let replication = self.server(leader)?.replication.clone();
        self.start(
            name,
            &format!("role = \"follower\"\nleader_addresses = [{replication:?}]"),
        )
    }

    /// Starts balancer lb, and waits until every node sees it live: a node honours the
    /// subject a balancer forwards a call for only from a balancer it knows.
    pub(super) async fn balancer(&mut self) -> anyhow::Result<()> {
        self.start(
            "lb",
            "role = \"balancer\"\n[controller]\nvoters = [\"a\", \"b\", \"c\"]",
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, server, _) in &self.nodes {
            let client = connect(&server.rpc).await?;
            loop {
                let members = client.members().await?;
                if members.members.iter().any(|m| m.name == "lb" && m.live) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} never saw the balancer live");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    /// The server `name`.
    pub(super) fn server(&self, name: &str) -> anyhow::Result<&Server> {
        let found = self.nodes.iter().find(|(n, _, _)| n == name);
        Ok(&found.context("a node of the bench")?.1)
    }

    /// A client of `name`.
    pub(super) async fn client(&self, name: &str) -> anyhow::Result<Client> {
        connect(&self.server(name)?.rpc).await
    }

    /// Stops `name` gracefully and starts it again on its data, with the same settings.
    pub(super) fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let at = self.nodes.iter().position(|(n, _, _)| n == name);
        let (name, server, settings) = self.nodes.remove(at.context("a node of the bench")?);
        server.stop()?;
        self.start(&name, &settings)
    }

    /// Kills `name` (SIGKILL).
    pub(super) fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let at = self.nodes.iter().position(|(n, _, _)| n == name);
        let (_, server, _) = self.nodes.remove(at.context("a node of the bench")?);
        Ok(server.process.kill()?)
    }

    /// Kills `name` (SIGKILL) and starts it again at once on its data (a stop that was not
    /// clean), with the same settings.
    pub(super) fn kill_and_restart(&mut self, name: &str) -> anyhow::Result<()> {
        let at = self.nodes.iter().position(|(n, _, _)| n == name);
        let (name, server, settings) = self.nodes.remove(at.context("a node of the bench")?);
        server.process.kill()?;
        self.start(&name, &settings)
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`) to `name`.
    pub(super) fn signal(&self, name: &str, signal: libc::c_int) -> anyhow::Result<()> {
        Ok(self.server(name)?.process.signal(signal)?)
    }

    /// Drops every packet between `name` and each of `others` (a partitionable fleet).
    pub(super) fn cut(&self, name: &str, others: &[&str]) -> anyhow::Result<()> {
        let namespaces = self.namespaces.as_ref().context("a partitionable fleet")?;
        Ok(namespaces.cut(name, others)?)
    }

    /// Ends a [`cut`](Self::cut).
    pub(super) fn heal(&self, name: &str, others: &[&str]) -> anyhow::Result<()> {
        let namespaces = self.namespaces.as_ref().context("a partitionable fleet")?;
        Ok(namespaces.heal(name, others)?)
    }

    /// Stops every node gracefully.
    pub(super) fn stop(self) -> anyhow::Result<()> {
        // The voters last: a group leader stopping hands its group over first.
        let (voters, others): (Vec<_>, Vec<_>) = self
            .nodes
            .into_iter()
            .partition(|(name, _, _)| ["a", "b", "c"].contains(&name.as_str()));
        for (_, server, _) in others.into_iter().chain(voters) {
            server.stop()?;
        }
        Ok(())
    }

    /// Waits until `member` is in the in-sync set of `slot`'s group, as b sees it.
    pub(super) async fn in_sync(&self, slot: &str, member: &str) -> anyhow::Result<()> {
        let b = self.client("b").await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let group = group_of(&b, slot).await;
            if group.is_some_and(|g| g.in_sync.iter().any(|m| m == member)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{member} never entered the in-sync set of {slot}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The gossip addresses of `servers`, as TOML list items.
fn seeds<'a>(servers: impl IntoIterator<Item = &'a Server>) -> String {
    let seeds: Vec<String> = servers
        .into_iter()
        .map(|s| format!("{:?}", s.gossip))
        .collect();
    seeds.join(", ")
}
