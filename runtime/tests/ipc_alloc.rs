//! The primary's hot path allocates nothing: a ping out and a pong in, on either kind of
//! channel, once each channel's buffers are warm. And a broadcast is serialized once,
//! however many workers receive it.
//!
//! A counting global allocator counts only on the thread that asked for it, so the test
//! harness's own threads cannot disturb the figures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use steer::internals::{Channel, Counters, Encoded, Message, Payload};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is passed straight to `System`; the bookkeeping only touches
// const-initialized thread-locals, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: `ptr` came from `System` with `layout`; forwarded as given.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn count() {
    // `try_with`: thread-locals may already be gone while a thread exits.
    let _ = COUNTING.try_with(|on| {
        if on.get() {
            let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        }
    });
}

/// Allocations made on this thread while `f` runs.
fn allocations_in(f: impl FnOnce()) -> u64 {
    ALLOCATIONS.with(|n| n.set(0));
    COUNTING.with(|on| on.set(true));
    f();
    COUNTING.with(|on| on.set(false));
    ALLOCATIONS.with(Cell::get)
}

/// One heartbeat: the primary pings, the worker answers, the primary reads the answer.
fn heartbeat(primary: &Channel, worker: &Channel, seq: u64) {
    primary.send(&Message::Ping { seq }).expect("ping out");
    let ping = worker.recv().expect("recv").expect("the ping");
    assert_eq!(ping.message, Message::Ping { seq });
    let counters = Counters {
        accepted: seq,
        active: 3,
        requests: seq * 2,
    };
    worker
        .send(&Message::Pong { seq, counters })
        .expect("pong out");
    let pong = primary.recv().expect("recv").expect("the pong");
    assert_eq!(pong.message, Message::Pong { seq, counters });
}

fn assert_heartbeats_allocate_nothing(primary: &Channel, worker: &Channel) {
    primary.set_nonblocking(true).expect("nonblocking");
    // Warm up: the first message sizes each send buffer.
    heartbeat(primary, worker, 1);
    let allocations = allocations_in(|| {
        for seq in 2..1_002 {
            heartbeat(primary, worker, seq);
        }
    });
    assert_eq!(
        allocations, 0,
        "1,000 heartbeats allocated {allocations} times"
    );
}

#[test]
fn ping_out_and_pong_in_allocate_nothing_on_a_datagram_channel() {
    let (primary, worker) = Channel::pair().expect("socketpair");
    assert_heartbeats_allocate_nothing(&primary, &worker);
}

#[test]
fn ping_out_and_pong_in_allocate_nothing_on_a_stream_channel() {
    let (primary, worker) = Channel::stream_pair().expect("socketpair");
    assert_heartbeats_allocate_nothing(&primary, &worker);
}

#[test]
fn a_broadcast_is_serialized_once_whatever_the_number_of_receivers() {
    let big = Payload::new(&vec!["sixty-four KiB, almost"; 2_500]).expect("payload");
    let broadcast = |receivers: usize| {
        let pairs: Vec<_> = (0..receivers)
            .map(|_| Channel::stream_pair().expect("socketpair"))
            .collect();
        let sent = allocations_in(|| {
            let message = Encoded::new(&Message::User {
                to: None,
                from: Some(0),
                data: big.clone(),
            })
            .expect("encode");
            for (primary, _) in &pairs {
                primary.send_encoded(&message).expect("send");
            }
        });
        for (_, worker) in &pairs {
            let got = worker.recv().expect("recv").expect("the broadcast");
            assert!(matches!(got.message, Message::User { data, .. } if data == big));
        }
        sent
    };
    let to_one = broadcast(1);
    let to_eight = broadcast(8);
    assert_eq!(
        to_one, to_eight,
        "sending to 8 receivers allocated more than sending to 1"
    );
}

#[test]
fn handing_a_connection_over_allocates_nothing() {
    // The `userspace` baseline's hot path: accept, then `sendmsg` with `SCM_RIGHTS` to a
    // worker, once per connection. (nix's `sendmsg` allocated its control buffer each call.)
    use std::net::{TcpListener, TcpStream};
    use steer::internals::{HandOff, Target};

    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    let mut handoff = HandOff::new(socket2::Socket::from(listener));
    let (primary, worker) = Channel::pair().expect("socketpair");
    primary.set_nonblocking(true).expect("nonblocking");
    worker.set_nonblocking(true).expect("nonblocking");
    let targets = [Target {
        slot: 0,
        channel: &primary,
    }];
    let mut handed = 0;
    let mut allocations = 0;
    for round in 0..201 {
        let clients: Vec<TcpStream> = (0..5)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        // Every connection is in the queue before the hand-off looks.
        std::thread::sleep(std::time::Duration::from_millis(1));
        let made = allocations_in(|| handoff.hand_off(&targets));
        // The first round warms the buffers up.
        if round > 0 {
            allocations += made;
        }
        while let Ok(Some(received)) = worker.recv() {
            assert_eq!(received.message, Message::Connection);
            assert!(received.fd.is_some(), "the connection's fd beside it");
            handed += 1;
        }
        drop(clients);
    }
    assert_eq!(handed, 1_005, "every connection handed over");
    assert_eq!(
        allocations, 0,
        "handing 1,000 connections over allocated {allocations} times"
    );
}
