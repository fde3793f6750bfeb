//! The network: one namespace per host, all on one bridge, and faults as
//! iptables rules inside the destination namespaces.
//!
//! Every namespace is named `jst-<run>-<host>`; the bridge lives in its own
//! namespace `jst-<run>-sw`, so no test address ever appears in the root
//! namespace. Addresses are 10.77.0.0/24, private to the run (a stale run's
//! namespaces are deleted first).
//!
//! A *grudge* is Jepsen's directed partition: for each host, the hosts it
//! drops traffic from. A one-way cut is an asymmetric grudge. It is installed
//! as `iptables -A INPUT -s <sender> -j DROP` in the receiving host's
//! namespace, so "A drops packets from B" means B's packets never arrive at
//! A while A's still arrive at B. TCP needs both directions (SYN and SYN-ACK,
//! data and ACKs), so a one-way grudge still breaks every TCP connection
//! between the two, whoever opened it; what stays one-way is which host
//! still hears the other's first packets (and any UDP or ICMP).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{Context as _, bail};

/// The prefix of every namespace this suite creates.
pub const PREFIX: &str = "jst-";

/// A host: a namespace with one address on the bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: String,
}

/// Hosts and their faults.
#[derive(Debug)]
pub struct Net {
    pub hosts: Vec<Host>,
    sw: String,
}

/// Directed partitions: host -> hosts it drops traffic from.
pub type Grudge = BTreeMap<String, BTreeSet<String>>;

fn sh(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Deletes every namespace of earlier runs, killing what runs in them.
pub fn clean_stale() -> anyhow::Result<usize> {
    let list = sh(&["ip", "netns", "list"])?;
    let mut n = 0;
    for line in list.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if !name.starts_with(PREFIX) {
            continue;
        }
        if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
            for pid in pids.split_whitespace() {
                let _ = sh(&["kill", "-9", pid]);
            }
        }
        let _ = sh(&["ip", "netns", "delete", name]);
        n += 1;
    }
    Ok(n)
}

/// Checks the machine can run the suite.
pub fn preflight() -> anyhow::Result<()> {
    let uid = sh(&["id", "-u"]).unwrap_or_default();
    if uid.trim() != "0" {
        bail!("the fault suite needs root (network namespaces and iptables)");
    }
    for tool in ["ip", "iptables", "redis-server"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            bail!("{tool} is missing (on Debian: apt-get install iproute2 iptables redis-server)");
        }
    }
    Ok(())
}

impl Net {
    /// Creates the bridge and one namespace per host name.
    pub fn create(run: &str, names: &[&str]) -> anyhow::Result<Self> {
        let sw = format!("{PREFIX}{run}-sw");
        sh(&["ip", "netns", "add", &sw])?;
        sh(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        sh(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let mut hosts = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{PREFIX}{run}-{name}");
            let ip = format!("10.77.0.{}", 10 + i);
            sh(&["ip", "netns", "add", &ns])?;
            // Interface names are at most 15 bytes: keep them short and
            // local to each namespace once moved.
            let (a, b) = (format!("jh{i}{}", &run[..run.len().min(6)]), format!("js{i}{}", &run[..run.len().min(6)]));
            sh(&["ip", "link", "add", &a, "type", "veth", "peer", "name", &b])?;
            sh(&["ip", "link", "set", &a, "netns", &ns])?;
            sh(&["ip", "link", "set", &b, "netns", &sw])?;
            sh(&["ip", "-n", &sw, "link", "set", &b, "master", "br0"])?;
            sh(&["ip", "-n", &sw, "link", "set", &b, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", &a, "name", "eth0"])?;
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            sh(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            hosts.push(Host { name: (*name).to_owned(), ns, ip });
        }
        let net = Net { hosts, sw };
        net.heal()?;
        Ok(net)
    }

    /// Moves the calling thread (and every thread it starts later) into
    /// `host`'s namespace: the harness's own traffic then crosses the test
    /// network like the clients' does.
    pub fn enter(&self, host: &str) -> anyhow::Result<()> {
        let f = std::fs::File::open(format!("/var/run/netns/{}", self.host(host).ns))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name}"))
    }

    /// A command run inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(host).ns, program]);
        c
    }

    fn iptables(&self, host: &str, args: &[&str]) -> anyhow::Result<()> {
        let ns = &self.host(host).ns;
        let mut full = vec!["ip", "netns", "exec", ns, "iptables", "-w"];
        full.extend_from_slice(args);
        sh(&full).map(|_| ())
    }

    /// Removes every fault.
    pub fn heal(&self) -> anyhow::Result<()> {
        for h in &self.hosts {
            self.iptables(&h.name, &["-F", "INPUT"])?;
        }
        Ok(())
    }

    /// Installs a grudge (replacing any fault).
    pub fn partition(&self, grudge: &Grudge) -> anyhow::Result<()> {
        self.heal()?;
        for (dst, srcs) in grudge {
            for src in srcs {
                let ip = self.host(src).ip.clone();
                self.iptables(dst, &["-A", "INPUT", "-s", &ip, "-j", "DROP"])?;
            }
        }
        Ok(())
    }

    /// Random packet loss on every host's input from the network (replacing
    /// any fault). Loopback is spared: a process talking to its own host (an
    /// agent to its heartbeat store and data Redis) crosses no link, and Jepsen's
    /// netem loss likewise sits on the node's network interface only.
    pub fn loss(&self, probability: f64) -> anyhow::Result<()> {
        self.heal()?;
        let p = format!("{probability:.3}");
        for h in &self.hosts {
            self.iptables(
                &h.name,
                &[
                    "-A",
                    "INPUT",
                    "!",
                    "-i",
                    "lo",
                    "-m",
                    "statistic",
                    "--mode",
                    "random",
                    "--probability",
                    &p,
                    "-j",
                    "DROP",
                ],
            )?;
        }
        Ok(())
    }

    /// Deletes every namespace of this run.
    pub fn destroy(&self) {
        for h in &self.hosts {
            let _ = sh(&["ip", "netns", "delete", &h.ns]);
        }
        let _ = sh(&["ip", "netns", "delete", &self.sw]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.destroy();
    }
}

/// Grudges over a set of hosts, Jepsen's vocabulary.
pub mod grudges {
    use super::*;

    /// Complete grudge: every component drops everything from the others
    /// (cut both ways between components, nothing cut inside one).
    pub fn complete(components: &[Vec<String>]) -> Grudge {
        let mut g = Grudge::new();
        for (i, comp) in components.iter().enumerate() {
            for h in comp {
                let others: BTreeSet<String> = components
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .flat_map(|(_, c)| c.iter().cloned())
                    .collect();
                g.insert(h.clone(), others);
            }
        }
        g
    }

    /// One host cut off from everyone, both ways.
    pub fn isolate(all: &[String], host: &str) -> Grudge {
        let rest: Vec<String> = all.iter().filter(|h| *h != host).cloned().collect();
        complete(&[vec![host.to_owned()], rest])
    }

    /// `to` stops hearing `from` (one-way): an INPUT drop of `from`'s
    /// packets on `to`; `to`'s packets still reach `from`.
    pub fn one_way(from: &str, to: &str) -> Grudge {
        drops_from(&[to.to_owned()], &[from.to_owned()])
    }

    /// Every host of `receivers` drops every packet from every host of
    /// `senders` (one way): INPUT drops on the receivers only, so the
    /// receivers' packets still reach the senders. "Every coordinator drops
    /// packets from the primary" is `drops_from(coordinators, [primary])`;
    /// "the primary drops packets from every coordinator" is
    /// `drops_from([primary], coordinators)`. Hosts in neither list are
    /// untouched (they reach everyone both ways).
    pub fn drops_from(receivers: &[String], senders: &[String]) -> Grudge {
        receivers
            .iter()
            .map(|r| (r.clone(), senders.iter().filter(|s| *s != r).cloned().collect::<BTreeSet<_>>()))
            .collect()
    }

    /// Every host sees a majority, no two the same majority (a ring: each
    /// host hears its neighbours within distance n/2; symmetric, so each cut
    /// is both ways).
    pub fn majorities_ring(all: &[String]) -> Grudge {
        let n = all.len();
        let reach = n / 2;
        let mut g = Grudge::new();
        for (i, h) in all.iter().enumerate() {
            let dropped: BTreeSet<String> = all
                .iter()
                .enumerate()
                .filter(|(j, _)| {
                    let d = (i + n - j) % n;
                    let d = d.min(n - d);
                    d > reach / 2 + reach % 2 && *j != i
                })
                .map(|(_, x)| x.clone())
                .collect();
            g.insert(h.clone(), dropped);
        }
        g
    }

    /// Two halves cut both ways, with one host (`bridge`) in touch with both.
    pub fn bridge(all: &[String], bridge: &str) -> Grudge {
        let rest: Vec<String> = all.iter().filter(|h| *h != bridge).cloned().collect();
        let (a, b) = rest.split_at(rest.len() / 2);
        let mut g = complete(&[a.to_vec(), b.to_vec()]);
        g.insert(bridge.to_owned(), BTreeSet::new());
        for v in g.values_mut() {
            v.remove(bridge);
        }
        g
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn hosts(n: usize) -> Vec<String> {
            (1..=n).map(|i| format!("h{i}")).collect()
        }

        #[test]
        fn isolate_cuts_both_ways() {
            let g = isolate(&hosts(3), "h1");
            assert_eq!(g["h1"], BTreeSet::from(["h2".into(), "h3".into()]));
            assert_eq!(g["h2"], BTreeSet::from(["h1".into()]));
        }

        #[test]
        fn one_way_grudges_drop_only_on_the_receivers() {
            let g = one_way("h1", "h2");
            assert_eq!(g, Grudge::from([("h2".into(), BTreeSet::from(["h1".into()]))]));
            // Coordinators drop the primary: only the coordinators get rules.
            let coords = vec!["c1".to_owned(), "c2".into(), "c3".into()];
            let g = drops_from(&coords, &["m1".into()]);
            assert_eq!(g.len(), 3);
            assert!(coords.iter().all(|c| g[c] == BTreeSet::from(["m1".into()])));
            assert!(!g.contains_key("m1"), "the primary itself still hears the coordinators");
            // The other direction: one rule set, on the primary.
            let g = drops_from(&["m1".into()], &coords);
            assert_eq!(g, Grudge::from([("m1".into(), coords.iter().cloned().collect())]));
            // A host never drops itself.
            assert!(drops_from(&hosts(2), &hosts(2)).values().all(|v| v.len() == 1));
        }

        #[test]
        fn the_ring_leaves_everyone_a_majority_but_not_the_same_one() {
            let all = hosts(5);
            let g = majorities_ring(&all);
            let mut seen = BTreeSet::new();
            for h in &all {
                let hears: BTreeSet<&String> = all.iter().filter(|x| !g[h].contains(*x)).collect();
                assert!(hears.len() >= 3, "{h} hears only {hears:?}");
                seen.insert(hears.into_iter().cloned().collect::<Vec<_>>());
            }
            assert!(seen.len() > 1, "everyone hears the same majority");
        }

        #[test]
        fn the_bridge_hears_both_halves() {
            let g = bridge(&hosts(5), "h3");
            assert!(g["h3"].is_empty());
            assert!(g["h1"].contains("h4") && !g["h1"].contains("h3"));
        }
    }
}
