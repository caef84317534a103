//! What is benchmarked: Steer under each policy, and the peers (Node's cluster module,
//! nginx with `reuseport`), each started as a child process on a fresh port; and the Node
//! comparison: one Node app (`bench/peers/app.js`) under Steer, under the cluster module
//! and under PM2 (installed from npm, pinned, into a directory of the bench's own, and run
//! with a private `PM2_HOME`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

/// How long a server gets to come up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Every Steer policy, the eBPF ones first, then the kernel's and the baselines.
pub const STEER_POLICIES: [&str; 7] = [
    "kernel",
    "round-robin",
    "hash",
    "least-loaded",
    "cpu",
    "shared",
    "userspace",
];

/// The suffix of a subject with a per-client limit no client reaches.
pub const LIMITED: &str = "+limit";

/// The policies that run Steer's eBPF program.
pub const EBPF_POLICIES: [&str; 4] = ["round-robin", "hash", "least-loaded", "cpu"];

/// One thing to benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Subject {
    /// `steer run --balance <policy>` with the demo app.
    Steer {
        /// The `--balance` value.
        policy: String,
        /// With a per-client connection limit that no client reaches
        /// (`--client-conn-rate 1000000000/s`): every SYN takes the limit's path in the
        /// program, so the subject shows what the limit costs.
        #[serde(default)]
        client_limit: bool,
    },
    /// Node's cluster module (`bench/peers/node_cluster.js`).
    Node {
        /// `rr` or `none`.
        sched: String,
    },
    /// nginx, one `listen ... reuseport` socket per worker.
    Nginx,
    /// `steer run --balance <policy> -- node app.js`: the Node app on the Node helper.
    SteerNode {
        /// The `--balance` value.
        policy: String,
    },
    /// The Node app under PM2 in cluster mode (`pm2-runtime`, which forks through Node's
    /// cluster module, `SCHED_RR`).
    Pm2,
    /// Steer's demo on a `udp://` listener (besides a TCP one, unused), through the UDP
    /// scenarios.
    SteerUdp {
        /// The `--balance` value.
        policy: String,
        /// One worker on one socket (`--workers 1 --balance kernel`): one process's
        /// figures, the reference without any balancing.
        single: bool,
    },
    /// Steer's demo serving HTTP/3 on a `quic://` listener (besides a TCP one, unused),
    /// through the QUIC scenarios.
    SteerQuic {
        /// The `--balance` value.
        policy: String,
        /// One worker on one socket (`--workers 1 --balance kernel`): a single quinn
        /// process running the same HTTP/3 code, no program.
        single: bool,
    },
}

/// The PM2 release the bench installs from npm.
pub const PM2_VERSION: &str = "7.0.4";

/// The UDP subject of one process on one socket.
pub const ONE_SOCKET_UDP: &str = "udp-one-socket";

/// The QUIC subject of one process on one socket.
pub const ONE_SOCKET_QUIC: &str = "quic-one-socket";

/// The UDP subjects' `--shutdown-timeout`: a replaced worker keeps its busy flows for four
/// fifths of it (1.6 s), short enough for the roll's run to see them move forward.
const DATAGRAM_SHUTDOWN_TIMEOUT: &str = "2s";

/// The Steer subject of the Node comparison, round-robin.
pub const STEER_NODE: &str = "steer-node";

/// The Node scenarios, and what each runs.
impl Subject {
    /// The scenarios that apply to this subject. `node_comparison`: the Node app's
    /// subjects run the stall and the reloads too (`--peers`).
    pub fn scenarios(&self, node_comparison: bool) -> Vec<super::scenario::Scenario> {
        use super::scenario::Scenario::{Connect, KeepAlive, Reload, Roll, Stall};
        match self {
            Subject::Steer { .. } => vec![KeepAlive, Connect, Stall, Roll],
            // Only the stalled-worker row: what the policy does for a blocked Node worker.
            Subject::SteerNode { policy } if policy != "round-robin" => vec![Stall],
            Subject::SteerNode { .. } | Subject::Pm2 => vec![KeepAlive, Connect, Stall, Reload],
            Subject::Node { .. } if node_comparison => vec![KeepAlive, Connect, Stall, Reload],
            Subject::Node { .. } | Subject::Nginx => vec![KeepAlive, Connect],
            // Their own scenarios: `super::datagrams`.
            Subject::SteerUdp { .. } | Subject::SteerQuic { .. } => Vec::new(),
        }
    }

    /// Whether this subject runs the Node app (`bench/peers/app.js`).
    pub fn is_node_app(&self) -> bool {
        matches!(
            self,
            Subject::SteerNode { .. } | Subject::Node { .. } | Subject::Pm2
        )
    }
}

impl Subject {
    /// The name in tables and charts.
    pub fn name(&self) -> String {
        match self {
            Subject::Steer {
                policy,
                client_limit: false,
            } => policy.clone(),
            Subject::Steer {
                policy,
                client_limit: true,
            } => format!("{policy}{LIMITED}"),
            Subject::Node { sched } => format!("node-{sched}"),
            Subject::Nginx => "nginx-reuseport".into(),
            Subject::SteerNode { policy } if policy == "round-robin" => STEER_NODE.into(),
            Subject::SteerNode { policy } => format!("{STEER_NODE}-{policy}"),
            Subject::Pm2 => "pm2".into(),
            Subject::SteerUdp { single: true, .. } => ONE_SOCKET_UDP.into(),
            Subject::SteerUdp { policy, .. } => format!("udp-{policy}"),
            Subject::SteerQuic { single: true, .. } => ONE_SOCKET_QUIC.into(),
            Subject::SteerQuic { policy, .. } => format!("quic-{policy}"),
        }
    }

    /// Whether this subject runs the UDP or QUIC scenarios (`super::datagrams`).
    pub fn is_datagram(&self) -> bool {
        matches!(self, Subject::SteerUdp { .. } | Subject::SteerQuic { .. })
    }

    /// How many workers it runs when the suite asks for `workers`.
    pub fn workers(&self, workers: usize) -> usize {
        match self {
            Subject::SteerUdp { single: true, .. } | Subject::SteerQuic { single: true, .. } => 1,
            _ => workers,
        }
    }

    /// Whether Steer runs it (its `/status` tells when every worker is ready).
    pub fn is_steer(&self) -> bool {
        matches!(
            self,
            Subject::Steer { .. }
                | Subject::SteerNode { .. }
                | Subject::SteerUdp { .. }
                | Subject::SteerQuic { .. }
        )
    }
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    /// The `steer` binary (release).
    pub steer: PathBuf,
    /// `node`, if found.
    pub node: Option<PathBuf>,
    /// The Node cluster script; the Node app, `app.js`, is beside it.
    pub node_script: PathBuf,
    /// The installed `pm2` package (`.../node_modules/pm2`), for the PM2 subject.
    pub pm2: Option<PathBuf>,
    /// `nginx`, if found.
    pub nginx: Option<PathBuf>,
    /// Scratch directory (nginx prefix, logs).
    pub scratch: PathBuf,
}

impl Programs {
    /// The Node app, `app.js` beside the cluster script, as an absolute path (PM2 runs it
    /// from a directory of its own).
    pub fn node_app(&self) -> PathBuf {
        let app = self.node_script.with_file_name("app.js");
        std::path::absolute(&app).unwrap_or(app)
    }
}

/// Installs PM2 [`PM2_VERSION`] with `npm` under `dir` unless it is there already, and
/// returns the package's directory (`dir/node_modules/pm2`). Nothing outside `dir` is
/// written: the subject runs it with a `PM2_HOME` of its own.
pub fn install_pm2(dir: &Path) -> Result<PathBuf, String> {
    let package = dir.join("node_modules/pm2");
    let installed = std::fs::read_to_string(package.join("package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .is_some_and(|doc| doc["version"] == PM2_VERSION);
    if installed {
        return Ok(package);
    }
    let npm = find_program("npm").ok_or("npm is not installed (apt-get install npm)")?;
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    eprintln!(
        "bench: installing pm2@{PM2_VERSION} with npm into {}",
        dir.display()
    );
    let status = Command::new(npm)
        .arg("install")
        .arg("--prefix")
        .arg(dir)
        .args([
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--loglevel=error",
            &format!("pm2@{PM2_VERSION}"),
        ])
        .stdin(Stdio::null())
        .status()
        .map_err(|e| format!("running npm: {e}"))?;
    if !status.success() || !package.join("bin/pm2-runtime").is_file() {
        return Err(format!("npm install pm2@{PM2_VERSION}: {status}"));
    }
    Ok(package)
}

/// Finds `name` on `PATH` (and in `/usr/sbin`, where Debian puts nginx).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A running server under test.
#[derive(Debug)]
pub struct Server {
    /// What runs.
    pub subject: Subject,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Steer's `/status` address.
    pub status: Option<SocketAddr>,
    /// The `udp://` or `quic://` listener's address, for the UDP and QUIC subjects.
    pub datagram_addr: Option<SocketAddr>,
    child: Child,
    workers: usize,
    /// PM2: `node`, the package, and the private `PM2_HOME`, for `pm2 reload`.
    pm2: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// How long one reload may take before the scenario gives up on it.
pub const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

impl Server {
    /// Starts `subject` with `workers` workers on a free loopback port and waits until it
    /// serves (Steer: every slot `ready` in `/status`; peers: a `GET /` answered by each
    /// worker, or at least answered).
    pub fn start(subject: &Subject, workers: usize, programs: &Programs) -> Result<Server, String> {
        let workers = subject.workers(workers);
        let addr = free_addr()?;
        let mut status = None;
        let mut datagram_addr = None;
        let mut pm2 = None;
        let log = programs
            .scratch
            .join(format!("{}.log", subject.name()))
            .to_string_lossy()
            .into_owned();
        let mut command = match subject {
            Subject::Steer {
                policy,
                client_limit,
            } => {
                let status_addr = free_addr()?;
                status = Some(status_addr);
                let mut command = Command::new(&programs.steer);
                command.args([
                    "run",
                    "--workers",
                    &workers.to_string(),
                    "--balance",
                    policy,
                    "--listen",
                    &addr.to_string(),
                    "--status",
                    &status_addr.to_string(),
                    "--demo-faults",
                    "--shutdown-timeout",
                    "5s",
                    "-q",
                    // The default, said out loud: the subjects are measured with stall
                    // avoidance on (a no-op without the program).
                    "--avoid-stalls",
                ]);
                if *client_limit {
                    command.args([
                        "--client-conn-rate",
                        "1000000000/s",
                        "--client-conn-burst",
                        "1000000",
                    ]);
                }
                command
            }
            Subject::SteerUdp { policy, single } | Subject::SteerQuic { policy, single } => {
                let status_addr = free_addr()?;
                status = Some(status_addr);
                let udp = free_udp_addr()?;
                datagram_addr = Some(udp);
                let scheme = if matches!(subject, Subject::SteerUdp { .. }) {
                    "udp"
                } else {
                    "quic"
                };
                let mut command = Command::new(&programs.steer);
                command.args([
                    "run",
                    "--workers",
                    &workers.to_string(),
                    "--balance",
                    if *single { "kernel" } else { policy },
                    "--listen",
                    &addr.to_string(),
                    "--listen",
                    &format!("{scheme}://{udp}"),
                    "--status",
                    &status_addr.to_string(),
                    "--shutdown-timeout",
                    DATAGRAM_SHUTDOWN_TIMEOUT,
                    "-q",
                ]);
                command
            }
            Subject::Node { sched } => {
                // node_cluster.js forks app.js.
                let node = programs.node.as_ref().ok_or("node is not installed")?;
                let mut command = Command::new(node);
                command
                    .arg(&programs.node_script)
                    .env("PORT", addr.port().to_string())
                    .env("WORKERS", workers.to_string())
                    .env("SCHED", sched);
                command
            }
            Subject::SteerNode { policy } => {
                let node = programs.node.as_ref().ok_or("node is not installed")?;
                let status_addr = free_addr()?;
                status = Some(status_addr);
                let mut command = Command::new(&programs.steer);
                command
                    .args([
                        "run",
                        "--workers",
                        &workers.to_string(),
                        "--balance",
                        policy,
                        "--listen",
                        &addr.to_string(),
                        "--status",
                        &status_addr.to_string(),
                        "--shutdown-timeout",
                        "5s",
                        "-q",
                        "--",
                    ])
                    .arg(node)
                    .arg(programs.node_app());
                command
            }
            Subject::Pm2 => {
                let node = programs.node.as_ref().ok_or("node is not installed")?;
                let package = programs.pm2.as_ref().ok_or("pm2 is not installed")?;
                let dir = programs.scratch.join(format!("pm2-{}", addr.port()));
                let home = dir.join("home");
                std::fs::create_dir_all(&home)
                    .map_err(|e| format!("creating {}: {e}", home.display()))?;
                let ecosystem = dir.join("ecosystem.json");
                let config = serde_json::json!({
                    "apps": [{
                        "name": "app",
                        "script": programs.node_app(),
                        "instances": workers,
                        "exec_mode": "cluster",
                        "env": { "PORT": addr.port().to_string() },
                        // PM2's graceful reload: a new instance counts once it says
                        // `ready` (app.js does when it listens); the old one gets SIGINT
                        // and this long to finish.
                        "wait_ready": true,
                        "listen_timeout": 10000,
                        "kill_timeout": 5000,
                    }]
                });
                std::fs::write(&ecosystem, config.to_string())
                    .map_err(|e| format!("writing {}: {e}", ecosystem.display()))?;
                pm2 = Some((node.clone(), package.clone(), home.clone()));
                let mut command = Command::new(node);
                command
                    .arg(package.join("bin/pm2-runtime"))
                    .arg(&ecosystem)
                    .env("PM2_HOME", &home)
                    .current_dir(&dir);
                command
            }
            Subject::Nginx => {
                let nginx = programs.nginx.as_ref().ok_or("nginx is not installed")?;
                let prefix = programs.scratch.join("nginx");
                let conf = write_nginx_conf(&prefix, addr, workers)?;
                let mut command = Command::new(nginx);
                command
                    .arg("-p")
                    .arg(&prefix)
                    .arg("-c")
                    .arg(&conf)
                    .arg("-e")
                    .arg("stderr");
                command
            }
        };
        let output = std::fs::File::create(&log).map_err(|e| format!("creating {log}: {e}"))?;
        let errors = output
            .try_clone()
            .map_err(|e| format!("duplicating {log}: {e}"))?;
        command
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .process_group(0);
        let child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", subject.name()))?;
        let mut server = Server {
            subject: subject.clone(),
            addr,
            status,
            datagram_addr,
            child,
            workers,
            pm2,
        };
        server.wait_serving().map_err(|e| {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String = tail.lines().rev().take(15).collect::<Vec<_>>().join("\n");
            format!(
                "{}: {e}; log (last lines, newest first):\n{tail}",
                subject.name()
            )
        })?;
        Ok(server)
    }

    fn wait_serving(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(exit)) = self.child.try_wait() {
                return Err(format!("exited during start ({exit})"));
            }
            let up = match self.status {
                Some(_) => self.steer_worker_pids().is_some(),
                None => {
                    http_get(self.addr, "/").is_ok_and(|(status, _)| status == 200)
                        && (!self.subject.is_node_app() || self.worker_pids().is_some())
                }
            };
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("not serving after {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of the primary (Steer's primary, Node's primary, nginx's master).
    pub fn primary_pid(&self) -> u32 {
        self.child.id()
    }

    /// Steer only: every slot's pid when all are ready and none is rolling.
    pub fn steer_worker_pids(&self) -> Option<Vec<u64>> {
        let (status, body) = http_get(self.status?, "/status").ok()?;
        if status != 200 {
            return None;
        }
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        let workers = doc["workers"].as_array()?;
        let ready = workers.len() == self.workers
            && doc["primary"]["phase"] == "running"
            && workers.iter().all(|w| w["state"] == "ready");
        ready.then(|| workers.iter().filter_map(|w| w["pid"].as_u64()).collect())
    }

    /// Every worker's pid once there are as many as configured: Steer's ready slots, else
    /// the primary's children (Node's cluster workers, PM2's instances).
    pub fn worker_pids(&self) -> Option<Vec<u64>> {
        if self.status.is_some() {
            return self.steer_worker_pids();
        }
        let tree = super::footprint::sample(self.child.id())?;
        let root = self.child.id();
        let children: Vec<u64> = tree
            .processes
            .iter()
            .filter(|p| p.ppid == root)
            .map(|p| u64::from(p.pid))
            .collect();
        (children.len() == self.workers).then_some(children)
    }

    /// Starts a zero-downtime reload by the subject's own method: `SIGUSR2` to Steer's
    /// primary and to node_cluster.js (its rolling restart), `pm2 reload` for PM2 (which
    /// returns when PM2 says it is done). The caller watches [`Self::worker_pids`] for
    /// the end.
    pub fn reload(&self) -> Result<(), String> {
        let Some((node, package, home)) = &self.pm2 else {
            return self.signal(libc::SIGUSR2);
        };
        let mut cli = Command::new(node)
            .arg(package.join("bin/pm2"))
            .args(["reload", "app"])
            .env("PM2_HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting pm2 reload: {e}"))?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        loop {
            match cli.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("pm2 reload: {status}")),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) | Err(_) => {
                    let _ = cli.kill();
                    let _ = cli.wait();
                    return Err(format!("pm2 reload: not done after {RELOAD_TIMEOUT:?}"));
                }
            }
        }
    }

    /// Sends `signal` to the primary.
    pub fn signal(&self, signal: i32) -> Result<(), String> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(|e| e.to_string())?;
        // SAFETY: kill on our own unreaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(format!(
                "kill({pid}, {signal}): {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Graceful stop (SIGTERM), then SIGKILL to the whole process group after a few
    /// seconds; reaps the primary.
    pub fn stop(mut self) {
        let _ = self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill_group();
    }

    fn kill_group(&mut self) {
        self.end_pm2_leftovers();
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: the process group this child leads (process_group(0)); its members
            // are what we started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// PM2 only: a daemon that a `pm2` command started in the private `PM2_HOME` (it does
    /// when it finds no daemon there) is killed, and the subject's directory removed.
    fn end_pm2_leftovers(&mut self) {
        let Some((_, _, home)) = self.pm2.take() else {
            return;
        };
        let daemon = std::fs::read_to_string(home.join("pm2.pid"))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
            .filter(|&pid| pid != self.child.id());
        if let Some(pid) = daemon {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let home_text = home.to_string_lossy();
            if String::from_utf8_lossy(&cmdline).contains(home_text.as_ref())
                && let Ok(pid) = libc::pid_t::try_from(pid)
            {
                // SAFETY: kill on the PM2 daemon of this subject's own PM2_HOME (its
                // command line names it).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if let Some(dir) = home.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Makes sure nothing is left behind if a scenario panics or fails.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill_group();
        }
    }
}

/// A free port on 127.0.0.1 (bound and released; the kernel does not hand it out again
/// soon).
fn free_addr() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// A free UDP port on 127.0.0.1 (bound and released).
fn free_udp_addr() -> Result<SocketAddr, String> {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map_err(|e| format!("finding a free UDP port: {e}"))
}

/// A one-shot blocking `GET` with `Connection: close`: status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(&raw) {
        Ok(httparse::Status::Complete(head)) => Ok((
            response.code.unwrap_or(0),
            String::from_utf8_lossy(&raw[head..]).into_owned(),
        )),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "incomplete or malformed response",
        )),
    }
}

/// Writes nginx's configuration under `prefix`: `workers` workers, `listen .. reuseport`,
/// the same hello body, `X-Steer-Worker` set to the worker's pid.
fn write_nginx_conf(prefix: &Path, addr: SocketAddr, workers: usize) -> Result<PathBuf, String> {
    std::fs::create_dir_all(prefix.join("logs"))
        .map_err(|e| format!("creating {}: {e}", prefix.display()))?;
    let conf = prefix.join("nginx.conf");
    let text = format!(
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         pid {prefix}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 keepalive_requests 10000000;\n\
         \x20 keepalive_timeout 60s;\n\
         \x20 client_body_temp_path {prefix}/body;\n\
         \x20 proxy_temp_path {prefix}/proxy;\n\
         \x20 fastcgi_temp_path {prefix}/fastcgi;\n\
         \x20 uwsgi_temp_path {prefix}/uwsgi;\n\
         \x20 scgi_temp_path {prefix}/scgi;\n\
         \x20 server {{\n\
         \x20   listen {addr} reuseport backlog=4096;\n\
         \x20   location / {{\n\
         \x20     default_type \"text/plain; charset=utf-8\";\n\
         \x20     add_header X-Steer-Worker $pid;\n\
         \x20     return 200 \"hello from worker $pid\\n\";\n\
         \x20   }}\n\
         \x20 }}\n\
         }}\n",
        prefix = prefix.display()
    );
    std::fs::write(&conf, text).map_err(|e| format!("writing {}: {e}", conf.display()))?;
    Ok(conf)
}
