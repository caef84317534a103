//! The core driven in simulation: a recording [`Io`] stands in for processes and steering
//! maps, and the test moves the clock. Every step checks the slot invariant: a slot is
//! `ready` exactly when its current worker's socket is in the (simulated) steering map.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::time::{Duration, Instant};

use super::*;

/// The host as the core sees it, recorded.
#[derive(Debug, Default)]
struct Recorder {
    next_pid: i32,
    /// Spawns so far: `(slot, generation, id)`.
    spawns: Vec<(usize, u64, WorkerId)>,
    /// Workers started as external programs (ready at once, no register).
    external: bool,
    /// The steering map: slot -> worker.
    steering: BTreeMap<usize, WorkerId>,
    alive: BTreeSet<WorkerId>,
    drained: Vec<WorkerId>,
    killed: Vec<WorkerId>,
    pings: Vec<(WorkerId, u64)>,
    shut_down: Vec<WorkerId>,
    rss: BTreeMap<WorkerId, u64>,
    fail_spawns: bool,
    /// Steering refuses every socket (a map update fails with `ENOMEM`).
    refuse_steering: bool,
    /// Every slot count steering was rebuilt for.
    resizes: Vec<usize>,
}

impl Io for Recorder {
    fn spawn(&mut self, slot: usize, generation: u64, id: WorkerId) -> Result<Spawned, SpawnError> {
        if self.fail_spawns {
            return Err(SpawnError::Start(io::Error::new(
                io::ErrorKind::NotFound,
                "no such program",
            )));
        }
        self.next_pid += 1;
        self.spawns.push((slot, generation, id));
        self.alive.insert(id);
        Ok(Spawned {
            pid: 1000 + self.next_pid,
            listening: self.external,
            registers: !self.external,
        })
    }

    fn enter_steering(&mut self, slot: usize, id: WorkerId, _: u64) -> Result<(), EnterError> {
        if self.refuse_steering {
            return Err(EnterError::Steering(crate::steering::SteeringError::Io {
                what: format!("put the socket into SOCKETS[{slot}]"),
                source: io::Error::from_raw_os_error(libc::ENOMEM),
            }));
        }
        self.steering.insert(slot, id);
        Ok(())
    }

    fn leave_steering(&mut self, slot: usize) {
        self.steering.remove(&slot);
    }

    fn drain(&mut self, id: WorkerId) {
        self.drained.push(id);
    }

    fn repeat_drain(&mut self, _: WorkerId) {}

    fn kill(&mut self, id: WorkerId) {
        self.killed.push(id);
    }

    fn ping(&mut self, id: WorkerId, seq: u64) {
        self.pings.push((id, seq));
    }

    fn shut_down_listener(&mut self, id: WorkerId) -> Result<(), ListenerError> {
        self.shut_down.push(id);
        Ok(())
    }

    fn resident_bytes(&mut self, id: WorkerId) -> Option<u64> {
        self.rss.get(&id).copied()
    }

    fn resize_steering(&mut self, slots: usize) {
        self.resizes.push(slots);
    }
}

const INTERVAL: Duration = Duration::from_millis(200);
const TIMEOUT: Duration = Duration::from_millis(600);

fn settings() -> Settings {
    Settings {
        health_interval: INTERVAL,
        health_timeout: TIMEOUT,
        start_timeout: Duration::from_secs(10),
        shutdown_timeout: Duration::from_secs(5),
        max_restarts: 10,
        restart_window: Duration::from_secs(60),
        max_memory: None,
    }
}

/// A cluster under simulation.
struct Sim {
    core: Core,
    io: Recorder,
    now: Instant,
}

impl Sim {
    fn new(slots: usize) -> Sim {
        Sim::with(slots, settings(), false)
    }

    fn with(slots: usize, settings: Settings, external: bool) -> Sim {
        let now = Instant::now();
        let mut core = Core::new(settings, slots, now);
        core.start(now);
        let io = Recorder {
            external,
            ..Recorder::default()
        };
        let mut sim = Sim { core, io, now };
        sim.tick();
        sim.exec_all();
        sim
    }

    /// Every spawned process's exec succeeds.
    fn exec_all(&mut self) {
        let spawned: Vec<(usize, u64, WorkerId)> = self.io.spawns.clone();
        for (index, _, id) in spawned {
            self.core.executed(&mut self.io, index, id, self.now);
            self.check();
        }
    }

    /// A tick at the current time, then the invariant.
    fn tick(&mut self) {
        self.core.tick(&mut self.io, self.now);
        self.check();
        self.exec_all();
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        // The loop asks when to wake before it sleeps; the core measures lateness from it.
        let _ = self.core.next_wake(self.now - by);
        self.tick();
    }

    /// Moves time in steps no longer than the loop would sleep, answering every ping of the
    /// workers in `answering` as it comes.
    fn run_for(&mut self, span: Duration, answering: &dyn Fn(WorkerId) -> bool) {
        let end = self.now + span;
        while self.now < end {
            let wake = self.core.next_wake(self.now).min(end);
            self.now = wake.max(self.now + Duration::from_millis(1));
            self.core.tick(&mut self.io, self.now);
            self.exec_all();
            self.answer(answering);
            self.check();
        }
    }

    fn answer(&mut self, answering: &dyn Fn(WorkerId) -> bool) {
        for (id, seq) in std::mem::take(&mut self.io.pings) {
            if !answering(id) {
                continue;
            }
            if let Some(index) = self.slot_of(id) {
                let _ = self
                    .core
                    .pong(&mut self.io, index, id, seq, Counters::default());
            }
        }
        self.check();
    }

    fn slot_of(&self, id: WorkerId) -> Option<usize> {
        self.core
            .slots()
            .iter()
            .position(|slot| slot.find(id).is_some())
    }

    /// Registers and readies every starting worker, declaring heartbeats.
    fn ready_all(&mut self) {
        let starting: Vec<(usize, WorkerId)> = self
            .core
            .slots()
            .iter()
            .flat_map(|slot| {
                slot.current
                    .iter()
                    .chain(slot.incoming.iter())
                    .filter(|w| matches!(w.stage(), Stage::Starting { .. }) && !w.killed)
                    .map(move |w| (slot.index, w.id))
            })
            .collect();
        for (index, id) in starting {
            if !self.io.external {
                let _ = self.core.registered(index, id);
            }
            self.core
                .ready(&mut self.io, index, id, true, self.now)
                .expect("ready");
            self.check();
        }
    }

    fn exit(&mut self, id: WorkerId, status: ExitStatus) {
        let index = self.slot_of(id).expect("a worker of the cluster");
        self.io.alive.remove(&id);
        self.core.exited(&mut self.io, index, id, status, self.now);
        self.check();
    }

    fn current(&self, index: usize) -> WorkerId {
        self.core.slots()[index]
            .current
            .as_ref()
            .expect("a current worker")
            .id
    }

    fn state(&self, index: usize) -> SlotState {
        self.core.slots()[index].state()
    }

    /// The invariant this module exists for.
    fn check(&self) {
        for slot in self.core.slots() {
            let seated = self.io.steering.get(&slot.index).copied();
            let serving = slot.current.as_ref().filter(|w| w.serving()).map(|w| w.id);
            assert_eq!(
                seated, serving,
                "slot {}: in steering {seated:?}, serving {serving:?}",
                slot.index
            );
            assert_eq!(
                slot.state() == SlotState::Ready,
                seated.is_some(),
                "slot {} is {:?} with steering {seated:?}",
                slot.index,
                slot.state()
            );
        }
    }
}

#[test]
fn workers_enter_steering_when_ready_and_are_pinged_at_once() {
    let mut sim = Sim::new(2);
    assert_eq!(sim.io.spawns.len(), 2);
    assert_eq!(sim.state(0), SlotState::Starting);
    sim.ready_all();
    assert_eq!(sim.state(0), SlotState::Ready);
    assert_eq!(sim.state(1), SlotState::Ready);
    assert_eq!(
        sim.io.pings.len(),
        2,
        "each is pinged the moment it is ready"
    );
}

#[test]
fn a_worker_that_hangs_right_after_ready_is_hung_within_interval_plus_timeout() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    let stuck = sim.current(1);
    sim.run_for(INTERVAL + TIMEOUT + Duration::from_millis(10), &|id| {
        id != stuck
    });
    assert_eq!(
        sim.state(1),
        SlotState::Hung,
        "never answered a single ping"
    );
    assert_eq!(sim.io.shut_down, [stuck], "its queue is handed over");
    assert!(!sim.io.steering.values().any(|&id| id == stuck));
    for index in [0, 2, 3] {
        assert_eq!(sim.state(index), SlotState::Ready);
    }
    assert_eq!(
        sim.io.spawns.len(),
        5,
        "a replacement started at once for the hung worker"
    );
}

#[test]
fn only_pong_is_a_sign_of_life_for_a_worker_that_declared_heartbeats() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    let stuck = sim.current(2);
    let end = sim.now + INTERVAL + TIMEOUT + Duration::from_millis(10);
    while sim.now < end {
        // Its side thread keeps talking while its loop answers nothing.
        sim.core.spoke(2, stuck);
        sim.run_for(Duration::from_millis(50), &|id| id != stuck);
    }
    assert_eq!(sim.state(2), SlotState::Hung);
}

#[test]
fn a_stall_of_the_primary_blames_no_worker() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    sim.answer(&|_| true);
    sim.run_for(Duration::from_secs(1), &|_| true);
    // The primary is stopped for 3 s: every worker answered at once, but nobody read it.
    let ping_before = sim.io.pings.len();
    let _ = sim.core.next_wake(sim.now);
    sim.now += Duration::from_secs(3);
    sim.tick();
    assert!(sim.io.pings.len() > ping_before, "a heartbeat round is due");
    for index in 0..4 {
        assert_eq!(sim.state(index), SlotState::Ready, "slot {index}");
    }
    assert_eq!(sim.core.stalls(), 1);
    sim.run_for(Duration::from_secs(2), &|_| true);
    assert_eq!(sim.io.spawns.len(), 4, "nobody was replaced");
}

#[test]
fn pongs_waiting_in_the_socket_clear_a_suspect_before_it_is_judged() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    sim.answer(&|_| true);
    // The next heartbeat round goes out and nothing is read for longer than the timeout,
    // without a stall of the loop (it was busy): the answers are there when it looks.
    sim.now += INTERVAL;
    sim.tick();
    let owed: Vec<(WorkerId, u64)> = std::mem::take(&mut sim.io.pings);
    assert_eq!(owed.len(), 4);
    sim.now += TIMEOUT + Duration::from_millis(50);
    assert_eq!(
        sim.core.suspects(sim.now).len(),
        4,
        "overdue until their answers are read"
    );
    for (id, seq) in owed {
        let index = sim.slot_of(id).expect("slot");
        sim.core
            .pong(&mut sim.io, index, id, seq, Counters::default())
            .expect("a ping it was sent");
    }
    sim.tick();
    for index in 0..4 {
        assert_eq!(sim.state(index), SlotState::Ready);
    }
}

#[test]
fn a_silent_majority_stays_in_steering_and_one_that_answers_keeps_its_place() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    let (a, b) = (sim.current(0), sim.current(1));
    sim.run_for(INTERVAL + TIMEOUT + Duration::from_millis(10), &|_| false);
    assert_eq!(sim.state(0), SlotState::Ready, "kept in steering");
    assert_eq!(sim.state(1), SlotState::Ready);
    assert_eq!(sim.io.spawns.len(), 4, "replacements are starting");
    // Slot 0 answers before its replacement is ready: the replacement is called off.
    sim.run_for(INTERVAL, &|id| id == a);
    assert_eq!(sim.current(0), a);
    assert!(sim.core.slots()[0].incoming.is_none());
    assert_eq!(sim.core.slots()[0].replacement, None);
    // Slot 1's replacement becomes ready and takes over; the silent one hands its queue.
    sim.ready_all();
    assert_ne!(sim.current(1), b);
    assert!(sim.io.shut_down.contains(&b));
    assert!(sim.io.drained.contains(&b));
}

#[test]
fn a_hung_worker_that_wakes_up_is_still_replaced() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    let stuck = sim.current(0);
    sim.run_for(INTERVAL + TIMEOUT + Duration::from_millis(10), &|id| {
        id != stuck
    });
    assert_eq!(sim.state(0), SlotState::Hung);
    sim.run_for(INTERVAL * 2, &|_| true);
    assert_eq!(
        sim.state(0),
        SlotState::Hung,
        "its listener is gone for good"
    );
    sim.ready_all();
    assert_eq!(sim.state(0), SlotState::Ready);
    assert!(sim.io.drained.contains(&stuck), "it drains what it has");
}

#[test]
fn a_worker_violating_the_protocol_at_every_start_backs_off_and_fails() {
    let settings = Settings {
        max_restarts: 5,
        ..settings()
    };
    let mut sim = Sim::with(2, settings, true);
    let mut violated = BTreeSet::new();
    let end = sim.now + Duration::from_secs(10);
    while sim.now < end && !sim.core.slots()[0].failed {
        let fresh: Vec<WorkerId> = sim.core.slots()[0]
            .workers()
            .filter(|w| !w.killed && !violated.contains(&w.id))
            .map(|w| w.id)
            .collect();
        for id in fresh {
            violated.insert(id);
            sim.core.violation(&mut sim.io, 0, id, "garbage", sim.now);
            sim.check();
        }
        // Replaced workers drain and exit; killed ones exit.
        let leaving: Vec<WorkerId> = sim
            .io
            .drained
            .drain(..)
            .chain(sim.io.killed.drain(..))
            .collect();
        for id in leaving {
            if sim.io.alive.contains(&id) {
                sim.exit(id, ExitStatus::Code(0));
            }
        }
        sim.advance(Duration::from_millis(20));
    }
    let slot = &sim.core.slots()[0];
    assert!(
        slot.failed,
        "failed after max-restarts ({} starts)",
        violated.len()
    );
    assert_eq!(slot.restarts, 5);
    assert!(
        violated.len() <= 12,
        "backed off: {} starts",
        violated.len()
    );
    assert_eq!(
        sim.state(1),
        SlotState::Ready,
        "the other slot is untouched"
    );
}

#[test]
fn a_stop_during_a_roll_ignores_the_incoming_workers_registration() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    sim.core.begin_roll("test");
    sim.tick();
    let incoming = sim.core.slots()[0]
        .incoming
        .as_ref()
        .expect("the roll starts in the same turn")
        .id;
    sim.core.stop(&mut sim.io, sim.now);
    sim.check();
    assert_eq!(
        sim.core.registered(0, incoming),
        Ok(Registration::Ignored),
        "no violation for a worker told to drain while it started"
    );
    assert!(
        sim.core
            .ready(&mut sim.io, 0, incoming, true, sim.now)
            .is_ok()
    );
    assert!(
        sim.io.steering.is_empty(),
        "nobody is in steering while stopping"
    );
    let everyone: Vec<WorkerId> = sim.io.alive.iter().copied().collect();
    for id in everyone {
        sim.exit(id, ExitStatus::Code(0));
    }
    assert!(sim.core.finished());
}

#[test]
fn a_roll_replaces_each_slot_in_turn_and_starts_at_once() {
    let mut sim = Sim::new(3);
    sim.ready_all();
    let before: Vec<WorkerId> = (0..3).map(|i| sim.current(i)).collect();
    sim.core.begin_roll("SIGUSR2");
    sim.tick();
    assert_eq!(
        sim.io.spawns.len(),
        4,
        "the first replacement starts in the same turn"
    );
    for _ in 0..3 {
        sim.ready_all();
        sim.tick();
    }
    assert!(!sim.core.rolling());
    for (index, old) in before.iter().enumerate() {
        assert_ne!(sim.current(index), *old);
        assert!(sim.io.drained.contains(old));
    }
}

#[test]
fn an_exit_of_unknown_status_is_a_crash_and_the_slot_restarts() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    let gone = sim.current(0);
    sim.exit(gone, ExitStatus::Unknown);
    assert_eq!(sim.state(0), SlotState::Backoff);
    sim.advance(BACKOFF);
    assert_eq!(sim.state(0), SlotState::Starting);
    assert_eq!(sim.core.slots()[0].restarts, 1);
}

const BACKOFF: Duration = Duration::from_millis(100);

#[test]
fn a_spawn_that_fails_is_backed_off_like_a_crash() {
    let mut sim = Sim::new(1);
    sim.io.fail_spawns = true;
    sim.exit(sim.current(0), ExitStatus::Code(1));
    sim.advance(BACKOFF);
    assert_eq!(
        sim.state(0),
        SlotState::Backoff,
        "the spawn failed; try again later"
    );
    assert_eq!(sim.core.slots()[0].restarts, 2);
    assert_eq!(
        sim.core.slots()[0].last_start_failure.as_deref(),
        Some("cannot be started: no such program"),
        "the host's error is described once, whole"
    );
}

#[test]
fn a_worker_whose_socket_steering_refuses_is_killed_and_never_ready() {
    let mut sim = Sim::new(1);
    sim.io.refuse_steering = true;
    let refused = sim.current(0);
    sim.ready_all();
    assert_ne!(sim.state(0), SlotState::Ready, "ready means in steering");
    assert!(sim.io.steering.is_empty());
    assert!(
        sim.io.killed.contains(&refused),
        "serving nothing, it is replaced"
    );
    sim.io.refuse_steering = false;
    sim.exit(refused, ExitStatus::Signal(libc::SIGKILL));
    sim.advance(BACKOFF);
    sim.ready_all();
    assert_eq!(sim.state(0), SlotState::Ready, "a fresh worker gets in");
}

#[test]
fn memory_over_the_limit_replaces_a_worker_gracefully() {
    let settings = Settings {
        max_memory: Some(100),
        ..settings()
    };
    let mut sim = Sim::with(1, settings, false);
    sim.ready_all();
    let fat = sim.current(0);
    sim.io.rss.insert(fat, 200);
    sim.run_for(INTERVAL, &|_| true);
    assert_eq!(
        sim.state(0),
        SlotState::Ready,
        "it serves until its replacement is ready"
    );
    assert!(sim.core.slots()[0].incoming.is_some());
    sim.ready_all();
    assert!(sim.io.drained.contains(&fat));
}

#[test]
fn counters_saturate() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    for (index, id) in [(0, sim.current(0)), (1, sim.current(1))] {
        let seq = sim
            .io
            .pings
            .iter()
            .find(|(p, _)| *p == id)
            .expect("pinged")
            .1;
        let counters = Counters {
            accepted: u64::MAX,
            active: 0,
            requests: u64::MAX,
        };
        sim.core
            .pong(&mut sim.io, index, id, seq, counters)
            .expect("pong");
    }
    sim.exit(sim.current(0), ExitStatus::Code(1));
    assert_eq!(sim.core.slots()[0].accepted(), u64::MAX);
    assert_eq!(sim.core.slots()[1].accepted(), u64::MAX);
}

#[test]
fn an_external_workers_replacement_waits_for_its_ready_once_the_slot_has_said_it() {
    let mut sim = Sim::with(1, settings(), true);
    let first = sim.current(0);
    assert_eq!(
        sim.state(0),
        SlotState::Ready,
        "ready once its exec succeeded"
    );
    sim.core
        .ready(&mut sim.io, 0, first, false, sim.now)
        .expect("ready");
    sim.core.begin_roll("SIGUSR2");
    sim.tick();
    let incoming = sim.core.slots()[0]
        .incoming
        .as_ref()
        .expect("replacement")
        .id;
    assert_eq!(
        sim.current(0),
        first,
        "the old one serves while the new one boots"
    );
    assert!(sim.io.drained.is_empty());
    sim.core
        .ready(&mut sim.io, 0, incoming, false, sim.now)
        .expect("ready");
    sim.check();
    assert_eq!(sim.current(0), incoming);
    assert_eq!(sim.io.drained, [first]);
}

#[test]
fn growing_starts_the_new_slots_and_steering_grows_once_they_serve() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    let before = (sim.current(0), sim.current(1));
    sim.core.resize(&mut sim.io, 4, sim.now, "SIGHUP");
    sim.tick();
    assert_eq!(sim.io.spawns.len(), 4, "two new slots start at once");
    assert!(sim.io.resizes.is_empty(), "steering waits for them");
    sim.ready_all();
    sim.tick();
    assert_eq!(sim.io.resizes, [4]);
    assert_eq!(
        (sim.current(0), sim.current(1)),
        before,
        "the others are untouched"
    );
    for index in 0..4 {
        assert_eq!(sim.state(index), SlotState::Ready);
    }
}

#[test]
fn shrinking_drains_the_highest_slots_and_steering_shrinks_at_once() {
    let mut sim = Sim::new(4);
    sim.ready_all();
    let kept: Vec<WorkerId> = (0..3).map(|i| sim.current(i)).collect();
    let removed = sim.current(3);
    sim.core.resize(&mut sim.io, 3, sim.now, "SIGTTOU");
    sim.check();
    assert_eq!(sim.io.resizes, [3]);
    assert!(!sim.io.steering.contains_key(&3), "out of steering at once");
    assert_eq!(sim.io.drained, [removed]);
    assert_eq!(sim.state(3), SlotState::Draining);
    sim.exit(removed, ExitStatus::Code(0));
    sim.tick();
    assert_eq!(sim.core.slots().len(), 3, "the slot is gone once drained");
    assert_eq!((0..3).map(|i| sim.current(i)).collect::<Vec<_>>(), kept);
    assert_eq!(sim.core.slots()[0].restarts, 0);
    // A roll covers the slots that remain.
    sim.core.begin_roll("SIGUSR2");
    for _ in 0..4 {
        sim.tick();
        sim.ready_all();
    }
    assert!(!sim.core.rolling());
    assert_eq!(sim.io.spawns.len(), 4 + 3);
}

#[test]
fn a_slot_removed_and_added_again_serves_while_its_old_worker_drains() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    let old = sim.current(1);
    sim.core.resize(&mut sim.io, 1, sim.now, "SIGTTOU");
    sim.core.resize(&mut sim.io, 2, sim.now, "SIGTTIN");
    sim.tick();
    sim.ready_all();
    sim.tick();
    assert_eq!(sim.state(1), SlotState::Ready);
    assert_ne!(sim.current(1), old);
    assert!(sim.core.slots()[1].retiring.iter().any(|w| w.id == old));
    assert_eq!(sim.io.resizes, [1, 2]);
}

/// Random events against the invariant: whatever order workers register, become ready,
/// answer, break the protocol, exit, and whatever operators send, a slot is `ready`
/// exactly when its socket is in steering, and a stopped cluster finishes.
#[test]
fn the_steering_invariant_holds_under_random_events() {
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    for round in 0..300 {
        let slots = 1 + next(4) as usize;
        let mut sim = Sim::with(slots, settings(), round % 3 == 0);
        for _ in 0..150 {
            let workers: Vec<(usize, WorkerId)> = sim
                .core
                .slots()
                .iter()
                .flat_map(|s| s.workers().map(move |w| (s.index, w.id)))
                .collect();
            let pick = (!workers.is_empty()).then(|| workers[next(workers.len() as u64) as usize]);
            match (next(12), pick) {
                (0, Some((index, id))) => {
                    let _ = sim.core.registered(index, id);
                }
                (1 | 2, Some((index, id))) => {
                    if let Err(what) = sim
                        .core
                        .ready(&mut sim.io, index, id, next(2) == 0, sim.now)
                    {
                        sim.core.violation(&mut sim.io, index, id, &what, sim.now);
                    }
                }
                (3, Some((_, id))) if sim.io.alive.contains(&id) => {
                    let status = [
                        ExitStatus::Code(0),
                        ExitStatus::Signal(9),
                        ExitStatus::Unknown,
                    ][next(3) as usize];
                    sim.exit(id, status);
                }
                (4, Some((index, id))) => sim.core.violation(&mut sim.io, index, id, "x", sim.now),
                (5, _) => sim.core.begin_roll("random"),
                (6, _) if next(8) == 0 => sim.core.stop(&mut sim.io, sim.now),
                (7, _) => {
                    let answering = next(2) == 0;
                    sim.answer(&move |_| answering);
                }
                (8, _) => sim.core.reload(settings(), sim.now),
                (9, _) => {
                    let to = 1 + next(5) as usize;
                    sim.core.resize(&mut sim.io, to, sim.now, "random");
                }
                _ => {}
            }
            sim.check();
            // Killed and drained processes eventually exit.
            if next(3) == 0 {
                let leaving: Vec<WorkerId> = sim.io.killed.drain(..).collect();
                for id in leaving {
                    if sim.io.alive.contains(&id) {
                        sim.exit(id, ExitStatus::Signal(9));
                    }
                }
            }
            sim.advance(Duration::from_millis(next(400)));
        }
        sim.core.stop(&mut sim.io, sim.now);
        sim.check();
        let everyone: Vec<WorkerId> = sim.io.alive.iter().copied().collect();
        for id in everyone {
            sim.exit(id, ExitStatus::Code(0));
        }
        assert!(
            sim.core.finished(),
            "round {round}: stopped and nothing left"
        );
        assert!(sim.io.steering.is_empty());
    }
}

/// The replacement the roll is waiting on for `index`.
fn incoming(sim: &Sim, index: usize) -> Option<WorkerId> {
    sim.core.slots()[index].incoming.as_ref().map(|w| w.id)
}

#[test]
fn a_roll_whose_replacement_never_becomes_ready_ends_after_three_attempts() {
    let mut sim = Sim::with(2, settings(), true);
    for index in 0..2 {
        let id = sim.current(index);
        sim.core
            .ready(&mut sim.io, index, id, true, sim.now)
            .expect("ready");
    }
    let serving: Vec<WorkerId> = (0..2).map(|i| sim.current(i)).collect();
    let started = sim.now;
    sim.core.begin_roll("SIGUSR2");
    sim.tick();
    // Each replacement of slot 0 runs but never says `ready`: killed at the start timeout,
    // its exit is a failed start.
    let mut attempts = 0;
    while let Some(id) = incoming(&sim, 0) {
        attempts += 1;
        assert!(attempts <= START_ATTEMPTS, "no more than three attempts");
        sim.run_for(settings().start_timeout, &|_| true);
        assert!(sim.io.killed.contains(&id), "killed at its start timeout");
        sim.exit(id, ExitStatus::Signal(9));
        // The backoff before the next attempt.
        sim.run_for(Duration::from_millis(500), &|_| true);
    }
    assert_eq!(attempts, START_ATTEMPTS);
    assert!(!sim.core.rolling(), "the roll has ended");
    let abandoned = sim.core.roll_abandoned().expect("the roll says it gave up");
    assert_eq!(abandoned.slot, 0);
    assert_eq!(abandoned.reason, "not ready within 10s");
    assert!(
        sim.now.saturating_duration_since(started)
            <= settings().start_timeout * START_ATTEMPTS + Duration::from_secs(2),
        "within the documented bound"
    );
    // The old generation serves throughout, and slot 1 was never touched.
    assert_eq!((0..2).map(|i| sim.current(i)).collect::<Vec<_>>(), serving);
    assert!(sim.io.drained.is_empty(), "nobody drained");
    assert_eq!(sim.state(0), SlotState::Ready);
    assert_eq!(sim.state(1), SlotState::Ready);
    assert!(
        incoming(&sim, 1).is_none(),
        "the roll did not go on to slot 1"
    );
    // A later roll starts afresh and clears the verdict.
    sim.core.begin_roll("SIGUSR2");
    sim.tick();
    assert!(sim.core.roll_abandoned().is_none());
    assert!(incoming(&sim, 0).is_some());
}

#[test]
fn a_roll_whose_replacement_exits_at_start_ends_after_three_attempts() {
    let mut sim = Sim::new(1);
    sim.ready_all();
    let serving = sim.current(0);
    sim.core.begin_roll("SIGUSR2");
    sim.tick();
    for _ in 0..START_ATTEMPTS {
        let id = incoming(&sim, 0).expect("a replacement");
        sim.exit(id, ExitStatus::Code(1));
        sim.run_for(Duration::from_secs(1), &|_| true);
    }
    assert!(incoming(&sim, 0).is_none());
    assert!(!sim.core.rolling());
    assert_eq!(
        sim.core.roll_abandoned().map(|r| r.reason.as_str()),
        Some("exited before ready: exit code 1")
    );
    assert_eq!(sim.current(0), serving);
    assert_eq!(sim.state(0), SlotState::Ready);
}

#[test]
fn a_replacement_for_a_hung_worker_is_never_given_up() {
    let mut sim = Sim::new(2);
    sim.ready_all();
    let hung = sim.current(0);
    // Slot 0 stops answering: hung, out of steering, replaced.
    sim.run_for(TIMEOUT * 2, &|id| id != hung);
    assert_eq!(sim.state(0), SlotState::Hung);
    for _ in 0..START_ATTEMPTS + 1 {
        let id = incoming(&sim, 0).expect("a replacement keeps being tried");
        sim.exit(id, ExitStatus::Code(1));
        sim.run_for(Duration::from_secs(2), &|id| id != hung);
    }
    assert!(incoming(&sim, 0).is_some());
    assert!(sim.core.roll_abandoned().is_none());
}
