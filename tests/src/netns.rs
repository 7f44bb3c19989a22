//! Network namespaces joined by a bridge, so that one broker of a group can be cut off
//! from the others and from its clients (and joined again) on one machine. Needs root
//! and iproute2 (`ip netns`, veth pairs, a bridge); CI runs as root.
//!
//! ```text
//!  root namespace (the test, its clients): bridge 10.199.K.1
//!     ├── veth ── namespace 1: 10.199.K.11
//!     ├── veth ── namespace 2: 10.199.K.12
//!     └── veth ── namespace 3: 10.199.K.13
//! ```

use std::process::Command;

/// The namespaces; removed (with the bridge and veths) when dropped.
pub struct Net {
    tag: String,
    subnet: String,
    size: usize,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?} (iproute2 is needed): {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed (network namespaces need root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Net {
    /// Creates `size` namespaces on one bridge.
    ///
    /// # Panics
    /// Not root, or iproute2 missing: the test cannot run here.
    pub fn create(size: usize) -> Self {
        let pid = std::process::id();
        let net = Self {
            tag: format!("tx{}", pid % 100_000),
            subnet: format!("10.199.{}", pid % 250),
            size,
        };
        net.remove();
        let bridge = net.bridge();
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("{}.1/24", net.subnet),
            "dev",
            &bridge,
        ]);
        ip(&["link", "set", &bridge, "up"]);
        for i in 0..size {
            let ns = net.ns(i);
            let veth = net.veth(i);
            ip(&["netns", "add", &ns]);
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]);
            ip(&["link", "set", &veth, "master", &bridge, "up"]);
            let addr = format!("{}/24", net.addr(i));
            ip(&[
                "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", "eth0",
            ]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", "eth0", "up"]);
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"]);
        }
        net
    }

    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.tag)
    }

    /// Namespace `i`'s name.
    pub fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }

    /// Namespace `i`'s address.
    pub fn addr(&self, i: usize) -> String {
        format!("{}.{}", self.subnet, 11 + i)
    }

    /// Cuts namespace `i` off from everything (its link to the bridge goes down).
    pub fn cut(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "down"]);
    }

    /// Joins namespace `i` again.
    pub fn heal(&self, i: usize) {
        ip(&["link", "set", &self.veth(i), "up"]);
    }

    /// A command run inside namespace `i`.
    pub fn command(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(i), program]);
        c
    }

    fn remove(&self) {
        for i in 0..self.size {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(i)])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(i)])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .output();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.remove();
    }
}
