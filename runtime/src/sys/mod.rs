//! The few system calls Steer makes that neither std nor nix wraps the way it needs, each
//! behind one named safe function that says which call it maps to and what can fail.
//!
//! - [`fd`]: the flags and identity of one of this process's file descriptors;
//! - [`borrow`]: a socket another process holds, copied into this one with
//!   `pidfd_getfd(2)` and checked to be the same socket by its inode;
//! - [`memory`]: a process's resident memory, from `/proc/<pid>/statm`.
//!
//! Every `unsafe` block here is one call, with a `// SAFETY:` line.

pub mod borrow;
pub mod fd;
pub mod memory;
