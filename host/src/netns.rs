//! Network namespaces for the partition tests and the rate-limited benchmarks: each member (a
//! node run as a child process) gets a namespace of its own, joined to the caller's by a veth
//! pair and routed through it (`net.ipv4.ip_forward`), so that the caller reaches every member
//! while a link can be cut ([`Namespaces::cut`]: a blackhole route in each namespace, so that
//! packets are dropped and connections stall rather than reset, as when a link fails) or
//! limited ([`Namespaces::shape`]: `tc tbf`). Needs root and iproute2; everything made is removed
//! when the [`Namespaces`] is dropped, and forwarding is set back.
//!
//! Member `i` (in the order added, from 0) of a set made on network `[x, y]` has the address
//! `x.y.i.2`; the caller's end of its link is `x.y.i.1`.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

const FORWARDING: &str = "/proc/sys/net/ipv4/ip_forward";

/// Why a namespace, a link or a route could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip` (or `tc`) could not be run.
    #[error("running {program}: {source} (network namespaces need iproute2)")]
    Spawn {
        /// The program.
        program: String,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// Forwarding could not be read or turned on.
    #[error("{what} net.ipv4.ip_forward: {source} (network namespaces need root)")]
    Forwarding {
        /// Reading or writing.
        what: &'static str,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
}

/// The namespaces of one test's or benchmark's members.
pub struct Namespaces {
    /// Names the namespaces (`<tag>-<i>`) and the two ends of each link (`<tag>h<i>`,
    /// `<tag>n<i>`: at most 15 characters, so a tag of at most 10).
    tag: String,
    network: [u8; 2],
    members: Vec<String>,
    forwarding_was: String,
}

impl Namespaces {
    /// An empty set, its namespaces named after `tag`, its addresses in `network` (`x.y`), with
    /// forwarding turned on.
    pub fn new(tag: &str, network: [u8; 2]) -> Result<Namespaces, NetnsError> {
        let forwarding_was =
            std::fs::read_to_string(FORWARDING).map_err(|source| NetnsError::Forwarding {
                what: "reading",
                source,
            })?;
        std::fs::write(FORWARDING, "1\n").map_err(|source| NetnsError::Forwarding {
            what: "turning on",
            source,
        })?;
        Ok(Namespaces {
            tag: tag.to_owned(),
            network,
            members: Vec::new(),
            forwarding_was,
        })
    }

    /// The namespace of `member`, made with its link on first use (a leftover of an interrupted
    /// run with the same name is removed first); its address.
    pub fn add(&mut self, member: &str) -> Result<Ipv4Addr, NetnsError> {
        if let Some(index) = self.index(member) {
            return Ok(self.address_of(index));
        }
        let index = self.members.len();
        let (namespace, host, inside) = (
            self.namespace_of(index),
            self.host_end(index),
            self.inside_end(index),
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &namespace])
            .stderr(Stdio::null())
            .status();
        run(&["ip", "netns", "add", &namespace])?;
        self.members.push(member.to_owned());
        let [x, y] = self.network;
        run(&[
            "ip", "link", "add", &host, "type", "veth", "peer", "name", &inside,
        ])?;
        run(&["ip", "link", "set", &inside, "netns", &namespace])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{x}.{y}.{index}.1/24"),
            "dev",
            &host,
        ])?;
        run(&["ip", "link", "set", &host, "up"])?;
        let address = self.address_of(index);
        let within = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &namespace];
            all.extend_from_slice(args);
            run(&all)
        };
        within(&[
            "ip",
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &inside,
        ])?;
        within(&["ip", "link", "set", &inside, "up"])?;
        within(&["ip", "link", "set", "lo", "up"])?;
        within(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("{x}.{y}.{index}.1"),
        ])?;
        Ok(address)
    }

    /// The address of `member` (added before).
    pub fn address(&self, member: &str) -> Ipv4Addr {
        self.address_of(self.expect(member))
    }

    /// The name of `member`'s namespace (added before).
    pub fn namespace(&self, member: &str) -> String {
        self.namespace_of(self.expect(member))
    }

    /// A command that runs `program` in `member`'s namespace (added before).
    pub fn command(&self, member: &str, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.namespace(member)])
            .arg(program);
        command
    }

    /// Drops every packet between `member` and each of `others`, both ways.
    pub fn cut(&self, member: &str, others: &[&str]) -> Result<(), NetnsError> {
        self.blackholes("add", member, others)
    }

    /// Ends a [`cut`](Self::cut).
    pub fn heal(&self, member: &str, others: &[&str]) -> Result<(), NetnsError> {
        self.blackholes("del", member, others)
    }

    /// Limits what `member` sends to `rate_mbit` Mbit/s (a token bucket on its end's egress).
    pub fn shape(&self, member: &str, rate_mbit: u64) -> Result<(), NetnsError> {
        let (namespace, inside) = self.inside(member);
        let rate = format!("{rate_mbit}mbit");
        run(&[
            "ip", "netns", "exec", &namespace, "tc", "qdisc", "replace", "dev", &inside, "root",
            "tbf", "rate", &rate, "burst", "256kb", "latency", "100ms",
        ])
    }

    /// Ends a [`shape`](Self::shape).
    pub fn unshape(&self, member: &str) -> Result<(), NetnsError> {
        let (namespace, inside) = self.inside(member);
        run(&[
            "ip", "netns", "exec", &namespace, "tc", "qdisc", "del", "dev", &inside, "root",
        ])
    }

    fn blackholes(&self, change: &str, member: &str, others: &[&str]) -> Result<(), NetnsError> {
        let [x, y] = self.network;
        for other in others {
            for (from, to) in [(member, *other), (*other, member)] {
                let subnet = format!("{x}.{y}.{}.0/24", self.expect(to));
                let namespace = self.namespace(from);
                run(&[
                    "ip",
                    "netns",
                    "exec",
                    &namespace,
                    "ip",
                    "route",
                    change,
                    "blackhole",
                    &subnet,
                ])?;
            }
        }
        Ok(())
    }

    fn index(&self, member: &str) -> Option<usize> {
        self.members.iter().position(|m| m == member)
    }

    fn expect(&self, member: &str) -> usize {
        self.index(member)
            .unwrap_or_else(|| panic!("{member} has no namespace: add it first"))
    }

    fn inside(&self, member: &str) -> (String, String) {
        let index = self.expect(member);
        (self.namespace_of(index), self.inside_end(index))
    }

    fn address_of(&self, index: usize) -> Ipv4Addr {
        let [x, y] = self.network;
        let i = u8::try_from(index).expect("at most 256 members");
        Ipv4Addr::new(x, y, i, 2)
    }

    fn namespace_of(&self, index: usize) -> String {
        format!("{}-{index}", self.tag)
    }

    fn host_end(&self, index: usize) -> String {
        format!("{}h{index}", self.tag)
    }

    fn inside_end(&self, index: usize) -> String {
        format!("{}n{index}", self.tag)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        // A namespace takes its end of the veth pair with it, and the pair goes with that end.
        for index in 0..self.members.len() {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.namespace_of(index)])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::write(FORWARDING, &self.forwarding_was);
    }
}

/// Runs `args[0]` with the rest; fails with what it printed.
fn run(args: &[&str]) -> Result<(), NetnsError> {
    let output = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|source| NetnsError::Spawn {
            program: args[0].to_owned(),
            source,
        })?;
    if !output.status.success() {
        return Err(NetnsError::Failed {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}
