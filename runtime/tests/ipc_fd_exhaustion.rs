//! A process with no fd left cannot take the one that travels beside a message. The kernel
//! then sets `MSG_CTRUNC`, and the channel must say so as [`IpcError::FdsExhausted`], not
//! as a protocol violation of the peer: the primary must not kill a healthy worker for its
//! own open-file limit.
//!
//! Alone in its test binary, because it lowers the open-file limit of the whole process.

use std::fs::File;
use std::net::TcpListener;
use std::os::fd::AsFd;

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use steer::IpcError;
use steer::internals::{Channel, Message};

#[test]
fn running_out_of_fds_while_receiving_is_not_a_protocol_violation() {
    let (worker, primary) = Channel::pair().expect("socketpair");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).expect("setrlimit");
    let mut filler = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(file) => filler.push(file),
            Err(err) if err.raw_os_error() == Some(libc::EMFILE) => break,
            Err(err) => panic!("open: {err}"),
        }
        assert!(filler.len() < 256, "the limit never bit");
    }

    worker
        .send_with_fd(
            &Message::Register {
                pid: 7,
                fd: None,
                listener: None,
            },
            listener.as_fd(),
        )
        .expect("send");
    let got = primary.recv();
    assert!(
        matches!(got, Err(IpcError::FdsExhausted)),
        "expected FdsExhausted, got {got:?}"
    );
    assert!(!IpcError::FdsExhausted.is_violation());

    // With one fd free again, the same message arrives whole.
    filler.pop();
    worker
        .send_with_fd(
            &Message::Register {
                pid: 7,
                fd: None,
                listener: None,
            },
            listener.as_fd(),
        )
        .expect("send");
    let got = primary.recv().expect("recv").expect("a message");
    assert_eq!(
        got.message,
        Message::Register {
            pid: 7,
            fd: None,
            listener: None,
        }
    );
    assert!(got.fd.is_some(), "the fd came with it");

    drop(filler);
    setrlimit(Resource::RLIMIT_NOFILE, soft, hard).expect("restore the limit");
}
