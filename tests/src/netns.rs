//! A network namespace of a test's own: its loopback, its sysctls, its firewall.
//!
//! [`isolated`] runs a test body on a thread of its own that has left the test process's
//! network namespace for a new one (`unshare(CLONE_NEWNET)` acts on the calling thread
//! only). Every process that thread starts (the cluster, `ip`, `nft`) lives in the new
//! namespace, and so does every socket it opens. The namespace has no name and goes away
//! with the last of them: nothing to clean up, even after a failure. Needs root.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use nix::sched::{CloneFlags, unshare};

/// Runs `body` in a new network namespace whose loopback is up, and returns what it
/// returns; a panic in `body` is the caller's panic.
///
/// # Panics
///
/// If the namespace cannot be made (not root), or `body` panics.
pub fn isolated<T: Send>(body: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            unshare(CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("unshare(CLONE_NEWNET) (needs root): {e}"));
            run("ip", &["link", "set", "lo", "up"]);
            body()
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Runs `program` with `args` to completion.
///
/// # Panics
///
/// If it cannot be started or fails; the message carries its output.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} {args:?}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes `value` to the sysctl `name` (`net.ipv6.conf.lo.disable_ipv6`) of this thread's
/// network namespace.
///
/// # Panics
///
/// If it cannot be written.
pub fn sysctl(name: &str, value: &str) {
    let path = format!("/proc/sys/{}", name.replace('.', "/"));
    std::fs::write(&path, value).unwrap_or_else(|e| panic!("writing {value} to {path}: {e}"));
}

/// Drops every TCP packet to `port` on input, in an nftables table of its own
/// (`steer_test`): what a firewall rule on the port does to a connection over `lo`.
///
/// # Panics
///
/// If `nft` is missing (`cargo xtask setup` installs it) or refuses the rules.
pub fn drop_tcp_port(port: u16) {
    run("nft", &["add", "table", "inet", "steer_test"]);
    run(
        "nft",
        &[
            "add",
            "chain",
            "inet",
            "steer_test",
            "input",
            "{ type filter hook input priority 0; policy accept; }",
        ],
    );
    let rule = format!("tcp dport {port} drop");
    run(
        "nft",
        &["add", "rule", "inet", "steer_test", "input", rule.as_str()],
    );
}

/// Removes what [`drop_tcp_port`] added.
///
/// # Panics
///
/// If `nft` fails.
pub fn allow_all() {
    run("nft", &["delete", "table", "inet", "steer_test"]);
}

/// `ip` with `port`, as a socket address.
pub fn at(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(
        ip.parse::<IpAddr>()
            .unwrap_or_else(|e| panic!("{ip} is not an IP address: {e}")),
        port,
    )
}
